"""lingua's Transformer in transformers: `LinguaForCausalLM`, loaded with `trust_remote_code=True`. This file is
copied into every export whose model no native class computes exactly; it needs torch and transformers only, and
computes what lingua/models/transformer/model.py computes, from the same weights (Llama's names and RoPE layout):

    block: h = x + attn(RMSNorm(x)); out = h + mlp(RMSNorm(h))
    attn:  q, k = RMSNorm per head (config.qk_norm), then RoPE (rotate_half); SDPA scaled by config.attention_scale
    mlp:   swiglu: down(silu(gate x) * up x) | relu2: down(relu(up x)^2) | with config.n_experts, apps/moe's routed
           SwiGLU experts (softmax or sigmoid gates, selection bias, shared experts)
    logits = lm_head(RMSNorm(h)), soft-capped c * tanh(logits / c) when config.logit_softcap is set

Generation uses transformers' `DynamicCache` (past_key_values) and the 2-D attention mask of left-padded batches.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lingua import LinguaConfig, LinguaMoEConfig

# what transformers calls the KV cache in model outputs: `cache` from 5.x on, `past_key_values` before
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class LinguaRMSNorm(nn.Module):
    """x / rms(x) * weight, the normalisation in fp32 whatever the activation dtype (as lingua's RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate dims i and i + head_dim/2 of every head by position * theta^(-2i/head_dim), in fp32.
    x: (bs, n_heads, seqlen, head_dim); positions: (bs, seqlen)."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None, :, None] * inv_freq  # (bs, 1, seqlen, head_dim // 2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class LinguaAttention(nn.Module):
    def __init__(self, config: LinguaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx, self.head_dim = config, layer_idx, config.head_dim
        self.n_rep = config.num_attention_heads // config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:  # one head_dim weight shared by the heads
            self.q_norm = LinguaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = LinguaRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, positions, mask, cache: Optional[DynamicCache]) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        q = self.q_proj(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_heads, head_dim)
        k = self.k_proj(x).view(bs, seqlen, -1, self.head_dim)
        v = self.v_proj(x).view(bs, seqlen, -1, self.head_dim).transpose(1, 2)  # (bs, n_kv_heads, seqlen, head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q.transpose(1, 2), positions, self.config.rope_theta)
        k = rope(k.transpose(1, 2), positions, self.config.rope_theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (bs, n_kv_heads, past + seqlen, head_dim)
        if self.n_rep > 1:  # query head h reads kv head h // n_rep
            k, v = k.repeat_interleave(self.n_rep, dim=1), v.repeat_interleave(self.n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.config.attention_scale)
        return self.o_proj(out.transpose(1, 2).reshape(bs, seqlen, -1))


class LinguaMLP(nn.Module):
    def __init__(self, config: LinguaConfig, mlp: Optional[str] = None, width: Optional[int] = None):
        super().__init__()
        self.gated = (mlp or config.mlp) == "swiglu"
        width = width or config.intermediate_size
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.relu(self.up_proj(x)).square())


class LinguaMoE(nn.Module):
    """Token-choice top-k routing over SwiGLU experts held as [n_experts, ...] tensors (x @ w), as apps/moe computes
    it: the selection bias only chooses, the gates come from the unbiased scores."""

    def __init__(self, config: LinguaConfig):
        super().__init__()
        self.config, dim, width = config, config.hidden_size, config.moe_intermediate_size
        self.router = nn.Linear(dim, config.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(config.n_experts, dim, width))
        self.w3 = nn.Parameter(torch.empty(config.n_experts, dim, width))
        self.w2 = nn.Parameter(torch.empty(config.n_experts, width, dim))
        self.register_buffer("expert_bias", torch.zeros(config.n_experts))
        if config.n_shared_experts:
            self.shared = LinguaMLP(config, "swiglu", config.n_shared_experts * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, flat = self.config, x.reshape(-1, x.shape[-1])  # (n_tok, dim)
        logits = self.router(flat).float()
        scores = logits.softmax(-1) if c.gate == "softmax" else logits.sigmoid()  # (n_tok, n_experts)
        experts = torch.topk(scores + self.expert_bias.float(), c.num_experts_per_tok, dim=-1, sorted=True).indices
        gates = scores.gather(-1, experts)  # (n_tok, top_k)
        if c.route_norm:
            gates = gates / gates.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(c.n_experts):
            tok, slot = (experts == e).nonzero(as_tuple=True)
            rows = flat[tok]
            y = (F.silu(rows @ self.w1[e]) * (rows @ self.w3[e])) @ self.w2[e]
            out.index_add_(0, tok, y * gates[tok, slot, None].to(y.dtype))
        if c.n_shared_experts:
            out = out + self.shared(flat)
        return out.view_as(x)


class LinguaDecoderLayer(nn.Module):
    def __init__(self, config: LinguaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LinguaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LinguaAttention(config, layer_idx)
        self.post_attention_layernorm = LinguaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LinguaMoE(config) if config.n_experts else LinguaMLP(config)

    def forward(self, x, positions, mask, cache) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), positions, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LinguaPreTrainedModel(PreTrainedModel):
    config_class = LinguaConfig
    base_model_prefix = "model"
    _no_split_modules = ["LinguaDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, LinguaRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LinguaMoE):
            for w in (module.w1, module.w2, module.w3):
                nn.init.normal_(w, std=self.config.initializer_range)


def positions_and_mask(attention_mask, past: int, seqlen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions (bs, seqlen) and the SDPA bool mask (bs, 1, seqlen, past + seqlen) of `seqlen` new tokens
    after `past` cached ones. attention_mask (bs, past + seqlen), 0 at left padding: a real token's position counts
    real tokens only, as lingua's left-padded generation does; a padding query sees itself (its output is unused)."""
    q_slot = torch.arange(past, past + seqlen, device=device)
    k_slot = torch.arange(past + seqlen, device=device)
    allowed = (k_slot[None, :] <= q_slot[:, None])[None]  # (1, seqlen, past + seqlen)
    if attention_mask is None:
        return q_slot[None], allowed[:, None]
    real = attention_mask.to(device).bool()  # (bs, past + seqlen)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    allowed = allowed & (real[:, None, :] | (k_slot[None, None, :] == q_slot[None, :, None]))
    return positions, allowed[:, None]


class LinguaModel(LinguaPreTrainedModel):
    def __init__(self, config: LinguaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LinguaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LinguaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None,
                use_cache=None) -> tuple[torch.Tensor, Optional[DynamicCache]]:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (bs, seqlen, dim)
        if cache is None and (use_cache if use_cache is not None else self.config.use_cache):
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        positions, mask = positions_and_mask(attention_mask, past, h.shape[1], h.device)
        for layer in self.layers:
            h = layer(h, positions, mask, cache)
        return self.norm(h), cache


class LinguaForCausalLM(LinguaPreTrainedModel, GenerationMixin):
    # transformers 5 names the tied pair; 4.x lists the tied parameter
    _tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"}
                          if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"])

    def __init__(self, config: LinguaConfig):
        super().__init__(config)
        self.model = LinguaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        """position_ids are ignored: positions follow the attention mask (left padding), as in lingua. The KV cache
        comes as `cache` (transformers >= 5.x) or `past_key_values` (earlier)."""
        h, cache = self.model(input_ids, attention_mask, cache if cache is not None else past_key_values,
                              inputs_embeds, use_cache)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep])  # (bs, kept, vocab_size)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:  # next-token cross-entropy; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


class LinguaMoEForCausalLM(LinguaForCausalLM):
    """The same model for apps/moe's checkpoints (config.n_experts > 0), under their own config class."""

    config_class = LinguaMoEConfig
