"""Weight initialisation that does not depend on how a weight is sharded.

Models are built on the meta device, parallelized (FSDP, TP), materialised with `to_empty` and only then initialised,
so no rank ever holds the whole model. `init_shard_` makes that sharded init draw exactly the values the unsharded
model would get, which is what lets a 1-process and an N-process run start from the same weights.
"""

import math
from typing import Callable

import torch
from torch import nn

INIT_BLOCK_ROWS = 256  # rows drawn per generator: bounds the scratch memory of one init call
INIT_STD_FACTORS = ("disabled", "current_depth", "global_depth", "dim_ratio", "zero")


def _local_part(weight: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The tensor this process holds of `weight` and its offset in the full tensor ((0, ...) when not sharded)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):
        return weight, (0,) * weight.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return weight.to_local(), tuple(offset)


@torch.no_grad()
def init_shard_(weight: torch.Tensor, fill: Callable[[torch.Tensor, torch.Generator], None]) -> None:
    """Fill `weight` in place with random values that depend only on the global RNG's state and the weight's full
    shape, not on how it is sharded (FSDP, TP, both, or not at all).

    One seed is drawn from the global RNG (the same draw on every rank); the full tensor's rows are then split in
    blocks of INIT_BLOCK_ROWS, block b drawn by `fill(block, generator seeded from (seed, b))`. A sharded weight (a
    DTensor) draws only the blocks its shard overlaps and keeps its slice of them: no rank holds more than its shard
    plus one block. DTensor's own random ops cannot do this on CPU (their offset-based RNG is CUDA only), and even
    there a sharded draw need not equal the unsharded one."""
    seed = int(torch.randint(0, 2**62, ()).item())
    local, offset = _local_part(weight)
    if local.numel() == 0 or local.is_meta:  # meta: a weight another pipeline stage owns; its draw is still taken
        return
    full = tuple(weight.shape)
    r0, r1 = offset[0], offset[0] + local.shape[0]
    rest = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))
    gen = torch.Generator(device=local.device)
    for b in range(r0 // INIT_BLOCK_ROWS, (r1 - 1) // INIT_BLOCK_ROWS + 1):
        lo, hi = b * INIT_BLOCK_ROWS, min((b + 1) * INIT_BLOCK_ROWS, full[0])
        gen.manual_seed((seed + b * 0x9E3779B97F4A7C15) % 2**63)
        block = torch.empty((hi - lo, *full[1:]), device=local.device, dtype=torch.float32)
        fill(block, gen)
        a, z = max(lo, r0), min(hi, r1)
        local[a - r0: z - r0].copy_(block[(slice(a - lo, z - lo), *rest)])


def trunc_normal_(weight: torch.Tensor, std: float) -> None:
    """Truncated normal at +-3 std, sharding-independent (see `init_shard_`)."""
    init_shard_(weight, lambda block, gen: nn.init.trunc_normal_(block, 0.0, std, -3 * std, 3 * std, generator=gen))


def uniform_(weight: torch.Tensor, low: float, high: float) -> None:
    init_shard_(weight, lambda block, gen: block.uniform_(low, high, generator=gen))


def depth_factor(init_std_factor: str, depth: int, n_layers: int, dim: int) -> float:
    """What layer `depth` (0-based) divides its residual output projections' std by (lingua's InitStdFactor); zero:
    infinity, a zero init (every block starts as the identity, as in the nanoGPT speedruns)."""
    return {
        "disabled": 1.0,
        "current_depth": (2 * (depth + 1)) ** 0.5,
        "global_depth": (2 * (n_layers + 1)) ** 0.5,
        "dim_ratio": dim / 4096,
        "zero": math.inf,
    }[init_std_factor]
