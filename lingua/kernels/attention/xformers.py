"""xformers' memory_efficient_attention over the batch flattened into one sequence of causal segments (CUDA only)."""

import torch

from lingua.errors import LinguaError, require
from lingua.kernels.attention.base import AttentionKernel, repeat_kv


class XFormers(AttentionKernel):
    name = "xformers"
    about = "xformers memory_efficient_attention, BlockDiagonalCausalMask"

    def mask(self, tok_idx, bs, seqlen, device):
        """The lengths of the causal segments once the batch is flattened: causal is one segment per batch row."""
        starts = torch.zeros(bs, seqlen, dtype=torch.bool) if tok_idx is None else (tok_idx == 0).cpu()
        starts[:, 0] = True
        bounds = starts.flatten().nonzero().flatten().tolist() + [bs * seqlen]
        return [end - start for start, end in zip(bounds, bounds[1:])]

    def forward(self, xq, xk, xv, mask):
        if xq.device.type != "cuda":
            raise LinguaError(f"model.attn_impl=xformers runs only on CUDA (got {xq.device.type}): use attn_impl=auto")
        memory_efficient_attention = require("xformers.ops", "gpu").memory_efficient_attention
        BlockDiagonalCausalMask = require("xformers.ops.fmha.attn_bias", "gpu").BlockDiagonalCausalMask
        bs, seqlen, n_heads, head_dim = xq.shape
        n_rep = n_heads // xk.shape[2]
        q, k, v = (t.reshape(1, bs * seqlen, n_heads, head_dim)
                   for t in (xq, repeat_kv(xk, n_rep), repeat_kv(xv, n_rep)))
        out = memory_efficient_attention(q, k, v, attn_bias=BlockDiagonalCausalMask.from_seqlens(mask))
        return out.view(bs, seqlen, n_heads, head_dim)
