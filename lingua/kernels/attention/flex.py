"""FlexAttention (torch.nn.attention.flex_attention): the block-causal mask as a BlockMask, so the kernel skips every
block of the score matrix that no query may see (across documents and above the diagonal), which SDPA's dense-mask
kernels compute and throw away. On CUDA the `auto` choice for model.mask=block_causal."""

import functools

import torch

from lingua.errors import LinguaError
from lingua.kernels.attention.base import AttentionKernel, document_ids


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # uncompiled, flex materialises the full score matrix


class Flex(AttentionKernel):
    name = "flex"
    about = "compiled flex_attention, block mask built once per batch"

    def mask(self, tok_idx, bs, seqlen, device):
        from torch.nn.attention.flex_attention import create_block_mask

        if tok_idx is None:
            return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, seqlen, seqlen, device=device)
        docs = document_ids(tok_idx)  # (bs, seqlen)
        return create_block_mask(
            lambda b, h, q, kv: (docs[b, q] == docs[b, kv]) & (q >= kv), bs, None, seqlen, seqlen, device=device
        )

    def forward(self, xq, xk, xv, mask):
        if xq.device.type == "cpu" and torch.is_grad_enabled() and xq.requires_grad:
            raise LinguaError(
                f"model.attn_impl=flex_attention has no backward on CPU (torch {torch.__version__}): "
                "train with model.attn_impl=auto or sdpa, or run flex_attention under torch.no_grad() for inference"
            )
        from torch.nn.attention.flex_attention import flex_attention

        fn = flex_attention if xq.device.type == "cpu" else _compiled_flex_attention()
        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # (bs, n_heads or n_kv_heads, seqlen, head_dim)
        return fn(q, k, v, block_mask=mask, enable_gqa=True).transpose(1, 2)
