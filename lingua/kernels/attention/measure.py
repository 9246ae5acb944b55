"""Timing attention backwards on this machine, once, cached: what `model.attn_backward: auto` decides by.

The cache is one JSON file, $LINGUA_CACHE_DIR/attention_backward.json (default ~/.cache/lingua/), mapping a key
(CPU model, torch version, dtype, compiled or not, per-sample shape and mask) to {backward: ms, "batch": measured at}.
Delete it, or an entry, to measure again.
"""

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from lingua.files import read_json, write_json_atomic

CACHE_FILE = "attention_backward.json"


@dataclass(frozen=True)
class AttentionShape:
    """One attention call of the run: q (batch, seqlen, n_heads, head_dim), k and v with n_kv_heads."""

    batch: int
    seqlen: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mask: str  # causal | block_causal

    def describe(self) -> str:
        return (f"batch {self.batch} x seq {self.seqlen}, {self.n_heads} heads ({self.n_kv_heads} kv) of "
                f"{self.head_dim}, {self.mask}")


def cache_path() -> Path:
    return Path(os.environ.get("LINGUA_CACHE_DIR") or Path.home() / ".cache" / "lingua") / CACHE_FILE


def cache_key(machine: str, shape: AttentionShape, dtype: torch.dtype, compiled: bool) -> str:
    """machine: the CPU's model name (lingua.distributed.precision.cpu_name, which the caller passes in)."""
    # no batch: which backward wins follows the per-sample shape, so the attention report (which knows no batch
    # size) finds the entry, and a run at another batch size reuses it
    return (f"{machine} | torch {torch.__version__} | {str(dtype).removeprefix('torch.')} | "
            f"{'compiled' if compiled else 'eager'} | seq {shape.seqlen}, heads {shape.n_heads}/{shape.n_kv_heads}, "
            f"head_dim {shape.head_dim}, {shape.mask}")


def cached(key: str) -> Optional[dict]:
    """{backward: ms} stored under `key`, or None."""
    entry = (read_json(cache_path(), {}) or {}).get(key)
    return entry if isinstance(entry, dict) and "aten" in entry and "matmul" in entry else None


def store(key: str, timings: dict, shape: AttentionShape) -> None:
    """Add an entry; a cache that cannot be written (read-only home, another rank renaming the same file at once)
    only means the next run measures again."""
    path = cache_path()
    data = read_json(path, {}) or {}
    data[key] = {**timings, "batch": shape.batch}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except OSError:
        pass


def _median_s(step: Callable[[], None], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):  # compilation and first-touch allocations
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_backwards(kernels: dict[str, nn.Module], shape: AttentionShape, dtype: torch.dtype, compiled: bool,
                   reps: int = 5) -> dict[str, float]:
    """Milliseconds of forward + backward of one attention call per kernel, compiled if the run compiles."""
    g = torch.Generator().manual_seed(0)
    new = lambda heads: torch.randn(shape.batch, shape.seqlen, heads, shape.head_dim, generator=g).to(dtype)
    q, k, v = new(shape.n_heads).requires_grad_(), new(shape.n_kv_heads).requires_grad_(), new(shape.n_kv_heads)
    v.requires_grad_()
    grad = new(shape.n_heads)  # a dense output gradient, as in training (sum()'s would be a broadcast)
    # one document per row: the mask's type decides the kernel's path, its content does not
    tok_idx = torch.arange(shape.seqlen).expand(shape.batch, -1) if shape.mask == "block_causal" else None
    ms = {}
    for name, kernel in kernels.items():
        mask = kernel.mask(tok_idx, shape.batch, shape.seqlen, "cpu")
        fn = torch.compile(kernel, dynamic=False) if compiled else kernel
        ms[name] = 1000 * _median_s(lambda: fn(q, k, v, mask).backward(grad), reps)
    return ms
