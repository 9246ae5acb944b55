"""Recurrent language models on lingua's shared loop: minGRU, minLSTM (Feng et al. 2024, "Were RNNs All We Needed?")
and Hawk (De et al. 2024, "Griffin"), in reading order: args, the three recurrent mixers, block, model, inference state.

Every block is pre-norm: x + mixer(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)) (lingua.models.layers' RMSNorm and FeedForward; Griffin's MLP block is this gated MLP with GeLU where SwiGLU has SiLU). The mixers train with a parallel scan
(scan.py) and generate with the step form; a document start (tok_idx == 0) resets the state, so packed documents do
not see each other, exactly as under the transformer's block-causal mask.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from apps.fastRNN.hf_lingua_rnn import lingua_rnn_mapping
from apps.fastRNN.scan import SCANS, conv_step, g, linear_scan, log_g, log_scan, step
from lingua.errors import ConfigError
from lingua.models.decoder import Decoder, DecoderArgs, check_choice, check_positive
from lingua.models.init import init_shard_, trunc_normal_
from lingua.models.layers import (
    FeedForward,
    RMSNorm,
    causal_conv,
    ffn_hidden_dim,
    init_output_,
)
from lingua.models.spec import ModelSpec

CELLS = ("mingru", "minlstm", "hawk")


@dataclass
class FastRNNArgs(DecoderArgs):
    cell: str = "mingru"  # mingru | minlstm | hawk
    lru_dim_multiplier: float = 1.0  # recurrent width = lru_dim_multiplier * dim (Griffin uses 4/3)
    n_heads: int = 1  # hawk: the RG-LRU gates are block-diagonal with n_heads blocks, as in Griffin (1: dense)
    conv_size: int = 4  # hawk: width of the causal Conv1D before the RG-LRU
    scan: str = "odd_even"  # mingru/minlstm: odd_even | heinsen (the paper's logcumsumexp form; see scan.py)
    ffn_dim_multiplier: Optional[float] = None  # scales the feed-forward width before rounding to multiple_of
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "cell", CELLS)
        check_choice(self, "scan", SCANS)
        if self.scan == "heinsen" and self.cell == "hawk":
            raise ConfigError("model.scan=heinsen works in log space, which needs positive values: minGRU/minLSTM "
                              "only (hawk scans in linear space)")
        check_positive(self, "n_heads", "conv_size", "multiple_of")
        if self.lru_dim <= 0:
            raise ConfigError(f"model.lru_dim_multiplier={self.lru_dim_multiplier} leaves no recurrent width")
        if self.cell == "hawk" and self.lru_dim % self.n_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} does not divide the recurrent width {self.lru_dim} "
                              "(lru_dim_multiplier * dim)")

    @property
    def lru_dim(self) -> int:
        """The recurrent width."""
        return int(self.lru_dim_multiplier * self.dim)


@dataclass
class LayerState:
    """One layer's inference state: h (bs, hidden) fp32, and Hawk's last conv_size - 1 conv inputs."""

    h: torch.Tensor
    conv: Optional[torch.Tensor] = None


# ---------------------------------------------------------------- the recurrent mixers
#
# Each mixer maps x (bs, seqlen, dim) to (bs, seqlen, dim). tok_idx (bs, seqlen): position in the document (0 starts
# one; negative on generation padding). valid: None, or bool (bs, seqlen), False on padding. state: a LayerState to
# start from and update (inference), else None (training: zero state). One token with a state takes the step form.


class MinRNN(nn.Module):
    """What minGRU and minLSTM share: one projection to `n_pre` pre-activations per recurrent unit, a recurrence with
    a_t in (0, 1) and b_t > 0, and a projection back to dim. A cell gives its a_t, b_t twice: `coefficients` as the
    paper writes the recurrence (the step form), `log_coefficients` in log space (the parallel scan)."""

    n_pre: int

    def __init__(self, dim: int, hidden: int, scan: str):
        super().__init__()
        self.dim, self.hidden, self.scan = dim, hidden, scan
        self.wi = nn.Linear(dim, self.n_pre * hidden, bias=False)
        self.wo = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, tok_idx, valid=None, state: Optional[LayerState] = None) -> torch.Tensor:
        pre = self.wi(x).float().chunk(self.n_pre, dim=-1)  # n_pre x (bs, seqlen, hidden)
        reset = tok_idx == 0
        if state is not None and x.shape[1] == 1:
            a, b = self.coefficients(*(p[:, 0] for p in pre))  # (bs, hidden) each
            state.h = step(a, b, reset[:, 0], _first(valid), state.h)
            h = state.h[:, None]
        else:
            h = log_scan(*self.log_coefficients(*pre), reset, valid, _h0(state), self.scan)  # (bs, seqlen, hidden)
            _keep_last(state, h)
        return self.wo(h.type_as(x))

    def init_weights(self, init_base_std: Optional[float], factor: float):
        trunc_normal_(self.wi.weight, init_base_std or self.dim**-0.5)
        init_output_(self.wo.weight, (init_base_std or self.hidden**-0.5) / factor)


class MinGRU(MinRNN):
    """z_t = sigmoid(k_t), h~_t = g(c_t), h_t = (1 - z_t) h_{t-1} + z_t h~_t, with (k_t, c_t) = W x_t."""

    n_pre = 2

    @staticmethod
    def coefficients(k, c):
        return torch.sigmoid(-k), torch.sigmoid(k) * g(c)  # 1 - z = sigmoid(-k) keeps its digits when z -> 1

    @staticmethod
    def log_coefficients(k, c):
        return -F.softplus(k), -F.softplus(-k) + log_g(c)  # log(1 - z), log z + log h~


class MinLSTM(MinRNN):
    """f_t, i_t = sigmoid(kf_t), sigmoid(ki_t), normalised to f'_t + i'_t = 1 (the paper's length-independent scaling);
    h_t = f'_t h_{t-1} + i'_t g(c_t), with (kf_t, ki_t, c_t) = W x_t."""

    n_pre = 3

    @staticmethod
    def coefficients(kf, ki, c):
        f, i = torch.sigmoid(kf), torch.sigmoid(ki)
        return f / (f + i), i / (f + i) * g(c)

    @staticmethod
    def log_coefficients(kf, ki, c):
        diff = F.softplus(-kf) - F.softplus(-ki)  # log i - log f
        return -F.softplus(diff), -F.softplus(-diff) + log_g(c)  # log f', log i' + log h~


class Hawk(nn.Module):
    """Griffin's recurrent block: wo(GeLU(W_y x) * RG-LRU(Conv1D(W_x x))). The RG-LRU (Real-Gated Linear Recurrent
    Unit), with r_t, i_t = sigmoid of block-diagonal maps of its input u_t:

        a_t = sigmoid(Lambda) ** (c * r_t),  c = 8
        h_t = a_t * h_{t-1} + sqrt(1 - a_t ** 2) * (i_t * u_t)

    At a document start a_t = 0 and the sqrt(1 - a^2) normalisation is skipped (h_t = i_t u_t), as in Griffin's code."""

    C = 8.0

    def __init__(self, dim: int, hidden: int, n_heads: int, conv_size: int):
        super().__init__()
        self.dim, self.hidden, self.n_heads, self.conv_size = dim, hidden, n_heads, conv_size
        head = hidden // n_heads
        self.wi = nn.Linear(dim, 2 * hidden, bias=False)  # the GeLU branch y and the recurrent branch u
        self.conv_weight = nn.Parameter(torch.empty(hidden, conv_size))  # depthwise, as nn.Conv1d's (hidden, 1, width)
        self.conv_bias = nn.Parameter(torch.empty(hidden))
        # the recurrence and input gates of each head, side by side: row h * head + j is input j of head h
        self.gate_weight = nn.Parameter(torch.empty(hidden, 2 * head))
        self.gate_bias = nn.Parameter(torch.empty(2 * hidden))
        self.a_param = nn.Parameter(torch.empty(hidden))  # Lambda
        self.wo = nn.Linear(hidden, dim, bias=False)

    def _gates(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (..., hidden) -> r, i (..., hidden) each, fp32."""
        heads = u.unflatten(-1, (self.n_heads, -1))  # (..., n_heads, head)
        w = self.gate_weight.view(self.n_heads, -1, self.gate_weight.shape[1])  # (n_heads, head, 2 * head)
        out = torch.einsum("...hj,hjk->...hk", heads, w.to(u.dtype)).float()  # (..., n_heads, 2 * head)
        r, i = out.chunk(2, dim=-1)
        br, bi = self.gate_bias.float().chunk(2)
        return torch.sigmoid(r.flatten(-2) + br), torch.sigmoid(i.flatten(-2) + bi)

    def _coefficients(self, u: torch.Tensor, reset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t, b_t of h_t = a_t h_{t-1} + b_t from the conv output u (..., hidden), in fp32."""
        r, i = self._gates(u)
        log_a = -self.C * r * F.softplus(-self.a_param.float())  # c * r_t * log sigmoid(Lambda)
        # 1 - a^2 = -expm1(2 log a) keeps its digits when a is near 1; the clamp bounds the sqrt's gradient at a -> 1
        scale = (-torch.expm1(2 * log_a)).clamp(min=1e-6).sqrt().masked_fill(reset[..., None], 1.0)
        return log_a.exp(), scale * i * u.float()

    def forward(self, x, tok_idx, valid=None, state: Optional[LayerState] = None) -> torch.Tensor:
        y, u = self.wi(x).chunk(2, dim=-1)  # (bs, seqlen, hidden) each
        if valid is not None:
            u = u * valid[..., None]  # padding enters the conv as zeros
        reset = tok_idx == 0
        if state is not None and x.shape[1] == 1:
            u, state.conv = conv_step(u[:, 0], self.conv_weight, self.conv_bias, reset[:, 0], state.conv)
            a, b = self._coefficients(u, reset[:, 0])
            state.h = step(a, b, reset[:, 0], _first(valid), state.h)
            h = state.h[:, None]
        else:
            history = None if state is None else state.conv
            u, history = causal_conv(u, self.conv_weight, self.conv_bias, tok_idx, history)
            a, b = self._coefficients(u, reset)
            h = linear_scan(a, b, reset, valid, _h0(state))
            if state is not None:
                state.conv = history
            _keep_last(state, h)
        return self.wo(h.type_as(x) * F.gelu(y))

    def init_weights(self, init_base_std: Optional[float], factor: float):
        trunc_normal_(self.wi.weight, init_base_std or self.dim**-0.5)
        trunc_normal_(self.conv_weight, self.conv_size**-0.5)
        nn.init.zeros_(self.conv_bias)
        trunc_normal_(self.gate_weight, (self.hidden // self.n_heads) ** -0.5)
        nn.init.zeros_(self.gate_bias)
        # Griffin: Lambda such that a^c = sigmoid(Lambda)^c is uniform in [0.9, 0.999], i.e. slow decays at first
        init_shard_(self.a_param, lambda block, gen: _lambda_init_(block, gen, self.C))
        init_output_(self.wo.weight, (init_base_std or self.hidden**-0.5) / factor)


def _lambda_init_(block: torch.Tensor, gen: torch.Generator, c: float) -> None:
    s = block.uniform_(0.9, 0.999, generator=gen).pow_(1 / c)  # sigmoid(Lambda)
    block.copy_(torch.log(s) - torch.log1p(-s))  # logit


def _first(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if valid is None else valid[:, 0]


def _h0(state: Optional[LayerState]) -> Optional[torch.Tensor]:
    return None if state is None else state.h


def _keep_last(state: Optional[LayerState], h: torch.Tensor) -> None:
    if state is not None:
        state.h = h[:, -1]


# ---------------------------------------------------------------- block and model


def build_mixer(args: FastRNNArgs) -> nn.Module:
    if args.cell == "mingru":
        return MinGRU(args.dim, args.lru_dim, args.scan)
    if args.cell == "minlstm":
        return MinLSTM(args.dim, args.lru_dim, args.scan)
    return Hawk(args.dim, args.lru_dim, args.n_heads, args.conv_size)


class FastRNNBlock(nn.Module):
    """lingua.models.transformer.model.TransformerBlock's shape with a recurrent mixer in place of attention; a copy rather than a
    shared base because the parameter names (mixer_norm/mixer vs attention_norm/attention) are the checkpoint format."""

    def __init__(self, args: FastRNNArgs):
        super().__init__()
        self.mixer_norm = RMSNorm(args.dim, args.norm_eps)
        self.mixer = build_mixer(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier))

    def forward(self, x, tok_idx, valid=None, cache: Optional[LayerState] = None) -> torch.Tensor:
        h = x + self.mixer(self.mixer_norm(x), tok_idx, valid, cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, init_base_std: Optional[float], factor: float):
        self.mixer_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.mixer.init_weights(init_base_std, factor)
        self.feed_forward.init_weights(init_base_std, factor)


class FastRNN(Decoder):
    block_cls = FastRNNBlock

    def block_inputs(self, tokens, tok_idx, cache) -> tuple:
        """(tok_idx, valid): positions inside documents (a state resets at 0) and which tokens are real. Decoding
        without tok_idx: the positions after each row's left padding (< 0 on padding, which keeps the state at 0)."""
        bs, seqlen = tokens.shape
        if cache is not None and tok_idx is None:
            tok_idx = cache.len + torch.arange(seqlen, device=tokens.device) - cache.pad[:, None]  # (bs, seqlen)
            return tok_idx, tok_idx >= 0
        if tok_idx is None:
            tok_idx = torch.arange(seqlen, device=tokens.device).expand(bs, seqlen)
        return tok_idx, None

    def make_cache(self, bs: int, max_len: int, pad=None, device=None, dtype=torch.float32) -> "RecurrentCache":
        return RecurrentCache(self.args, bs, max_len, pad, device, dtype)


class RecurrentCache:
    """What generation carries instead of a KV cache: each layer's state (a few vectors per row, whatever the length).

    pad[b] = number of left-padding tokens of row b; `len` = positions consumed so far (the same for every row)."""

    def __init__(self, args: FastRNNArgs, bs: int, max_len: int, pad=None, device=None, dtype=torch.float32):
        pad = torch.zeros(bs, dtype=torch.long) if pad is None else pad
        self.pad = torch.as_tensor(pad, dtype=torch.long, device=device)  # (bs,)
        self.max_len = max_len
        self.len = 0
        hidden = args.lru_dim
        conv = (bs, args.conv_size - 1, hidden) if args.cell == "hawk" else None
        self.layers = [
            LayerState(torch.zeros(bs, hidden, device=device),
                       None if conv is None else torch.zeros(conv, device=device, dtype=dtype))
            for _ in range(args.n_layers)
        ]

    def layer(self, i: int) -> LayerState:
        return self.layers[i]


# ---------------------------------------------------------------- counting


def flops_per_token(args: FastRNNArgs, seq_len: int) -> int:
    """Training FLOPs per token: 6 * N, with lingua.models.transformer.model.flops_per_token's N (every parameter but the embedding
    table, plus the output projection vocab_size * dim whether tied or not). A recurrence costs the same per token at
    any seq_len, so there is no attention-like term. Left out: the scan and gate elementwise work, about 60 FLOPs per
    recurrent unit per layer forward + backward, 0.3% of 6 N on the debug shape (and Hawk's conv, 6 * conv_size)."""
    with torch.device("meta"):
        model = FastRNN(args)
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # a tied matrix counted once
    n -= model.tok_embeddings.weight.numel()
    if args.weight_tying:
        n += args.vocab_size * args.dim
    return 6 * n


FASTRNN_SPEC = ModelSpec(name="fastrnn", path="apps.fastRNN.model:FASTRNN_SPEC", args_cls=FastRNNArgs, build=FastRNN,
                         flops_per_token=flops_per_token, hf=lingua_rnn_mapping(FastRNNArgs))
