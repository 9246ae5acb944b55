"""AdamW, learning-rate schedules and gradient clipping.

Schedules are pure functions of the step that return a factor of `optim.lr`; they follow
facebookresearch/lingua's formulas. `build_optimizer` wraps the chosen one in a `LambdaLR`, so the factor
used for an update is `lr_factor(scheduler.last_epoch)`: the train loop calls `optimizer.step()` then
`scheduler.step()`, which makes the first update use step 0 (factor 0 under warmup, as in lingua).
"""

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.optim import AdamW, lr_scheduler

from lingua.errors import ConfigError

logger = logging.getLogger(__name__)

SCHEDULERS = ("constant", "linear", "inv_sqrt", "cosine", "wsd")


@dataclass
class OptimArgs:
    lr: float = 3e-4
    weight_decay: float = 0.1  # applied to every parameter, as lingua does
    epsilon: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still computed)

    scheduler: str = "cosine"  # constant | linear | inv_sqrt | cosine | wsd
    warmup: int = 2000  # steps of linear warmup from 0
    lr_min_ratio: float = 0.1  # floor of the schedule, as a fraction of lr
    cycle_length: float = 1.0  # cosine / wsd: cycle length as a fraction of the run
    cosine_theta: float = 1.0  # cosine: progress is raised to this power
    decay_fraction: float = 0.1  # wsd: the decay phase is this fraction of the (cycle's) steps
    exp_factor: float = 0.5  # inv_sqrt: lr ~ (warmup / step) ** exp_factor

    fused: Optional[bool] = None  # None: torch's fused AdamW wherever it supports the params' device (CPU too)


# ---------------------------------------------------------------------------------------------------------
# Schedules: factor of the peak lr at `step` (0-based update index).
# ---------------------------------------------------------------------------------------------------------


def lr_linear(step: int, warmup: int, n_steps: int, min_ratio: float) -> float:
    if step < warmup:
        return step / warmup
    if step <= n_steps:
        s = (step - warmup) / max(1, n_steps - warmup)
        return s * min_ratio + (1 - s)
    return min_ratio


def lr_inv_sqrt(step: int, warmup: int, exp_factor: float, min_ratio: float) -> float:
    if step < warmup:
        return step / warmup
    # max(.., 1) only guards warmup=0 (lingua would divide by zero at step 0)
    return max((max(warmup, 1) / max(step, 1)) ** exp_factor, min_ratio)


