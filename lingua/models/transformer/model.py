"""A Llama-style decoder-only transformer, in reading order: args, RoPE, attention, block, model, FLOPs.

    block: h = x + attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h))
    model: lingua.models.decoder.Decoder, whose forward reads embeddings -> blocks -> norm -> output -> loss, with
           these blocks and `block_inputs` (RoPE angles and the mask, computed once per forward)

Attention calls the kernel it holds (lingua/kernels/attention/: SDPA, flex, ..., chosen once when the model is built
and placed); lingua/models/kv_cache.py is the inference cache. Plain PyTorch: no ranks, no meshes; the
tensor-parallel plan for these blocks is lingua/models/transformer/parallelize.py, and the ModelSpec that ties model,
FLOPs, TP plan and HF mapping together is lingua/models/spec.py.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from lingua.errors import ConfigError, LinguaError
from lingua.kernels.attention import (
    ATTN_BACKWARDS,
    ATTN_IMPLS,
    AttentionKernel,
    unplaced_kernel,
)
from lingua.models.decoder import Decoder, DecoderArgs, check_choice, check_positive
from lingua.models.init import trunc_normal_
from lingua.models.kv_cache import KVCache, LayerKVCache
from lingua.models.layers import (
    MLPS,
    RMSNorm,
    build_mlp,
    ffn_hidden_dim,
    init_output_,
    linear_group,
)

MASKS = ("causal", "block_causal")
DEFAULT_HEAD_DIM = 64  # when neither n_heads nor head_dim is set


class Heads(NamedTuple):
    """The attention's head layout, resolved from model.n_heads / head_dim / n_kv_heads (any of which may be unset)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass
class TransformerArgs(DecoderArgs):
    """Derived: `heads` (the resolved Heads) and `ffn_dim` (the feed-forward width)."""

    head_dim: Optional[int] = None  # set head_dim or n_heads (the other is dim // it); neither: heads of 64 dims
    n_heads: Optional[int] = None  # query heads; the resolved count is `args.heads.n_heads`
    n_kv_heads: Optional[int] = None  # None: n_heads (multi-head); fewer: grouped-query attention
    ffn_dim_multiplier: Optional[float] = None  # scales the feed-forward width before rounding to multiple_of
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    rope_theta: float = 10000.0  # RoPE base period
    attn_impl: str = "auto"  # auto | sdpa | flex_attention | xformers (auto: flex for block_causal on CUDA, else sdpa)
    attn_backward: str = "auto"  # auto | aten | matmul (lingua/kernels/attention/; auto: times both where they differ)
    mask: str = "causal"  # causal | block_causal (packed documents attend only within themselves)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before RoPE (OLMo 2, Qwen3, the speedruns)
    mlp: str = "swiglu"  # swiglu | relu2 (w2(relu(w1 x)^2), 4 * dim wide)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "multiple_of", "n_heads", "head_dim", "n_kv_heads")
        for key, allowed in (("attn_impl", ATTN_IMPLS), ("attn_backward", ATTN_BACKWARDS), ("mask", MASKS),
                             ("mlp", MLPS)):
            check_choice(self, key, allowed)
        resolve_heads(self)  # checks the head layout

    @property
    def heads(self) -> Heads:
        return resolve_heads(self)

    @property
    def ffn_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier, self.mlp)


