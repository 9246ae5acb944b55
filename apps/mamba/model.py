"""A Mamba-2 language model (Dao & Gu, 2024, "Transformers are SSMs"), in reading order: args, the fused-kernel switch,
gated RMSNorm, the mixer, the block, the recurrent cache, the model, FLOPs.

    mixer: in_proj -> [z | x B C | dt];  x B C -> causal depthwise conv (width 4) -> SiLU
           dt -> softplus(dt + dt_bias);  y = SSD(x, dt, A = -exp(A_log), B, C) + D * x
           out_proj(RMSNorm(y * SiLU(z)))
    block: h = x + mixer(RMSNorm(x))  [+ SwiGLU MLP with its own pre-norm, when model.mlp]

A is a scalar per head (times the identity): the SSD form, whose chunked scan lives in apps/mamba/ssd.py. Training
and evaluation run the chunked scan (or the mamba_ssm kernels on CUDA, see `use_kernels`); generation carries each
layer's recurrent state (SSM state + the conv's last inputs) in a `MambaCache` instead of a KV cache.

Documents packed in one row do not see each other: where tok_idx == 0 the SSM state restarts and the conv reads no
input from before it. Plain PyTorch, built on the meta device then `to_empty` + `init_weights()`, like the transformer.
"""

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from apps.mamba.hf_mamba2 import mamba2_mapping
from apps.mamba.ssd import ssd_chunked, ssd_step
from lingua.errors import ConfigError, LinguaError, require
from lingua.models.decoder import Decoder, DecoderArgs, check_choice, check_positive
from lingua.models.init import init_shard_, trunc_normal_, uniform_
from lingua.models.layers import (
    FeedForward,
    RMSNorm,
    causal_conv,
    ffn_hidden_dim,
    init_output_,
)
from lingua.models.spec import ModelSpec

SSM_IMPLS = ("auto", "torch", "mamba_ssm")


@dataclass
class MambaArgs(DecoderArgs):
    d_state: int = 64  # N: size of each head's state per channel
    d_conv: int = 4  # width of the causal depthwise convolution
    expand: int = 2  # d_inner = expand * dim channels go through the SSM
    head_dim: int = 64  # P: channels per head; n_heads = d_inner // head_dim, each with its own decay
    n_groups: int = 1  # B and C are shared by the n_heads // n_groups heads of a group (like GQA's KV heads)
    chunk_size: int = 64  # Q of the chunked scan: quadratic inside a chunk, a state passed between chunks
    A_init_min: float = 1.0  # A = -exp(A_log) starts uniform in -[A_init_min, A_init_max]
    A_init_max: float = 16.0  # see A_init_min
    dt_min: float = 0.001  # softplus(dt_bias) starts log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1  # see dt_min
    dt_init_floor: float = 1e-4  # smallest initial step size dt
    mlp: bool = False  # a SwiGLU MLP after each mixer (Mamba-2 stacks mixers only)
    ffn_dim_multiplier: Optional[float] = None  # MLP: scales its width before rounding to multiple_of
    multiple_of: int = 256  # MLP: its width is rounded up to a multiple of this
    ssm_impl: str = "auto"  # auto: mamba_ssm kernels on CUDA when installed | torch | mamba_ssm (required)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size", "multiple_of")
        if self.d_inner % self.head_dim:
            raise ConfigError(f"model.head_dim={self.head_dim} does not divide expand * dim = {self.d_inner}")
        if self.n_heads % self.n_groups:
            raise ConfigError(f"model.n_groups={self.n_groups} does not divide the {self.n_heads} heads")
        if not 0 < self.A_init_min <= self.A_init_max:
            raise ConfigError(f"need 0 < model.A_init_min <= model.A_init_max (got {self.A_init_min}, "
                              f"{self.A_init_max})")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"need 0 < model.dt_min <= model.dt_max (got {self.dt_min}, {self.dt_max})")
        check_choice(self, "ssm_impl", SSM_IMPLS)

    @property
    def d_inner(self) -> int:
        """Channels through the SSM."""
        return self.expand * self.dim

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the conv: x, B and C."""
        return self.d_inner + 2 * self.n_groups * self.d_state


# ---------------------------------------------------------------- the fused kernels (optional extra `mamba`, CUDA)


@functools.cache
def _kernels() -> Optional[tuple]:
    """(mamba_chunk_scan_combined, causal_conv1d_fn or None), or None when mamba_ssm is not installed. Imported on
    first use only: mamba_ssm pulls in triton and CUDA extensions."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        causal_conv1d_fn = None
    return mamba_chunk_scan_combined, causal_conv1d_fn


