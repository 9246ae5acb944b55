"""Attention kernels and masks: SDPA, flex_attention and xformers behind one `attend`.

The transformer (lingua/models/transformer/model.py) calls `attention_mask` once per forward and `attend` in every block. Keeping
them here leaves the model file to read like the paper; decoding with a KV cache is lingua/models/kv_cache.py.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from lingua.errors import LinguaError, require
from lingua.kernels.cpu_attention import CausalAttention, use_matmul_backward


def document_ids(tok_idx: torch.Tensor) -> torch.Tensor:
    """(bs, seqlen) positions inside documents -> (bs, seqlen) document number: a new document starts at 0."""
    return torch.cumsum(tok_idx == 0, dim=1)


def attention_mask(attn_impl: str, tok_idx: Optional[torch.Tensor], bs: int, seqlen: int, device):
    """What `attend` needs to mask, built once per forward and shared by every layer.

    tok_idx None: plain causal. Otherwise block-causal: a token attends to earlier tokens of its own document.
    sdpa: None (is_causal) or a bool (bs, 1, seqlen, seqlen) mask, True = may attend; flex_attention: a BlockMask;
    xformers: the lengths of the causal segments once the batch is flattened into one sequence."""
    if attn_impl == "sdpa":
        if tok_idx is None:
            return None  # is_causal=True lets every fused kernel run, including CUDA flash which takes no mask
        docs = document_ids(tok_idx)  # (bs, seqlen)
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
        return ((docs[:, :, None] == docs[:, None, :]) & causal).unsqueeze(1)  # (bs, 1, seqlen, seqlen)
    if attn_impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        if tok_idx is None:
            return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, seqlen, seqlen, device=device)
        docs = document_ids(tok_idx)
        return create_block_mask(
            lambda b, h, q, kv: (docs[b, q] == docs[b, kv]) & (q >= kv), bs, None, seqlen, seqlen, device=device
        )
    starts = torch.zeros(bs, seqlen, dtype=torch.bool) if tok_idx is None else (tok_idx == 0).cpu()
    starts[:, 0] = True
    bounds = starts.flatten().nonzero().flatten().tolist() + [bs * seqlen]
    return [end - start for start, end in zip(bounds, bounds[1:])]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bs, seqlen, n_kv_heads, head_dim) -> (bs, seqlen, n_kv_heads * n_rep, head_dim): each KV head serves n_rep
    query heads (grouped-query attention)."""
    if n_rep == 1:
        return x
    bs, seqlen, n_kv_heads, head_dim = x.shape
    return x[:, :, :, None, :].expand(bs, seqlen, n_kv_heads, n_rep, head_dim).reshape(bs, seqlen, -1, head_dim)


def sdpa_inputs(xq, xk, xv, mask):
    """The exact (q, k, v, attn_mask, is_causal) lingua hands to F.scaled_dot_product_attention; attention_report
    asks torch which kernel it picks for these same tensors."""
    # Repeat KV heads instead of enable_gqa=True: on CUDA the memory-efficient kernel, the only fused one that takes
    # the block_causal mask, rejects grouped-query inputs, so enable_gqa would silently fall back to the math kernel.
    n_rep = xq.shape[2] // xk.shape[2]
    xk, xv = repeat_kv(xk, n_rep), repeat_kv(xv, n_rep)
    q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # (bs, n_heads, seqlen, head_dim)
    return q, k, v, mask, mask is None


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # uncompiled, flex materialises the full score matrix


def attend(xq, xk, xv, mask, attn_impl: str, cpu_backward: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + mask) v with the configured kernel.

    xq: (bs, seqlen, n_heads, head_dim); xk, xv: (bs, seqlen, n_kv_heads, head_dim); mask from `attention_mask`;
    cpu_backward: model.cpu_attn_backward (lingua/kernels/cpu_attention.py). Returns (bs, seqlen, n_heads, head_dim)."""
    if attn_impl == "sdpa":
        q, k, v, attn_mask, is_causal = sdpa_inputs(xq, xk, xv, mask)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        if use_matmul_backward(cpu_backward, q, dtype):
            # SDPA casts its inputs under autocast; the aten op underneath does not
            return CausalAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal).transpose(1, 2)
    if attn_impl == "flex_attention":
        if xq.device.type == "cpu" and torch.is_grad_enabled() and xq.requires_grad:
            raise LinguaError(
                f"model.attn_impl=flex_attention has no backward on CPU (torch {torch.__version__}): "
                "train with model.attn_impl=sdpa, or run flex_attention under torch.no_grad() for inference"
            )
        from torch.nn.attention.flex_attention import flex_attention

        fn = flex_attention if xq.device.type == "cpu" else _compiled_flex_attention()
        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # (bs, n_heads or n_kv_heads, seqlen, head_dim)
        return fn(q, k, v, block_mask=mask, enable_gqa=True).transpose(1, 2)
    if xq.device.type != "cuda":
        raise LinguaError(f"model.attn_impl=xformers runs only on CUDA (got {xq.device.type}): use attn_impl=sdpa")
    memory_efficient_attention = require("xformers.ops", "gpu").memory_efficient_attention
    BlockDiagonalCausalMask = require("xformers.ops.fmha.attn_bias", "gpu").BlockDiagonalCausalMask
    bs, seqlen, n_heads, head_dim = xq.shape
    n_rep = n_heads // xk.shape[2]
    # one flattened sequence of causal segments covers both masks: causal is one segment per batch row
    q, k, v = (t.reshape(1, bs * seqlen, n_heads, head_dim) for t in (xq, repeat_kv(xk, n_rep), repeat_kv(xv, n_rep)))
    out = memory_efficient_attention(q, k, v, attn_bias=BlockDiagonalCausalMask.from_seqlens(mask))
    return out.view(bs, seqlen, n_heads, head_dim)