def lr_cosine(step: int, warmup: int, n_steps: int, cycle_length: float, theta: float, min_ratio: float) -> float:
    if step < warmup:
        return step / warmup
    # lingua uses `step <= n_steps` here, which with cycle_length=1 flips the sign at step == n_steps and
    # returns 1.0 (the peak) for the last scheduler step; the limit of the curve there is min_ratio.
    if step < n_steps:
        # cycle_length < 1: every other cycle runs the cosine backwards, so each cycle decays from the peak
        sign = -1 if (step // (n_steps * cycle_length)) % 2 else 1
        s = (step - warmup) / max(1, n_steps - warmup)
        return min_ratio + 0.5 * (1 - min_ratio) * (sign * math.cos(math.pi * s**theta / cycle_length) + 1)
    return min_ratio


def lr_wsd(step: int, warmup: int, n_steps: int, decay_fraction: float, cycle_length: float, min_ratio: float) -> float:
    """Warmup, stable at the peak, then decay over the last `decay_fraction` of each cycle (lingua's formula).

    The decay is lingua's inverse-proportional one (Wen et al. 2024, arXiv:2410.05192):
    factor = 1 / (p / min_ratio + (1 - p)) for progress p in [0, 1] through the decay phase, which goes from
    1 at p=0 to min_ratio at p=1, falling faster than linear at first.
    """
    if step < warmup:
        return step / warmup
    if step >= n_steps:  # the end of the run (lingua: step == n_steps closes the last cycle at min_ratio)
        return min_ratio
    cycle = max(1, int(n_steps * cycle_length))
    cycle_end = cycle * (step // cycle + 1)
    decay_length = int(cycle_end * decay_fraction)  # lingua: a fraction of all steps up to the cycle's end
    decay_start = cycle_end - decay_length
    if step <= decay_start:
        return 1.0
    p = (step - decay_start) / decay_length
    return 1 / (p / min_ratio + (1 - p))


def lr_factor(step: int, args: OptimArgs, n_steps: int) -> float:
    """The multiplier of `args.lr` at `step` for the scheduler `args.scheduler`."""
    name = args.scheduler
    if name == "constant":
        return 1.0
    if name == "linear":
        return lr_linear(step, args.warmup, n_steps, args.lr_min_ratio)
    if name == "inv_sqrt":
        return lr_inv_sqrt(step, args.warmup, args.exp_factor, args.lr_min_ratio)
    if name == "cosine":
        return lr_cosine(step, args.warmup, n_steps, args.cycle_length, args.cosine_theta, args.lr_min_ratio)
    if name == "wsd":
        return lr_wsd(step, args.warmup, n_steps, args.decay_fraction, args.cycle_length, args.lr_min_ratio)
    raise ConfigError(f"optim.scheduler: unknown scheduler '{name}' (choose one of {', '.join(SCHEDULERS)})")


def check_args(args: OptimArgs, n_steps: int) -> None:
    """Fail early, naming the key, on values every schedule or AdamW would trip over later."""
    if args.scheduler not in SCHEDULERS:
        lr_factor(0, args, n_steps)  # raises the ConfigError naming optim.scheduler
    if n_steps <= 0:
        raise ConfigError(f"steps: must be positive to build a schedule, got {n_steps}")
    if args.warmup < 0:
        raise ConfigError(f"optim.warmup: must be >= 0, got {args.warmup}")
    if args.scheduler in ("linear", "inv_sqrt", "cosine", "wsd") and not 0 < args.lr_min_ratio <= 1:
        raise ConfigError(f"optim.lr_min_ratio: must be in (0, 1], got {args.lr_min_ratio}")
    if args.scheduler == "wsd" and not 0 < args.decay_fraction < args.cycle_length:
        raise ConfigError(
            f"optim.decay_fraction: must be in (0, optim.cycle_length={args.cycle_length}), got {args.decay_fraction}"
        )
    if args.scheduler in ("cosine", "wsd") and not 0 < args.cycle_length <= 1:
        raise ConfigError(f"optim.cycle_length: must be in (0, 1], got {args.cycle_length}")


# ---------------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------------


def fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """True when torch has a fused AdamW kernel for every param's device type and dtype (CPU since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # private helper moved: fall back to the foreach implementation
        return False
    devices = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def build_optimizer(model: nn.Module, args: OptimArgs, n_steps: int) -> tuple[AdamW, lr_scheduler.LambdaLR]:
    """AdamW over the trainable params of `model` and a LambdaLR driven by `lr_factor`."""
    check_args(args, n_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fused_supported(params) if args.fused is None else bool(args.fused)
    try:
        optimizer = AdamW(
            params,
            lr=args.lr,
            betas=(args.beta1, args.beta2),
            eps=args.epsilon,
            weight_decay=args.weight_decay,
            fused=fused,
        )
    except RuntimeError as e:
        if not fused:
            raise
        raise ConfigError(f"optim.fused: torch has no fused AdamW for these params ({e}); set optim.fused=null") from None
    logger.info("AdamW (%s), %s schedule over %d steps", "fused" if fused else "foreach", args.scheduler, n_steps)
    scheduler = lr_scheduler.LambdaLR(optimizer, partial(lr_factor, args=args, n_steps=n_steps))
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def clip_grad_norm_(
    params: Union[nn.Module, Iterable[torch.Tensor]], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Clip the global gradient norm in place and return it (a plain scalar tensor, before clipping).

    Plain tensors and DTensors (FSDP2 / TP) both work. Gradients are grouped by device mesh (plain tensors in
    their own group): each group's norm comes from torch (a DTensor norm is reduced over its mesh with
    `full_tensor()`), and the groups' norms combine like the entries of one vector. Plain-tensor gradients are
    taken as replicated (DDP or single process), so their norm is not reduced across ranks.
    `max_norm <= 0` only measures the norm.
    """
    from torch.distributed.tensor import DTensor

    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    if not groups:
        return torch.tensor(0.0)

    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = norms[0].device
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)

    if max_norm > 0:
        for group in groups.values():  # per group: foreach kernels cannot mix meshes
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
