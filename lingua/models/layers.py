"""Building blocks every architecture shares: RMSNorm, the SwiGLU feed-forward, and a causal depthwise convolution
that stops at document boundaries (Hawk and Mamba-2 put one before their recurrence)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua.models.init import trunc_normal_

MLPS = ("swiglu", "relu2")


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float], mlp: str = "swiglu") -> int:
    """The feed-forward width: Llama's SwiGLU takes 2/3 of 4*dim (three matrices, the parameters of a 4*dim two-matrix
    MLP), ReLU² takes 4*dim; then scaled by ffn_dim_multiplier and rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3) if mlp == "swiglu" else 4 * dim
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def linear_group(x: torch.Tensor, *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
    """x through several bias-free nn.Linear that read the same input, as one matmul against their concatenated weights
    (copying the weights is small next to the matmul): one (tokens, sum of outputs) GEMM runs faster than narrow ones,
    forward and backward (benchmarks/train_throughput.py). One call each where a weight is a DTensor (tensor
    parallelism shards each its own way) or a module is not a plain nn.Linear (float8 training replaces them)."""
    if all(type(m) is nn.Linear and m.bias is None and not hasattr(m.weight, "device_mesh") for m in linears):
        fused = F.linear(x, torch.cat([m.weight for m in linears]))
        return fused.split([m.out_features for m in linears], dim=-1)
    return tuple(m(x) for m in linears)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich), computed in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight  # one fused kernel

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x). `init_weights(..., factor=inf)` zero-initialises w2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_group(x, self.w1, self.w3)  # (bs, seqlen, hidden_dim) each
        return self.w2(F.silu(gate) * up)  # (bs, seqlen, dim)

    def init_weights(self, init_base_std: Optional[float], factor: float):
        in_std = init_base_std or self.dim**-0.5
        for w in (self.w1, self.w3):
            trunc_normal_(w.weight, in_std)
        init_output_(self.w2.weight, (init_base_std or self.hidden_dim**-0.5) / factor)


class ReLU2FeedForward(nn.Module):
    """ReLU² (So et al. 2021, "Primer"; the nanoGPT speedruns): w2(relu(w1 x)²), two matrices 4*dim wide."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)).square())  # (bs, seqlen, hidden_dim) inside, (bs, seqlen, dim) out

    def init_weights(self, init_base_std: Optional[float], factor: float):
        trunc_normal_(self.w1.weight, init_base_std or self.dim**-0.5)
        init_output_(self.w2.weight, (init_base_std or self.hidden_dim**-0.5) / factor)


def build_mlp(mlp: str, dim: int, hidden_dim: int) -> nn.Module:
    return FeedForward(dim, hidden_dim) if mlp == "swiglu" else ReLU2FeedForward(dim, hidden_dim)


def init_output_(weight: torch.Tensor, std: float) -> None:
    """A residual output projection: truncated normal, or zeros for std 0 (model.init_std_factor=zero: every block
    starts as the identity, as in the nanoGPT speedruns)."""
    if std == 0:
        with torch.no_grad():
            weight.zero_()
    else:
        trunc_normal_(weight, std)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tok_idx: Optional[torch.Tensor] = None,
                history: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over time, as nn.Conv1d(groups=channels, padding=width - 1) computes it:
    out_t = bias + sum_j weight[:, j] * x_{t - (width - 1) + j} (weight[:, -1] multiplies the current input).

    x: (bs, seqlen, channels); weight: (channels, width); bias: (channels,).
    tok_idx: (bs, seqlen) positions inside documents, or None (one document): out_t reads x_{t-k} only when
    tok_idx_t >= k, so a document never sees the end of the previous one (causal_conv1d's seq_idx).
    history: (bs, width - 1, channels), the inputs before x (decoding), or None (zeros).
    Returns out (bs, seqlen, channels) and the last width - 1 inputs, the history of the next call (with tok_idx,
    zeroed where they precede the last document start)."""
    bs, seqlen, channels = x.shape
    width = weight.shape[1]
    if history is None:
        history = x.new_zeros(bs, width - 1, channels)
    full = torch.cat([history.to(x.dtype), x], dim=1)  # (bs, width - 1 + seqlen, channels)
    taps = weight.t().to(x.dtype).contiguous()  # (width, channels): contiguous rows multiply much faster
    out = bias.to(x.dtype).expand(bs, seqlen, channels)
    for lag in range(width):  # lag k: weight[:, width - 1 - k] times x_{t-k}
        term = full[:, width - 1 - lag: width - 1 - lag + seqlen] * taps[width - 1 - lag]
        if tok_idx is not None and lag > 0:
            term = term * (tok_idx >= lag)[..., None].to(x.dtype)
        out = out + term
    last = full[:, full.shape[1] - (width - 1):]
    if tok_idx is not None:
        lag = torch.arange(width - 2, -1, -1, device=x.device)  # lag of each remembered input behind the last token
        last = last * (lag[None, :] <= tok_idx[:, -1:])[..., None].to(x.dtype)  # inside the last token's document
    return out, last
