"""The experts' SwiGLU as three grouped GEMMs (torch._grouped_mm), in the form CUDA's kernel takes.

CUDA's grouped GEMM (sm90) multiplies bf16 only, and autocast has no rule for `_grouped_mm`: under bf16 autocast
with fp32 master weights the inputs would arrive in fp32. So the rows and weights are cast to the compute dtype
(the autocast dtype, else bf16) and the result back to the input's dtype. Its operands' rows must be 16-byte aligned:
dim and hidden_dim are zero-padded to multiples of 8 (zero columns of x meet zero rows of w1/w3; silu(0) * 0 = 0 in
the padded hidden units, which meet zero rows of w2), so the result is exact. On CPU nothing changes.
"""

from typing import Optional

import torch
import torch.nn.functional as F

ALIGN = 8  # bf16 elements in 16 bytes


def compute_dtype(device_type: str, x_dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the grouped GEMMs run in: on CUDA the autocast dtype (bf16 when autocast is off), else x's."""
    if device_type != "cuda":
        return x_dtype
    return autocast_dtype or torch.bfloat16


def padded(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def pad_to(t: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """t zero-padded at the end of each dim to `sizes` (the same tensor when nothing is missing)."""
    missing = [s - n for s, n in zip(sizes, t.shape)]
    if not any(missing):
        return t
    return F.pad(t, [p for m in reversed(missing) for p in (0, m)])


def grouped_swiglu(x, w1, w3, w2, offs, align: int = 1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x (n_rows, dim) sorted by expert, w1/w3 (E, dim, hidden), w2 (E, hidden, dim), offs the cumulative rows per
    expert (int32) -> (n_rows, dim) in x's dtype; computed in `dtype` with dims padded to multiples of `align`."""
    dtype = dtype or x.dtype
    n, dim, hidden = x.shape[0], x.shape[1], w1.shape[2]
    d, h = padded(dim, align), padded(hidden, align)
    xp = pad_to(x, (n, d)).to(dtype)  # (n_rows, d)
    w1p, w3p = (pad_to(w, (w.shape[0], d, h)).to(dtype) for w in (w1, w3))  # (E, d, h)
    w2p = pad_to(w2, (w2.shape[0], h, d)).to(dtype)  # (E, h, d)
    hid = F.silu(torch._grouped_mm(xp, w1p, offs=offs)) * torch._grouped_mm(xp, w3p, offs=offs)  # (n_rows, h)
    return torch._grouped_mm(hid, w2p, offs=offs)[:, :dim].to(x.dtype)  # (n_rows, dim)


def experts_swiglu(x, w1, w3, w2, offs) -> torch.Tensor:
    """grouped_swiglu as the device of x needs it (see the module docstring)."""
    autocast = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else None
    dtype = compute_dtype(x.device.type, x.dtype, autocast)
    return grouped_swiglu(x, w1, w3, w2, offs, align=ALIGN if x.is_cuda else 1, dtype=dtype)
