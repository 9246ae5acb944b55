"""The optimizer (AdamW, or Muon for the hidden matrices with AdamW for the rest), learning-rate schedules and
gradient clipping.

Param groups (`param_groups`), in this order, empty ones dropped and equal ones merged:
    matrices    2-D weights of the nn.Linear layers inside `model.layers`: Muon under optim.name=muon, else AdamW
    head        the output projection (untied): optim.embed_lr
    embeddings  nn.Embedding tables (and a tied head): optim.embed_lr, no weight decay
    other       any other >= 2-D weight (e.g. Mamba's conv): decayed
    no_decay    norms, biases, scalars (Mamba's A_log/dt_bias/D): no weight decay
optim.decay_params=all restores lingua's rule (decay everything), which with embed_lr unset is one group.

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
from lingua.train.muon import ADJUST_LR, NS_DTYPES, MuonAdamW, resolve_ns_dtype

logger = logging.getLogger(__name__)

SCHEDULERS = ("constant", "linear", "inv_sqrt", "cosine", "wsd")


OPTIMIZERS = ("adamw", "muon")
DECAY_PARAMS = ("matrices", "all")


@dataclass
class OptimArgs:
    name: str = "adamw"  # adamw | muon (Muon for the hidden matrices, AdamW for the rest: lingua/train/muon.py)
    lr: float = 3e-4  # under muon the same lr: updates are RMS-matched to AdamW's (muon_adjust_lr)
    weight_decay: float = 0.1  # decoupled weight decay (AdamW and Muon), on the parameters decay_params picks
    decay_params: str = "matrices"  # matrices: only >= 2-D non-embedding weights decay | all: every param (lingua)
    embed_lr: Optional[float] = None  # lr of the embeddings and the output head; None: lr
    epsilon: float = 1e-8  # AdamW denominator epsilon
    beta1: float = 0.9  # AdamW decay of the first moment
    beta2: float = 0.95  # AdamW decay of the second moment
    clip: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still computed)
    # skip the update of a step whose loss exceeds spike_factor x the median of the last spike_window step losses
    # (lingua/train/spikes.py; skipped steps are counted in metrics.jsonl); 0 never skips
    spike_factor: float = 0.0
    spike_window: int = 100  # step losses in the running median that spike_factor compares against

    scheduler: str = "cosine"  # constant | linear | inv_sqrt | cosine | wsd
    warmup: int = 2000  # steps of linear warmup from 0
    lr_min_ratio: float = 0.1  # floor of the schedule, as a fraction of lr
    cycle_length: float = 1.0  # cosine / wsd: cycle length as a fraction of the run
    cosine_theta: float = 1.0  # cosine: progress is raised to this power
    decay_fraction: float = 0.1  # wsd: the decay phase is this fraction of the (cycle's) steps
    exp_factor: float = 0.5  # inv_sqrt: lr ~ (warmup / step) ** exp_factor

    fused: Optional[bool] = None  # None: torch's fused AdamW wherever it supports the params' device (CPU too)

    muon_momentum: float = 0.95  # Muon momentum of the hidden matrices
    muon_nesterov: bool = True  # Muon with Nesterov momentum
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_ns_dtype: str = "auto"  # auto (bf16 where bf16 matmuls are native: CUDA, AVX512-BF16/AMX CPUs) | bf16 | fp32
    muon_adjust_lr: str = "match_rms_adamw"  # match_rms_adamw: update * 0.2 sqrt(max(m, n)) (Moonlight) | original


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
    for key, value, choices in (("name", args.name, OPTIMIZERS), ("decay_params", args.decay_params, DECAY_PARAMS),
                                ("muon_adjust_lr", args.muon_adjust_lr, ADJUST_LR),
                                ("muon_ns_dtype", args.muon_ns_dtype, ("auto", *NS_DTYPES))):
        if value not in choices:
            raise ConfigError(f"optim.{key}: unknown value '{value}' (choose one of {', '.join(choices)})")
    if args.embed_lr is not None and args.embed_lr < 0:
        raise ConfigError(f"optim.embed_lr: must be >= 0 or null, got {args.embed_lr}")
    if args.muon_ns_steps < 1 or not 0 <= args.muon_momentum < 1:
        raise ConfigError(f"optim.muon_ns_steps must be >= 1 and optim.muon_momentum in [0, 1) "
                          f"(got {args.muon_ns_steps}, {args.muon_momentum})")


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


GROUP_ORDER = ("matrices", "head", "embeddings", "other", "no_decay")


def param_roles(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable params by role (GROUP_ORDER), each in model order; a tied head counts as the embedding."""
    model = getattr(model, "_orig_mod", model)  # a whole-model torch.compile wrapper
    hidden = {id(m) for m in model.layers.modules()} if hasattr(model, "layers") else set()
    roles: dict[str, list] = {k: [] for k in GROUP_ORDER}
    seen = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(prefix=mod_name, recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if isinstance(module, nn.Embedding):
                role = "embeddings"
            elif p.ndim < 2:
                role = "no_decay"
            elif isinstance(module, nn.Linear) and p.ndim == 2:
                role = "matrices" if id(module) in hidden else "head"
            else:
                role = "other"
            roles[role].append((name, p))
    return roles


def param_groups(model: nn.Module, args: OptimArgs) -> list[dict]:
    """torch param groups for `args` (see the module docstring); each has `role` (its roles, "+"-joined) and `muon`
    (whether Muon steps it). Groups with equal settings merge, keeping model order within a group."""
    decay_all = args.decay_params == "all"
    embed_lr = args.lr if args.embed_lr is None else args.embed_lr
    settings = {  # role -> (muon, lr, weight_decay)
        "matrices": (args.name == "muon", args.lr, args.weight_decay),
        "head": (False, embed_lr, args.weight_decay),
        "embeddings": (False, embed_lr, args.weight_decay if decay_all else 0.0),
        "other": (False, args.lr, args.weight_decay),
        "no_decay": (False, args.lr, args.weight_decay if decay_all else 0.0),
    }
    order = {id(p): i for i, p in enumerate(model.parameters())}
    merged: dict[tuple, dict] = {}
    for role, named in param_roles(model).items():
        if not named:
            continue
        group = merged.setdefault(settings[role], {"params": [], "roles": []})
        group["roles"].append(role)
        group["params"] += [p for _, p in named]
    return [{"params": sorted(g["params"], key=lambda p: order[id(p)]), "role": "+".join(g["roles"]), "muon": muon,
             "lr": lr, "weight_decay": wd} for (muon, lr, wd), g in merged.items()]


def build_optimizer(model: nn.Module, args: OptimArgs, n_steps: int) -> tuple[AdamW, lr_scheduler.LambdaLR]:
    """AdamW (or MuonAdamW) over the trainable params of `model` and a LambdaLR driven by `lr_factor`; the first
    param group is the matrices' (its lr is the one logged)."""
    check_args(args, n_steps)
    groups = param_groups(model, args)
    params = [p for g in groups for p in g["params"]]
    fused = fused_supported(params) if args.fused is None else bool(args.fused)
    kwargs = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.epsilon, weight_decay=args.weight_decay,
                  fused=fused)
    try:
        if args.name == "muon":
            ns_dtype = resolve_ns_dtype(args.muon_ns_dtype, params[0].device)
            for g in groups:
                g.update(momentum=args.muon_momentum, nesterov=args.muon_nesterov, ns_steps=args.muon_ns_steps,
                         ns_dtype=ns_dtype, adjust_lr=args.muon_adjust_lr)
            optimizer = MuonAdamW(groups, **kwargs)
        else:
            optimizer = AdamW(groups, **kwargs)
    except RuntimeError as e:
        if not fused:
            raise
        raise ConfigError(f"optim.fused: torch has no fused AdamW for these params ({e}); set optim.fused=null") from None
    logger.info("%s (AdamW %s), %s schedule over %d steps; param groups: %s", args.name,
                "fused" if fused else "foreach", args.scheduler, n_steps,
                ", ".join(f"{g['role']} ({len(g['params'])}, {'muon' if g['muon'] else 'adamw'}, lr {g['lr']:g}, "
                          f"wd {g['weight_decay']:g})" for g in optimizer.param_groups))
    scheduler = lr_scheduler.LambdaLR(optimizer, partial(lr_factor, args=args, n_steps=n_steps))
    return optimizer, scheduler