def use_kernels(ssm_impl: str, device: torch.device) -> bool:
    """auto: the mamba_ssm kernels on CUDA when installed, else the PyTorch scan; torch: always the PyTorch scan;
    mamba_ssm: the kernels or an error."""
    if ssm_impl == "torch":
        return False
    if ssm_impl == "mamba_ssm":
        if device.type != "cuda":
            raise LinguaError(f"model.ssm_impl=mamba_ssm runs only on CUDA (got {device.type}): use ssm_impl=auto")
        require("mamba_ssm", "mamba")
        return True
    return device.type == "cuda" and _kernels() is not None


# ---------------------------------------------------------------- the blocks


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) * weight over groups of d_inner // n_groups channels, in fp32 (mamba_ssm's RMSNormGated
    with norm_before_gate=False): the gate z comes from in_proj, next to the SSM input."""

    def __init__(self, dim: int, n_groups: int, eps: float):
        super().__init__()
        self.n_groups, self.eps = n_groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (y.float() * F.silu(z.float())).unflatten(-1, (self.n_groups, -1))  # (..., n_groups, dim // n_groups)
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (h * self.weight.float()).type_as(y)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class Mamba2Mixer(nn.Module):
    def __init__(self, args: MambaArgs):
        super().__init__()
        self.args = args
        self.d_inner, self.n_heads, self.conv_dim = args.d_inner, args.n_heads, args.conv_dim
        # one projection for all of [z (gate) | x | B | C | dt], in mamba_ssm's order
        self.in_proj = nn.Linear(args.dim, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, args.d_conv))  # nn.Conv1d's (channels, 1, width)
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))  # softplus(dt + dt_bias): each head's step size
        self.A_log = nn.Parameter(torch.empty(self.n_heads))  # A = -exp(A_log) < 0: each head's decay rate
        self.D = nn.Parameter(torch.empty(self.n_heads))  # skip connection around the SSM
        self.norm = GatedRMSNorm(self.d_inner, args.n_groups, args.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, args.dim, bias=False)

    def forward(self, u: torch.Tensor, tok_idx: Optional[torch.Tensor] = None,
                cache: Optional["LayerMambaCache"] = None) -> torch.Tensor:
        """u: (bs, seqlen, dim) -> (bs, seqlen, dim). tok_idx: positions inside documents (state resets at 0), or
        None (one document per row). cache: decoding; the state continues from it and is updated in place."""
        bs, seqlen, _ = u.shape
        a = self.args
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        A = -torch.exp(self.A_log.float())  # (n_heads,)
        if cache is None and use_kernels(a.ssm_impl, u.device):
            y, x = self._kernel_scan(xBC, dt, A, tok_idx)
        else:
            if cache is not None:  # left padding: zero inputs and step sizes keep state and conv buffer at zero
                xBC = xBC * cache.real[..., None].to(xBC.dtype)
            xBC, conv_state = causal_conv(xBC, self.conv_weight, self.conv_bias, tok_idx,
                                          None if cache is None else cache.conv)
            x, B, C = F.silu(xBC).split([self.d_inner, a.n_groups * a.d_state, a.n_groups * a.d_state], dim=-1)
            x = x.unflatten(-1, (self.n_heads, a.head_dim))  # (bs, seqlen, n_heads, head_dim)
            B, C = (t.unflatten(-1, (a.n_groups, a.d_state)) for t in (B, C))  # (bs, seqlen, n_groups, d_state)
            dt = F.softplus(dt.float() + self.dt_bias.float())  # (bs, seqlen, n_heads)
            if cache is None:
                reset = None if tok_idx is None else tok_idx == 0
                with torch.autocast(u.device.type, enabled=False):  # the scan's exp/cumsum need fp32
                    y, _ = ssd_chunked(x, dt, A, B, C, a.chunk_size, reset)
            else:
                dt = dt * cache.real[..., None]
                if seqlen == 1:  # decoding: the recurrent step
                    y, state = ssd_step(cache.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
                    y = y[:, None]
                else:  # prefill: the chunked scan, started from (and ending in) the cached state
                    y, state = ssd_chunked(x, dt, A, B, C, a.chunk_size, initial_state=cache.ssm)
                cache.ssm, cache.conv = state, conv_state
        y = y + x.float() * self.D.float()[:, None]  # (bs, seqlen, n_heads, head_dim)
        y = self.norm(y.flatten(-2).to(u.dtype), z)  # (bs, seqlen, d_inner)
        return self.out_proj(y)  # (bs, seqlen, dim)

    def _kernel_scan(self, xBC, dt, A, tok_idx):
        """The same mixer core through mamba_ssm's Triton scan (and causal_conv1d's CUDA conv when installed);
        documents are told apart by seq_idx, their number in the row."""
        a = self.args
        scan, conv1d = _kernels()
        seq_idx = None
        if tok_idx is not None:
            seq_idx = (torch.cumsum(tok_idx == 0, dim=1) - 1).clamp(min=0).to(torch.int32).contiguous()
        if conv1d is not None:
            xBC = conv1d(xBC.contiguous().transpose(1, 2), self.conv_weight, self.conv_bias, seq_idx=seq_idx,
                         activation="silu").transpose(1, 2)
        else:
            xBC = F.silu(causal_conv(xBC, self.conv_weight, self.conv_bias, tok_idx)[0])
        x, B, C = xBC.split([self.d_inner, a.n_groups * a.d_state, a.n_groups * a.d_state], dim=-1)
        x = x.unflatten(-1, (self.n_heads, a.head_dim))
        B, C = B.unflatten(-1, (a.n_groups, a.d_state)), C.unflatten(-1, (a.n_groups, a.d_state))
        y = scan(x, dt, A, B, C, a.chunk_size, D=None, dt_bias=self.dt_bias, dt_softplus=True, seq_idx=seq_idx)
        return y, x

    def init_weights(self, init_base_std: Optional[float], n_layers: int, factor: float = 1.0):
        a = self.args
        trunc_normal_(self.in_proj.weight, init_base_std or a.dim**-0.5)
        # residual output projections scaled down by depth, as mamba_ssm does (GPT-2's 1/sqrt(2 * n_layers)),
        # and by model.init_std_factor's `factor` on top
        init_output_(self.out_proj.weight, (init_base_std or self.d_inner**-0.5) / math.sqrt(2 * n_layers) / factor)
        bound = a.d_conv**-0.5  # nn.Conv1d's default for a depthwise conv (fan_in = width)
        for p in (self.conv_weight, self.conv_bias):
            uniform_(p, -bound, bound)

        def dt_bias(block, gen):  # dt log-uniform in [dt_min, dt_max]; dt_bias = softplus^-1(dt)
            lo, hi = math.log(a.dt_min), math.log(a.dt_max)
            dt = torch.exp(block.uniform_(0, 1, generator=gen) * (hi - lo) + lo).clamp(min=a.dt_init_floor)
            block.copy_(dt + torch.log(-torch.expm1(-dt)))

        init_shard_(self.dt_bias, dt_bias)
        init_shard_(self.A_log, lambda block, gen: block.copy_(
            block.uniform_(a.A_init_min, a.A_init_max, generator=gen).log()))
        nn.init.ones_(self.D)
        self.norm.reset_parameters()


class MambaBlock(nn.Module):
    def __init__(self, args: MambaArgs):
        super().__init__()
        self.mixer_norm = RMSNorm(args.dim, args.norm_eps)
        self.mixer = Mamba2Mixer(args)
        if args.mlp:
            self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
            self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args.dim, args.multiple_of,
                                                                     args.ffn_dim_multiplier))

    def forward(self, x, tok_idx=None, cache: Optional["LayerMambaCache"] = None) -> torch.Tensor:
        h = x + self.mixer(self.mixer_norm(x), tok_idx, cache)  # pre-norm residual
        if hasattr(self, "feed_forward"):
            h = h + self.feed_forward(self.ffn_norm(h))
        return h

    def init_weights(self, init_base_std: Optional[float], n_layers: int, factor: float = 1.0):
        self.mixer_norm.reset_parameters()
        self.mixer.init_weights(init_base_std, n_layers, factor)
        if hasattr(self, "feed_forward"):
            self.ffn_norm.reset_parameters()
            self.feed_forward.init_weights(init_base_std, math.sqrt(2 * n_layers) * factor)


# ---------------------------------------------------------------- the recurrent cache (inference only)


class MambaCache:
    """What decoding carries instead of a KV cache: per layer, the SSM state (bs, n_heads, head_dim, d_state) in fp32
    and the conv's last d_conv - 1 inputs (bs, d_conv - 1, conv_dim). Constant size, whatever the length.

    Prompts are left-padded (`pad[b]` slots at the start of row b): at padding slots the mixer zeroes its conv input
    and its step size, so state and conv buffer stay exactly zero until the row's first real token, which then starts
    from the same zero state as an unpadded prompt. `len` counts the slots consumed (the same for every row)."""

    def __init__(self, args: MambaArgs, bs: int, max_len: int, pad=None, device=None, dtype=torch.float32):
        if max_len > args.max_seqlen:
            raise LinguaError(f"generation of {max_len} tokens exceeds model.max_seqlen={args.max_seqlen}")
        self.ssm = [torch.zeros(bs, args.n_heads, args.head_dim, args.d_state, device=device, dtype=torch.float32)
                    for _ in range(args.n_layers)]
        self.conv = [torch.zeros(bs, args.d_conv - 1, args.conv_dim, device=device, dtype=dtype)
                     for _ in range(args.n_layers)]
        pad = torch.zeros(bs, dtype=torch.long) if pad is None else torch.as_tensor(pad, dtype=torch.long)
        self.pad = pad.to(device)  # (bs,)
        self.max_len = max_len
        self.len = 0
        self.real = None  # (bs, seqlen) bool for the tokens of the current forward: not padding

    def start(self, seqlen: int) -> None:
        if self.len + seqlen > self.max_len:
            raise LinguaError(f"cache is full: {self.len} + {seqlen} tokens > {self.max_len}")
        slots = torch.arange(self.len, self.len + seqlen, device=self.pad.device)
        self.real = slots[None, :] >= self.pad[:, None]

    def layer(self, i: int) -> "LayerMambaCache":
        return LayerMambaCache(self, i)


class LayerMambaCache:
    """One layer's view of a MambaCache: its states, read and replaced by the mixer."""

    def __init__(self, cache: MambaCache, i: int):
        self.cache, self.i = cache, i

    real = property(lambda self: self.cache.real)
    ssm = property(lambda self: self.cache.ssm[self.i], lambda self, v: self.cache.ssm.__setitem__(self.i, v))
    conv = property(lambda self: self.cache.conv[self.i], lambda self, v: self.cache.conv.__setitem__(self.i, v))


