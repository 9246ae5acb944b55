"""The one interface every attention backend implements, and the small helpers they share.

A kernel is chosen once, when the model is built and again when it is placed on its device (lingua/kernels/attention/
select.py), and held by the attention layer as `self.kernel`; the forward only calls it. A backend is one file here
plus one line in select.KERNELS.
"""

from typing import Any, Optional

import torch
from torch import nn


class AttentionKernel(nn.Module):
    """softmax(q k^T / sqrt(head_dim) + mask) v. No parameters: swapping one kernel for another changes no weights.

    `mask` runs once per forward (shared by every layer), `forward` in every layer."""

    name = ""  # the registry key (select.KERNELS), which logs and the attention report print
    about = ""  # in words, for the attention report

    def mask(self, tok_idx: Optional[torch.Tensor], bs: int, seqlen: int, device) -> Any:
        """What `forward` needs to mask: tok_idx None for plain causal, else (bs, seqlen) positions inside documents
        (block-causal: a token attends to earlier tokens of its own document)."""
        raise NotImplementedError

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, mask: Any) -> torch.Tensor:
        """xq: (bs, seqlen, n_heads, head_dim); xk, xv: (bs, seqlen, n_kv_heads, head_dim); mask from `mask`.
        Returns (bs, seqlen, n_heads, head_dim)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return self.name


def document_ids(tok_idx: torch.Tensor) -> torch.Tensor:
    """(bs, seqlen) positions inside documents -> (bs, seqlen) document number: a new document starts at 0."""
    return torch.cumsum(tok_idx == 0, dim=1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bs, seqlen, n_kv_heads, head_dim) -> (bs, seqlen, n_kv_heads * n_rep, head_dim): each KV head serves n_rep
    query heads (grouped-query attention)."""
    if n_rep == 1:
        return x
    bs, seqlen, n_kv_heads, head_dim = x.shape
    return x[:, :, :, None, :].expand(bs, seqlen, n_kv_heads, n_rep, head_dim).reshape(bs, seqlen, -1, head_dim)