def sync_scheduler(scheduler: lr_scheduler.LambdaLR) -> None:
    """After a resume: every group's lr from its own initial_lr and the loaded step. A checkpoint from before the
    param groups split has one saved base lr; LambdaLR would otherwise leave the other groups' lr untouched."""
    scheduler.base_lrs = [g["initial_lr"] for g in scheduler.optimizer.param_groups]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for g, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        g["lr"] = base * factor
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


# ---------------------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _combine_over(norm: torch.Tensor, norm_type: float, group) -> torch.Tensor:
    """The norm of every rank's gradients together, from each rank's norm of its own (disjoint) part."""
    import torch.distributed as dist

    if math.isinf(norm_type):
        dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=group)
        return norm
    total = norm.float() ** norm_type
    dist.all_reduce(total, group=group)
    return total ** (1.0 / norm_type)


def clip_grad_norm_(
    params: Union[nn.Module, Iterable[torch.Tensor]], max_norm: float, norm_type: float = 2.0, pp_group=None
) -> torch.Tensor:
    """Clip the global gradient norm in place and return it (a plain scalar tensor, before clipping).

    Plain tensors and DTensors (FSDP2 / TP) both work. Gradients are grouped by device mesh (plain tensors in
    their own group): each group's norm comes from torch (a DTensor norm is reduced over its mesh with
    `full_tensor()`), and the groups' norms combine like the entries of one vector. Plain-tensor gradients are
    taken as replicated (DDP or single process), so their norm is not reduced across ranks. `pp_group`: the pipeline
    stages' process group, whose ranks hold different parameters (their norms combine too).
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
    if pp_group is not None:
        total = _combine_over(total, norm_type, pp_group)

    if max_norm > 0:
        for group in groups.values():  # per group: foreach kernels cannot mix meshes
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