def resolve_heads(args: TransformerArgs) -> Heads:
    n_heads, head_dim = args.n_heads, args.head_dim
    if n_heads is None and head_dim is None:
        n_heads = max(1, args.dim // DEFAULT_HEAD_DIM)
    if head_dim is None and args.dim % n_heads:
        raise ConfigError(f"model.n_heads={n_heads} does not divide model.dim={args.dim}")
    if n_heads is None and args.dim % head_dim:
        raise ConfigError(f"model.head_dim={head_dim} does not divide model.dim={args.dim}")
    head_dim = head_dim or args.dim // n_heads
    n_heads = n_heads or args.dim // head_dim
    n_kv_heads = args.n_kv_heads or n_heads
    if n_heads % n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={n_kv_heads} does not divide model.n_heads={n_heads}")
    if head_dim % 2:
        raise ConfigError(f"model.head_dim={head_dim} must be even for RoPE")
    return Heads(n_heads, n_kv_heads, head_dim)


# ---------------------------------------------------------------- rotary position embeddings (RoFormer, Su et al.)


def rope_frequencies(head_dim: int, max_seqlen: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/head_dim), each (max_seqlen, head_dim // 2), fp32.

    Real cos/sin rather than complex numbers: they work on every device and dtype and with DTensor."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seqlen, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of x by its position's angle, so q.k depends only on the relative position.

    x: (bs, seqlen, n_heads, head_dim); cos, sin: (seqlen, head_dim // 2) or (bs, seqlen, head_dim // 2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (bs, seqlen, n_heads, head_dim // 2) each
    cos, sin = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (bs, seqlen, n_heads, head_dim // 2, 2)
    return rotated.flatten(-2).type_as(x)


# ---------------------------------------------------------------- the blocks


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int, n_heads: int, n_kv_heads: int, kernel: AttentionKernel,
                 qk_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.dim, self.head_dim, self.n_heads, self.n_kv_heads = dim, head_dim, n_heads, n_kv_heads
        self.kernel = kernel  # replaced once by lingua.kernels.attention.place_attention when the model is placed
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        if qk_norm:  # one weight per head dimension, shared by the heads (as OLMo 2 and Qwen3)
            self.q_norm = RMSNorm(head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim, norm_eps)

    def forward(self, x, freq_cos, freq_sin, mask, cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        """x: (bs, seqlen, dim); freq_cos/sin: each token's RoPE angles; mask: from `self.kernel.mask`, or from
        `KVCache.positions_and_mask` when decoding with a cache."""
        bs, seqlen, _ = x.shape
        # -1 heads, not n_heads: tensor parallelism shards wq/wk/wv by columns, leaving fewer heads on each rank
        xq, xk, xv = (t.view(bs, seqlen, -1, self.head_dim) for t in linear_group(x, self.wq, self.wk, self.wv))
        # xq: (bs, seqlen, n_local_heads, head_dim); xk, xv: (bs, seqlen, n_local_kv_heads, head_dim)
        if hasattr(self, "q_norm"):
            xq, xk = self.q_norm(xq), self.k_norm(xk)
        xq, xk = apply_rope(xq, freq_cos, freq_sin), apply_rope(xk, freq_cos, freq_sin)
        if cache is None:
            out = self.kernel(xq, xk, xv, mask)  # (bs, seqlen, n_local_heads, head_dim)
        else:
            out = cache.attend(xq, xk, xv, mask)  # over every cached position
        return self.wo(out.reshape(bs, seqlen, -1))  # (bs, seqlen, dim)

    def init_weights(self, init_base_std: Optional[float], factor: float):
        std = init_base_std or self.dim**-0.5
        for w in (self.wq, self.wk, self.wv):
            trunc_normal_(w.weight, std)
        init_output_(self.wo.weight, std / factor)  # output projections feed the residual: scaled by depth
        if hasattr(self, "q_norm"):
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()


class TransformerBlock(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        n_heads, n_kv_heads, head_dim = args.heads
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        kernel = unplaced_kernel(args.attn_impl, args.mask, args.attn_backward)
        self.attention = Attention(args.dim, head_dim, n_heads, n_kv_heads, kernel, args.qk_norm, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = build_mlp(args.mlp, args.dim, args.ffn_dim)

    def forward(self, x, freq_cos, freq_sin, mask, cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freq_cos, freq_sin, mask, cache)  # pre-norm residual
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, init_base_std: Optional[float], factor: float):
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(init_base_std, factor)
        self.feed_forward.init_weights(init_base_std, factor)


class Transformer(Decoder):
    block_cls = TransformerBlock

    def __init__(self, args: TransformerArgs, n_blocks: Optional[int] = None):
        super().__init__(args, n_blocks)
        freq_cos, freq_sin = rope_frequencies(args.heads.head_dim, args.max_seqlen, args.rope_theta)
        # not persistent: derived from args, recomputed by init_buffers (a meta-device build leaves them empty)
        self.register_buffer("freq_cos", freq_cos, persistent=False)
        self.register_buffer("freq_sin", freq_sin, persistent=False)
        self.kernel = unplaced_kernel(args.attn_impl, args.mask, args.attn_backward)  # builds the mask (per forward)

    def block_inputs(self, tokens, tok_idx, cache) -> tuple:
        """(freq_cos, freq_sin, mask): each token's RoPE angles and the attention mask, shared by every block."""
        if cache is not None:  # decoding: positions and mask follow the cache's left padding
            positions, mask = cache.positions_and_mask(tokens.shape[1])  # (bs, seqlen), (bs, 1, seqlen, kv_len)
            return self.freq_cos[positions], self.freq_sin[positions], mask  # (bs, seqlen, head_dim // 2) each
        bs, seqlen = tokens.shape
        if tok_idx is None:
            freq_cos, freq_sin = self.freq_cos[:seqlen], self.freq_sin[:seqlen]  # (seqlen, head_dim // 2)
        else:  # packed documents restart their positions
            freq_cos, freq_sin = self.freq_cos[tok_idx], self.freq_sin[tok_idx]  # (bs, seqlen, head_dim // 2)
        doc_idx = tok_idx if self.args.mask == "block_causal" else None
        return freq_cos, freq_sin, self.kernel.mask(doc_idx, bs, seqlen, tokens.device)

    def make_cache(self, bs: int, max_len: int, pad=None, device=None, dtype=torch.float32) -> KVCache:
        _, n_kv_heads, head_dim = self.args.heads
        if max_len > self.args.max_seqlen:
            raise LinguaError(f"KV cache of {max_len} tokens exceeds model.max_seqlen={self.args.max_seqlen}")
        return KVCache(len(self.layers), n_kv_heads, head_dim, bs, max_len, pad, device, dtype)

    def init_buffers(self) -> None:
        a = self.args
        cos, sin = rope_frequencies(a.heads.head_dim, a.max_seqlen, a.rope_theta, self.freq_cos.device)
        self.freq_cos.copy_(cos)
        self.freq_sin.copy_(sin)


# ---------------------------------------------------------------- counting


def flops_per_token(args: TransformerArgs, seq_len: int, n_layers: Optional[int] = None) -> int:
    """Training FLOPs per token (forward + backward), the nanoGPT / PaLM (appendix B) MFU accounting:

        6 * N  +  12 * n_layers * n_heads * head_dim * seq_len

    N = parameters that take part in a matmul = all parameters (norm weights included, as nanoGPT does) minus the
    embedding table, plus the output projection vocab_size * dim whether or not it is tied (a lookup costs nothing,
    the output projection is a matmul either way). Each such weight costs 2 FLOPs per token forward and 4 backward.
    The attention term is q.k^T and attn.v: 2 * 2 * n_heads * head_dim * seq_len per layer forward, times 3 for
    forward + backward, with no discount for the causal mask (PaLM's convention; real kernels skip about half)."""
    n_heads, n_kv_heads, head_dim = args.heads
    n_layers = args.n_layers if n_layers is None else n_layers
    attn = 2 * args.dim * n_heads * head_dim + 2 * args.dim * n_kv_heads * head_dim  # wq, wo; wk, wv
    mlp = (3 if args.mlp == "swiglu" else 2) * args.dim * args.ffn_dim  # w1, w2 (, w3)
    per_layer = attn + mlp + 2 * args.dim + (2 * head_dim if args.qk_norm else 0)  # + the norms
    n = n_layers * per_layer + args.dim + args.vocab_size * args.dim  # + final norm + output projection
    return 6 * n + 12 * n_layers * n_heads * head_dim * seq_len
