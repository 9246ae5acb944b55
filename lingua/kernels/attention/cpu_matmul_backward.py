"""Causal attention for compiled bf16 training on CPU: aten's fused flash forward, a backward written as matmuls.

aten's CPU flash-attention backward is ~5x its own forward and runs at a few percent of the bf16 matmul peak. The
backward here recomputes the attention probabilities from the forward's log-sum-exp in two query halves (the first
half sees only the first half of the keys, so a quarter of the score matrix is never computed) and leaves the
elementwise work around the batched matmuls to inductor. Whether it beats aten's depends on the CPU (it did on AMX):
`model.attn_backward: auto` times both where they can differ, once per machine and shape
(lingua/kernels/attention/measure.py); `matmul` forces it.
"""

from typing import Optional

import torch

from lingua.kernels.attention.sdpa import SDPA, sdpa_inputs


class MatmulBackwardSDPA(SDPA):
    """SDPA's masks and inference path; when training, aten's CPU flash forward with the matmul backward below."""

    name = "cpu_matmul_backward"
    about = "aten flash forward, lingua's matmul backward"

    def forward(self, xq, xk, xv, mask):
        if not (torch.is_grad_enabled() and xq.requires_grad):  # nothing to differentiate: plain SDPA
            return super().forward(xq, xk, xv, mask)
        q, k, v, attn_mask, _ = sdpa_inputs(xq, xk, xv, mask)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        # SDPA casts its inputs under autocast; the aten op underneath does not
        return CausalAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask).transpose(1, 2)


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
    True = may attend, already causal (lingua.kernels.attention.sdpa.dense_mask)."""

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
