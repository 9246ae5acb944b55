"""FLOP formulas torch's FlopCounterMode lacks, passed to it as its custom_mapping by the planner and by the real-step
measurement (lingua.plan.simulate, lingua.plan.measure), so both count the same kernels."""

import math

import torch


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch._grouped_mm (the MoE's experts, apps/moe/grouped.py): 2 FLOPs per multiply-add. 2-D x 3-D, 3-D x 2-D and
    3-D x 3-D: every output element sums a.shape[-1] products. 2-D x 2-D (the weights' gradient, a (k, n) x b (n, m)
    -> (groups, k, m)): the groups split the n products of each element, so 2 x k x n x m in all."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def extra_flop_formulas() -> dict:
    """FlopCounterMode's custom_mapping: the formulas above for the ops this torch has."""
    return {torch.ops.aten._grouped_mm: grouped_mm_flops} if hasattr(torch.ops.aten, "_grouped_mm") else {}
