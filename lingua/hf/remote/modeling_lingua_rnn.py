"""apps/fastRNN's recurrent language models in transformers: `LinguaRNNForCausalLM` (trust_remote_code=True). Copied
into an export with the other lingua files; needs torch and transformers only. Parameter names are lingua's, under
`model.` (the output projection is `lm_head`). The recurrences run token by token (inference only, plain and exact);
transformers' cache holds no recurrent state, so `generate` re-runs the whole sequence each step (use_cache=False).

    block: h = x + mixer(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h))
    minGRU:  (k, c) = wi x;  h_t = sigmoid(-k) h_{t-1} + sigmoid(k) g(c);  out = wo h
    minLSTM: (kf, ki, c) = wi x;  f, i = sigmoid(kf), sigmoid(ki);  h_t = f/(f+i) h_{t-1} + i/(f+i) g(c)
    Hawk:    (y, u) = wi x; u = causal depthwise conv(u); RG-LRU: a = sigmoid(Lambda)^(8 r), h_t = a h_{t-1} +
             sqrt(1 - a^2) i u (no sqrt at a document start);  out = wo(h * gelu(y))

A document starts at each row's first real token (left padding is masked out by the attention mask).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_lingua import LinguaRNNConfig
from .modeling_lingua import LinguaRMSNorm


def g(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def recur(a: torch.Tensor, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t over time, h = 0 before a row's first real token (pos 0) and on padding (pos < 0).
    a, b: (bs, seqlen, hidden) fp32; pos: (bs, seqlen)."""
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        keep = (pos[:, t] > 0)[:, None].float()
        h = keep * a[:, t] * h + (pos[:, t] >= 0)[:, None].float() * b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


class MinRNN(nn.Module):
    def __init__(self, config: LinguaRNNConfig):
        super().__init__()
        self.cell, n_pre = config.cell, 2 if config.cell == "mingru" else 3
        self.wi = nn.Linear(config.hidden_size, n_pre * config.lru_dim, bias=False)
        self.wo = nn.Linear(config.lru_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        pre = self.wi(x).float().chunk(2 if self.cell == "mingru" else 3, dim=-1)
        if self.cell == "mingru":
            k, c = pre
            a, b = torch.sigmoid(-k), torch.sigmoid(k) * g(c)
        else:
            f, i, c = torch.sigmoid(pre[0]), torch.sigmoid(pre[1]), pre[2]
            a, b = f / (f + i), i / (f + i) * g(c)
        return self.wo(recur(a, b, pos).type_as(x))


class Hawk(nn.Module):
    C = 8.0

    def __init__(self, config: LinguaRNNConfig):
        super().__init__()
        hidden, head, self.n_heads = config.lru_dim, config.lru_dim // config.num_heads, config.num_heads
        self.wi = nn.Linear(config.hidden_size, 2 * hidden, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(hidden, config.conv_size))
        self.conv_bias = nn.Parameter(torch.empty(hidden))
        self.gate_weight = nn.Parameter(torch.empty(hidden, 2 * head))  # block-diagonal: head h's rows h*head..
        self.gate_bias = nn.Parameter(torch.empty(2 * hidden))
        self.a_param = nn.Parameter(torch.empty(hidden))
        self.wo = nn.Linear(hidden, config.hidden_size, bias=False)

    def conv(self, u: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Depthwise causal conv that reads no input from before the document start: u (bs, seqlen, hidden)."""
        width, out = self.conv_weight.shape[1], self.conv_bias.to(u.dtype).expand_as(u)
        for lag in range(width):
            shifted = F.pad(u, (0, 0, lag, 0))[:, : u.shape[1]]  # u_{t - lag}
            out = out + shifted * self.conv_weight[:, width - 1 - lag].to(u.dtype) * (pos >= lag)[..., None].to(u.dtype)
        return out

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        y, u = self.wi(x).chunk(2, dim=-1)
        u = self.conv(u * (pos >= 0)[..., None].to(u.dtype), pos)
        heads = u.unflatten(-1, (self.n_heads, -1))
        w = self.gate_weight.view(self.n_heads, -1, self.gate_weight.shape[1])
        r, i = torch.einsum("...hj,hjk->...hk", heads, w.to(u.dtype)).float().chunk(2, dim=-1)
        br, bi = self.gate_bias.float().chunk(2)
        r, i = torch.sigmoid(r.flatten(-2) + br), torch.sigmoid(i.flatten(-2) + bi)
        log_a = -self.C * r * F.softplus(-self.a_param.float())
        scale = (-torch.expm1(2 * log_a)).clamp(min=1e-6).sqrt().masked_fill((pos == 0)[..., None], 1.0)
        h = recur(log_a.exp(), scale * i * u.float(), pos)
        return self.wo(h.type_as(x) * F.gelu(y))


class SwiGLU(nn.Module):
    def __init__(self, config: LinguaRNNConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: LinguaRNNConfig):
        super().__init__()
        self.mixer_norm = LinguaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = Hawk(config) if config.cell == "hawk" else MinRNN(config)
        self.ffn_norm = LinguaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = SwiGLU(config)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = x + self.mixer(self.mixer_norm(x), pos)
        return h + self.feed_forward(self.ffn_norm(h))


class LinguaRNNModel(nn.Module):
    def __init__(self, config: LinguaRNNConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = LinguaRMSNorm(config.hidden_size, config.rms_norm_eps)


class LinguaRNNForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LinguaRNNConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: LinguaRNNConfig):
        super().__init__(config)
        self.model = LinguaRNNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        for p in module.parameters(recurse=False):
            nn.init.normal_(p, std=self.config.initializer_range)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> CausalLMOutput:
        """Every call runs the whole sequence from the first token (no cached state)."""
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        pos = torch.where(real.bool(), real.long().cumsum(-1) - 1, -1)  # (bs, seqlen): -1 on left padding
        h = self.model.tok_embeddings(input_ids)
        for layer in self.model.layers:
            h = layer(h, pos)
        logits = self.lm_head(self.model.norm(h))
        if self.config.logit_softcap is not None:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
