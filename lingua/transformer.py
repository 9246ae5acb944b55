"""A Llama-style decoder-only transformer, in reading order: args, RoPE, masks, attention, KV cache, feed-forward,
block, model.

Plain PyTorch: no ranks, no meshes. Parallelism (FSDP, TP, activation checkpointing, compile) is applied from outside,
block by block over `model.layers`. Build on the meta device, then `to_empty` + `init_weights()` (see `build_model`).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua.attention import (  # noqa: F401  (document_ids, repeat_kv, sdpa_inputs: re-exported for callers)
    KVCache,
    LayerKVCache,
    attend,
    attend_cached,
    attention_mask,
    document_ids,
    repeat_kv,
    sdpa_inputs,
)
from lingua.errors import ConfigError, LinguaError

ATTN_IMPLS = ("sdpa", "flex_attention", "xformers")
MASKS = ("causal", "block_causal")
INIT_STD_FACTORS = ("disabled", "current_depth", "global_depth", "dim_ratio")


@dataclass
class BaseTransformerArgs:
    dim: int = 512
    n_layers: int = 8
    head_dim: Optional[int] = None  # set head_dim or n_heads; the other is dim // it
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None  # None: n_heads (multi-head); fewer: grouped-query attention
    ffn_dim_multiplier: Optional[float] = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_base_std: Optional[float] = None  # None: dim ** -0.5
    init_std_factor: str = "disabled"  # disabled | current_depth | global_depth | dim_ratio
    max_seqlen: int = 1024
    attn_impl: str = "sdpa"  # sdpa | flex_attention | xformers
    mask: str = "causal"  # causal | block_causal (packed documents attend only within themselves)


@dataclass
class TransformerArgs(BaseTransformerArgs):
    vocab_size: int = -1
    weight_tying: bool = False
    seed: int = 42  # seeds init_weights in build_model


def check_args(args: BaseTransformerArgs) -> tuple[int, int, int]:
    """Validate the args; return the resolved (n_heads, n_kv_heads, head_dim) as lingua derives them."""
    for key in ("dim", "n_layers", "max_seqlen", "multiple_of"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"model.{key} must be > 0 (got {getattr(args, key)})")
    for key in ("n_heads", "head_dim", "n_kv_heads"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ConfigError(f"model.{key} must be > 0 (got {getattr(args, key)})")
    if args.n_heads is None and args.head_dim is None:
        raise ConfigError("set model.n_heads or model.head_dim (both are null)")
    if args.head_dim is None and args.dim % args.n_heads:
        raise ConfigError(f"model.n_heads={args.n_heads} does not divide model.dim={args.dim}")
    if args.n_heads is None and args.dim % args.head_dim:
        raise ConfigError(f"model.head_dim={args.head_dim} does not divide model.dim={args.dim}")
    head_dim = args.head_dim or args.dim // args.n_heads
    n_heads = args.n_heads or args.dim // args.head_dim
    n_kv_heads = args.n_kv_heads or n_heads
    if n_heads % n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={n_kv_heads} does not divide model.n_heads={n_heads}")
    if head_dim % 2:
        raise ConfigError(f"model.head_dim={head_dim} must be even for RoPE")
    for key, allowed in (("attn_impl", ATTN_IMPLS), ("mask", MASKS), ("init_std_factor", INIT_STD_FACTORS)):
        if getattr(args, key) not in allowed:
            raise ConfigError(f"model.{key}={getattr(args, key)!r} is not one of {', '.join(allowed)}")
    return n_heads, n_kv_heads, head_dim


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim (same parameters as a 4*dim GELU MLP), scaled, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


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


def _trunc_normal_(weight: torch.Tensor, std: float):
    """Truncated normal at +-3 std, drawn so that the values do not depend on how `weight` is sharded: the model is
    initialised after FSDP/TP sharding and must equal the model initialised whole (see lingua.distributed.init_shard_)."""
    from lingua.distributed import init_shard_

    init_shard_(weight, lambda block, gen: nn.init.trunc_normal_(block, 0.0, std, -3 * std, 3 * std, generator=gen))


def next_token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with an fp32 softmax over the vocab; a (bs, seqlen, n_views - 1) target scores view 0 (t+1)."""
    if target.dim() == 3:
        target = target[..., 0]
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(0, 1))


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich), computed in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int, n_heads: int, n_kv_heads: int, attn_impl: str):
        super().__init__()
        self.dim, self.head_dim, self.attn_impl = dim, head_dim, attn_impl
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x, freq_cos, freq_sin, mask, cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        """x: (bs, seqlen, dim); freq_cos/sin: each token's RoPE angles; mask: from `attention_mask`, or from
        `KVCache.positions_and_mask` when decoding with a cache."""
        bs, seqlen, _ = x.shape
        # -1 heads, not n_heads: tensor parallelism shards wq/wk/wv by columns, leaving fewer heads on each rank
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_local_heads, head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_local_kv_heads, head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)  # (bs, seqlen, n_local_kv_heads, head_dim)
        xq, xk = apply_rope(xq, freq_cos, freq_sin), apply_rope(xk, freq_cos, freq_sin)
        if cache is None:
            out = attend(xq, xk, xv, mask, self.attn_impl)  # (bs, seqlen, n_local_heads, head_dim)
        else:
            keys, values = cache.update(xk, xv)  # (bs, n_local_kv_heads, cached + seqlen, head_dim)
            out = attend_cached(xq, keys, values, mask)  # (bs, seqlen, n_local_heads, head_dim)
        return self.wo(out.reshape(bs, seqlen, -1))  # (bs, seqlen, dim)

    def init_weights(self, init_base_std: Optional[float], factor: float):
        std = init_base_std or self.dim**-0.5
        for w in (self.wq, self.wk, self.wv):
            _trunc_normal_(w.weight, std)
        _trunc_normal_(self.wo.weight, std / factor)  # output projections feed the residual: scaled by depth


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (bs, seqlen, hidden_dim) inside, (bs, seqlen, dim) out

    def init_weights(self, init_base_std: Optional[float], factor: float):
        in_std = init_base_std or self.dim**-0.5
        for w in (self.w1, self.w3):
            _trunc_normal_(w.weight, in_std)
        _trunc_normal_(self.w2.weight, (init_base_std or self.hidden_dim**-0.5) / factor)


