"""Causal attention for compiled bf16 training on CPU: aten's fused flash forward, a backward written as matmuls.

aten's CPU flash-attention backward is ~5x its own forward and runs at a few percent of the bf16 matmul peak. The
backward here recomputes the attention probabilities from the forward's log-sum-exp in two query halves (the first
half sees only the first half of the keys, so a quarter of the score matrix is never computed) and leaves the
elementwise work around the batched matmuls to inductor. `model.cpu_attn_backward: auto` takes it where it was
measured faster (README "Training throughput"): bf16 on an AMX CPU, under torch.compile, sequences up to
MAX_AUTO_SEQLEN.
"""

from typing import Optional

import torch

from lingua.distributed.precision import cpu_bf16_features

MAX_AUTO_SEQLEN = 1024  # measured faster at 256, 512 and 1024; beyond, [bs, heads, seqlen/2, seqlen] gets large
CPU_ATTN_BACKWARDS = ("auto", "aten", "matmul")
AMX = "AMX-BF16" in cpu_bf16_features()  # read once here: torch.compile cannot trace the CPU feature query


def use_matmul_backward(choice: str, q: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `attend` should run CausalAttention: choice is model.cpu_attn_backward, q the (bs, heads, seqlen,
    head_dim) queries, dtype the one attention computes in (the autocast dtype where autocast is on)."""
    if choice == "aten" or q.device.type != "cpu" or not (torch.is_grad_enabled() and q.requires_grad):
        return False
    if choice == "matmul":
        return True
    # eager, its ~20 small ops a layer lose to aten's one kernel
    return torch.compiler.is_compiling() and _auto_takes_matmul(dtype, q.shape[-2])


def _auto_takes_matmul(dtype: torch.dtype, seqlen: int) -> bool:
    # measured on an AMX CPU only; in fp32 it was no faster
    return dtype == torch.bfloat16 and seqlen <= MAX_AUTO_SEQLEN and AMX


def backward_plan(choice: str, dtype: torch.dtype, seqlen: int) -> str:
    """In words, which backward CPU training runs with model.cpu_attn_backward=choice ('' for aten's own kernel)."""
    if choice == "matmul":
        return "matmul backward (lingua/kernels/cpu_attention.py, model.cpu_attn_backward=matmul)"
    if choice == "auto" and _auto_takes_matmul(dtype, seqlen):
        return "under torch.compile: matmul backward (lingua/kernels/cpu_attention.py, model.cpu_attn_backward=auto)"
    return ""


def _block_grads(q, k, v, o, lse, do, allowed, scale):
    """(dq, dk, dv) of one query block: q, o, lse, do hold the block's queries, k, v the keys the block can see,
    allowed (bs or 1, 1, queries, keys) which of those each query attends to."""
    s = (q @ k.transpose(-1, -2)).float() * scale
    p = torch.exp(s - lse.unsqueeze(-1)).masked_fill(~allowed, 0)  # the forward's probabilities, recomputed
    dv = p.to(q.dtype).transpose(-1, -2) @ do
    dp = (do @ v.transpose(-1, -2)).float()
    delta = (do.float() * o.float()).sum(-1, keepdim=True)  # = rowsum(p * dp), the softmax's Jacobian term
    ds = (p * (dp - delta) * scale).to(q.dtype)
    return ds @ k, ds.transpose(-1, -2) @ q, dv


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(head_dim)) v over the allowed positions.

    q, k, v: (bs, n_heads, seqlen, head_dim), one dtype; mask None (causal) or bool (bs, 1, seqlen, seqlen),
    True = may attend, already causal (lingua.kernels.attention.attention_mask)."""

    @staticmethod
    def forward(ctx, q, k, v, mask: Optional[torch.Tensor]):
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        # is_causal as well as the mask: the kernel then skips the blocks above the diagonal
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, attn_mask=bias)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        seqlen, scale = q.shape[-2], q.shape[-1] ** -0.5
        allowed = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril() if mask is None else mask
        dq = []
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))  # summed over blocks
        half = (seqlen + 1) // 2
        for start, end in ((0, half), (half, seqlen)):  # faster than blocks of 64 queries, of a quarter or of all
            if start == end:
                continue
            bq, bk, bv = _block_grads(q[..., start:end, :], k[..., :end, :], v[..., :end, :], o[..., start:end, :],
                                      lse[..., start:end], do[..., start:end, :], allowed[..., start:end, :end],
                                      scale)
            dq.append(bq)
            dk[..., :end, :] += bk
            dv[..., :end, :] += bv
        return torch.cat(dq, dim=-2), dk.to(k.dtype), dv.to(v.dtype), None
