"""Which attention kernel runs: a pure function of the config and where the model runs, applied once.

    model built     every attention layer holds `kernel = unplaced_kernel(...)` (CPU, eager: what research code and
                    tests that call `Transformer.build` run)
    model placed    the train loop calls `place_attention(model, args, Placement(...))` once, before compiling: the
                    kernel for the device, dtype and compile of the run, shared by every layer
    forward         `self.kernel(xq, xk, xv, mask)`: never decides

`python -m lingua.attention_report` and the train log's kernel table call `select_kernel` and `resolve_backward`
too, so they name what runs. A new backend (e.g. ring attention for context parallelism) is one file in this
package and one line in KERNELS.
"""

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from lingua.errors import ConfigError
from lingua.kernels.attention.base import AttentionKernel
from lingua.kernels.attention.cpu_matmul_backward import MatmulBackwardSDPA
from lingua.kernels.attention.flex import Flex
from lingua.kernels.attention.measure import AttentionShape, cache_key, cached, store, time_backwards
from lingua.kernels.attention.sdpa import SDPA
from lingua.kernels.attention.xformers import XFormers

logger = logging.getLogger("lingua")

KERNELS = {k.name: k for k in (SDPA, MatmulBackwardSDPA, Flex, XFormers)}
ATTN_IMPLS = ("auto", "sdpa", "flex_attention", "xformers")  # model.attn_impl
ATTN_BACKWARDS = ("auto", "aten", "matmul")  # model.attn_backward
BACKWARD_KERNELS = {"aten": "sdpa", "matmul": "cpu_matmul_backward"}  # the candidates `auto` measures
OWN_BACKWARD = "the kernel's own backward"  # where there is nothing to choose


@dataclass(frozen=True)
class Placement:
    """Where and how the attention runs: what the choice depends on besides the config."""

    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32  # the dtype attention computes in (the autocast dtype)
    compiled: bool = False
    training: bool = True
    machine: str = ""  # the CPU's model name: the timing cache is per machine (lingua.distributed.precision.cpu_name)


def select_kernel(impl: str, mask: str, device_type: str, backward: str = "aten") -> str:
    """model.attn_impl, model.mask, the device type and the resolved backward (aten | matmul) -> a KERNELS name."""
    if impl == "auto":
        # CUDA: flex skips the blocks a block-causal mask hides (SDPA's fused kernels take no document mask but
        # the memory-efficient one, which computes every block); causal keeps SDPA's is_causal flash path. CPU: SDPA,
        # whose fused kernel takes either mask (flex has no CPU backward).
        impl = "flex_attention" if device_type == "cuda" and mask == "block_causal" else "sdpa"
    name = {"sdpa": "sdpa", "flex_attention": "flex", "xformers": "xformers"}[impl]
    if backward == "matmul":
        if name != "sdpa" or device_type != "cpu":
            raise ConfigError(f"model.attn_backward=matmul replaces SDPA's CPU backward; it cannot run with "
                              f"model.attn_impl={impl} on {device_type}: set model.attn_backward=auto")
        return "cpu_matmul_backward"
    return name


def unplaced_kernel(impl: str, mask: str, backward: str) -> AttentionKernel:
    """The kernel a freshly built model holds until `place_attention`: the CPU eager choice (auto backward: aten's)."""
    return KERNELS[select_kernel(impl, mask, "cpu", "matmul" if backward == "matmul" else "aten")]()


def backwards_can_differ(impl: str, mask: str, placement: Placement) -> bool:
    """Only compiled bf16 training on CPU has two backwards worth timing (SDPA's and lingua's matmul one)."""
    return (placement.device_type == "cpu" and placement.dtype == torch.bfloat16 and placement.compiled
            and placement.training and select_kernel(impl, mask, "cpu") == "sdpa")


def resolve_backward(choice: str, impl: str, mask: str, placement: Placement, shape: AttentionShape,
                     run: bool = True) -> tuple[str, str]:
    """model.attn_backward -> (aten | matmul | auto, why). auto times both candidates where they can differ (cached
    per machine and shape, lingua/kernels/attention/measure.py); with run=False only the cache is read, and an
    unmeasured case stays 'auto'."""
    if choice != "auto":
        return choice, f"model.attn_backward={choice}"
    if not backwards_can_differ(impl, mask, placement):
        return "aten", OWN_BACKWARD
    key = cache_key(placement.machine, shape, placement.dtype, placement.compiled)
    timings, source = cached(key), "cached"
    if timings is None and not run:
        return "auto", "measured when a compiled bf16 CPU run starts (model.attn_backward=auto)"
    if timings is None:
        candidates = {b: KERNELS[k]() for b, k in BACKWARD_KERNELS.items()}
        timings, source = time_backwards(candidates, shape, placement.dtype, placement.compiled), "measured"
        store(key, timings, shape)
    best = min(BACKWARD_KERNELS, key=lambda b: timings[b])
    other = next(b for b in BACKWARD_KERNELS if b != best)
    measured_at = replace(shape, batch=timings.get("batch", shape.batch))  # a cached entry keeps its own batch
    return best, (f"{best} backward, {timings[best]:.1f} ms vs {other} {timings[other]:.1f} ms "
                  f"({source} at {measured_at.describe()}, model.attn_backward=auto)")


def place_attention(model: nn.Module, args, placement: Placement, batch: int, seqlen: int) -> str:
    """Give every module holding an AttentionKernel (`.kernel`) the kernel for this placement, one shared instance;
    `args` is the model config (attn_impl, mask, attn_backward). Returns the line it logs ('' without attention)."""
    holders = [m for m in model.modules() if isinstance(getattr(m, "kernel", None), AttentionKernel)]
    layer = next((m for m in holders if hasattr(m, "head_dim")), None)
    if layer is None:
        return ""
    shape = AttentionShape(batch, seqlen, layer.n_heads, layer.n_kv_heads, layer.head_dim, args.mask)
    backward, why = resolve_backward(args.attn_backward, args.attn_impl, args.mask, placement, shape)
    kernel = KERNELS[select_kernel(args.attn_impl, args.mask, placement.device_type, backward)]()
    for m in holders:
        m.kernel = kernel
    line = f"attention: {kernel.name} ({kernel.about}); backward: {why}"
    logger.info(line)
    return line