class TransformerBlock(nn.Module):
    def __init__(self, args: BaseTransformerArgs):
        super().__init__()
        n_heads, n_kv_heads, head_dim = check_args(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args.dim, head_dim, n_heads, n_kv_heads, args.attn_impl)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier))

    def forward(self, x, freq_cos, freq_sin, mask, cache: Optional[LayerKVCache] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freq_cos, freq_sin, mask, cache)  # pre-norm residual
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, init_base_std: Optional[float], factor: float):
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(init_base_std, factor)
        self.feed_forward.init_weights(init_base_std, factor)


def depth_factor(init_std_factor: str, depth: int, n_layers: int, dim: int) -> float:
    """What layer `depth` (0-based) divides its residual output projections' std by (lingua's InitStdFactor)."""
    return {
        "disabled": 1.0,
        "current_depth": (2 * (depth + 1)) ** 0.5,
        "global_depth": (2 * (n_layers + 1)) ** 0.5,
        "dim_ratio": dim / 4096,
    }[init_std_factor]


class Transformer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        _, _, head_dim = check_args(args)
        if args.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be > 0 (got {args.vocab_size}): set it to the tokenizer's")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.weight_tying:
            self.output.weight = self.tok_embeddings.weight  # one matrix to read tokens in and write them out
        freq_cos, freq_sin = rope_frequencies(head_dim, args.max_seqlen, args.rope_theta)
        # not persistent: derived from args, recomputed by init_weights (a meta-device build leaves them empty)
        self.register_buffer("freq_cos", freq_cos, persistent=False)
        self.register_buffer("freq_sin", freq_sin, persistent=False)

    def forward(self, tokens: torch.Tensor, target=None, tok_idx=None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """tokens, target, tok_idx: int64 (bs, seqlen). Logits (bs, seqlen, vocab_size), or the mean loss if target.

        With a `cache` (inference): tokens are the next `seqlen` tokens of every row (the left-padded prompts, then one
        token per step); positions and mask come from the cache, tok_idx must be None, and the cache advances."""
        if cache is not None:
            return self._forward_cached(tokens, cache)
        bs, seqlen = tokens.shape
        if seqlen > self.args.max_seqlen:
            raise LinguaError(f"sequence length {seqlen} exceeds model.max_seqlen={self.args.max_seqlen}")
        if tok_idx is None:
            freq_cos, freq_sin = self.freq_cos[:seqlen], self.freq_sin[:seqlen]  # (seqlen, head_dim // 2)
        else:  # packed documents restart their positions
            freq_cos, freq_sin = self.freq_cos[tok_idx], self.freq_sin[tok_idx]  # (bs, seqlen, head_dim // 2)
        doc_idx = tok_idx if self.args.mask == "block_causal" else None
        mask = attention_mask(self.args.attn_impl, doc_idx, bs, seqlen, tokens.device)
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        for layer in self.layers:
            h = layer(h, freq_cos, freq_sin, mask)
        logits = self.output(self.norm(h))  # (bs, seqlen, vocab_size)
        if target is None:
            return logits
        return next_token_loss(logits, target)

    def _forward_cached(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        positions, mask = cache.positions_and_mask(tokens.shape[1])  # (bs, seqlen), (bs, 1, seqlen, kv_len)
        freq_cos, freq_sin = self.freq_cos[positions], self.freq_sin[positions]  # (bs, seqlen, head_dim // 2)
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, freq_cos, freq_sin, mask, cache.layer(i))
        cache.len += tokens.shape[1]
        return self.output(self.norm(h))  # (bs, seqlen, vocab_size)

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialise every parameter and buffer in place; call after `to_empty`. Seed the RNG first for a
        reproducible init (build_model uses args.seed). Truncated normals at +-3 std; std = init_base_std or
        dim ** -0.5 (hidden_dim ** -0.5 for w2), residual output projections divided by `depth_factor`."""
        args = self.args
        if args.weight_tying:  # to_empty materialises each parameter separately, which unties them
            self.output.weight = self.tok_embeddings.weight
        _, _, head_dim = check_args(args)
        freq_cos, freq_sin = rope_frequencies(head_dim, args.max_seqlen, args.rope_theta, self.freq_cos.device)
        self.freq_cos.copy_(freq_cos)
        self.freq_sin.copy_(freq_sin)
        std = args.init_base_std or args.dim**-0.5
        _trunc_normal_(self.tok_embeddings.weight, std)
        for depth, layer in enumerate(self.layers):
            layer.init_weights(args.init_base_std, depth_factor(args.init_std_factor, depth, args.n_layers, args.dim))
        self.norm.reset_parameters()
        if not args.weight_tying:
            _trunc_normal_(self.output.weight, std)

    def reset_parameters(self):
        self.init_weights()


def build_model(args: TransformerArgs, device="cpu") -> Transformer:
    """Construct on the meta device (no memory, no wasted init), materialise on `device`, init with args.seed."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(args.seed)
        model.init_weights()
    return model


# ---------------------------------------------------------------- counting


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Parameters, each counted once (a tied output projection is the embedding table). exclude_embedding drops the
    token embedding table, and with it a tied output projection."""
    n = sum(p.numel() for p in model.parameters())
    return n - model.tok_embeddings.weight.numel() if exclude_embedding else n


def flops_per_token(args: TransformerArgs, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), the nanoGPT / PaLM (appendix B) MFU accounting:

        6 * N  +  12 * n_layers * n_heads * head_dim * seq_len

    N = parameters that take part in a matmul = all parameters (norm weights included, as nanoGPT does) minus the
    embedding table, plus the output projection vocab_size * dim whether or not it is tied (a lookup costs nothing,
    the output projection is a matmul either way). Each such weight costs 2 FLOPs per token forward and 4 backward.
    The attention term is q.k^T and attn.v: 2 * 2 * n_heads * head_dim * seq_len per layer forward, times 3 for
    forward + backward, with no discount for the causal mask (PaLM's convention; real kernels skip about half)."""
    n_heads, n_kv_heads, head_dim = check_args(args)
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    attn = 2 * args.dim * n_heads * head_dim + 2 * args.dim * n_kv_heads * head_dim  # wq, wo; wk, wv
    per_layer = attn + 3 * args.dim * hidden + 2 * args.dim  # + w1, w2, w3 + two norms
    n = args.n_layers * per_layer + args.dim + args.vocab_size * args.dim  # + final norm + output projection
    return 6 * n + 12 * args.n_layers * n_heads * head_dim * seq_len