# ---------------------------------------------------------------- the model


class Mamba(Decoder):
    block_cls = MambaBlock

    def block_inputs(self, tokens, tok_idx, cache) -> tuple:
        """(tok_idx,): the SSM state restarts and the conv reads nothing from before where tok_idx == 0. Decoding
        marks the cache's left padding instead (tok_idx is None then)."""
        if cache is not None:
            cache.start(tokens.shape[1])
            return (None,)
        return (tok_idx,)

    def make_cache(self, bs: int, max_len: int, pad=None, device=None, dtype=torch.float32) -> MambaCache:
        """The generator's inference state (lingua.eval.generate): recurrent states instead of keys and values."""
        return MambaCache(self.args, bs, max_len, pad, device, dtype)

    def init_block(self, depth: int, block: nn.Module) -> None:
        block.init_weights(self.args.init_base_std, self.args.n_layers, self.residual_factor(depth, self.args.n_layers))


# ---------------------------------------------------------------- counting


def flops_per_token(args: MambaArgs, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as lingua counts the transformer: 6 per matmul
    weight (in_proj, out_proj, MLP, the output projection) plus the scan. Forward scan per layer and token, with
    Q = min(chunk_size, seq_len): C.B scores 2*Q*n_groups*d_state, scores x inputs 2*Q*d_inner, the chunk states and
    reading the carried state 2*d_inner*d_state each. Elementwise work (conv, norms, gates) is left out."""
    d_inner, n_heads, conv_dim = args.d_inner, args.n_heads, args.conv_dim
    per_layer = args.dim * (d_inner + conv_dim + n_heads) + d_inner * args.dim
    if args.mlp:
        per_layer += 3 * args.dim * ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    matmul = args.n_layers * per_layer + args.vocab_size * args.dim
    Q = min(args.chunk_size, seq_len)
    scan = 2 * Q * args.n_groups * args.d_state + 2 * Q * d_inner + 4 * d_inner * args.d_state
    return 6 * matmul + 3 * args.n_layers * scan


MAMBA_SPEC = ModelSpec(name="mamba", path="apps.mamba.model:MAMBA_SPEC", args_cls=MambaArgs, build=Mamba,
                       flops_per_token=flops_per_token, hf=mamba2_mapping(MambaArgs))
