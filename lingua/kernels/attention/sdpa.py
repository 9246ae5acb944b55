"""F.scaled_dot_product_attention: torch picks FlashAttention-2, cuDNN, memory-efficient or math on CUDA, its fused
flash kernel or math on CPU (`python -m lingua.attention_report` says which, and why)."""

from typing import Optional

import torch
import torch.nn.functional as F

from lingua.kernels.attention.base import AttentionKernel, document_ids, repeat_kv


def dense_mask(tok_idx: Optional[torch.Tensor], seqlen: int, device) -> Optional[torch.Tensor]:
    """None (causal: is_causal lets every fused kernel run, including CUDA flash which takes no mask), or the
    block-causal bool mask (bs, 1, seqlen, seqlen), True = may attend."""
    if tok_idx is None:
        return None
    docs = document_ids(tok_idx)  # (bs, seqlen)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal).unsqueeze(1)  # (bs, 1, seqlen, seqlen)


def sdpa_inputs(xq, xk, xv, mask):
    """The exact (q, k, v, attn_mask, is_causal) lingua hands to F.scaled_dot_product_attention; attention_report
    asks torch which kernel it picks for these same tensors."""
    # Repeat KV heads instead of enable_gqa=True: on CUDA the memory-efficient kernel, the only fused one that takes
    # the block_causal mask, rejects grouped-query inputs, so enable_gqa would silently fall back to the math kernel.
    n_rep = xq.shape[2] // xk.shape[2]
    xk, xv = repeat_kv(xk, n_rep), repeat_kv(xv, n_rep)
    q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # (bs, n_heads, seqlen, head_dim)
    return q, k, v, mask, mask is None


class SDPA(AttentionKernel):
    name = "sdpa"
    about = "F.scaled_dot_product_attention"

    def mask(self, tok_idx, bs, seqlen, device):
        return dense_mask(tok_idx, seqlen, device)

    def forward(self, xq, xk, xv, mask):
        q, k, v, attn_mask, is_causal = sdpa_inputs(xq, xk, xv, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal).transpose(1, 2)
