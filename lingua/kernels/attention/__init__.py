"""Attention kernels, one module per backend behind one interface (base.AttentionKernel), chosen once by select.py:

    base.py                 the interface (`mask` once per forward, `forward` per layer) and shared helpers
    sdpa.py                 F.scaled_dot_product_attention (dense bool mask, or is_causal)
    cpu_matmul_backward.py  SDPA with lingua's matmul backward (compiled bf16 CPU training, where measured faster)
    flex.py                 compiled flex_attention with a BlockMask (CUDA block_causal: skips masked blocks)
    xformers.py             xformers memory_efficient_attention (CUDA)
    ring.py                 ring attention over a context-parallel group; set by the cp plan, not by select.py
    select.py               the registry, the pure choice, `place_attention`
    measure.py              the timing `model.attn_backward: auto` decides by, cached per machine and shape

Decoding with a KV cache is lingua/models/kv_cache.py (SDPA over the cache, whatever the kernel).
"""

from lingua.kernels.attention.base import AttentionKernel
from lingua.kernels.attention.select import (
    ATTN_BACKWARDS,
    ATTN_IMPLS,
    KERNELS,
    Placement,
    place_attention,
    select_kernel,
    unplaced_kernel,
)

__all__ = ["ATTN_BACKWARDS", "ATTN_IMPLS", "KERNELS", "AttentionKernel", "Placement", "place_attention",
           "select_kernel", "unplaced_kernel"]
