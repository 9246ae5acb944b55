"""Activation, weight and gradient statistics at chosen steps: mean, std, max |x| and the share of outliers, per layer.

    probe = Probe(args.probe, args.dump_dir, rank)
    ...
    probe.before_step(step, model)      # before the step's first forward: hooks the blocks if `step` is probed
    loss.backward() ...                 # every micro-batch of the step
    probe.after_backward(step, model)   # after the step's last backward, before clipping: stats, unhook, write

`step` is the number metrics.jsonl logs for that step (1-based). On other steps both calls return at once: no hook is
registered and nothing is computed, so the cost of the probe there is one integer test.

What is measured (records in `<dump_dir>/probe/probe_rank<r>.jsonl`, one JSON line per (step, layer, kind)):
  kind "activation": the output of each block of `model.layers` (layer "layers.<i>"), every micro-batch of the step,
      on this rank's data (under tensor parallelism, this rank's sequence shard). Written by every rank.
  kind "weight" / "grad": every parameter (layer = its name, e.g. "layers.0.attention.wq.weight"), the weights the
      step's forward used and the raw gradients (before clipping). Global over shards; written by rank 0 only.
  kind "probe": the probe's own cost on that step (layer "all"): `hook_ms` (time inside the activation hooks),
      `stats_ms` (weights and gradients, collectives, writing) and `total_ms`.
Each statistic line: {"step", "layer", "kind", "numel", "mean", "std", "max_abs", "outlier_share", "rank"}.

Definitions. std is the population standard deviation of the tensor's elements. An element x of tensor T is an
outlier if |x - mean(T)| > outlier_std * std(T) (default 6): "6 sigma" relative to the tensor's own spread, so norm
gains near 1 and matrices near 0 are judged on their own scale; a Gaussian has ~2e-9 of its mass there, so any
visible share is heavy-tailed. Activations of a step with several micro-batches pool their moments (n, sum, sum of
squares, max) and their outlier counts, each micro-batch's outliers judged against that micro-batch's mean and std.

Sharded parameters (FSDP2 / TP DTensors) are never gathered: each rank computes moments of its local shard in fp64
(n, sum, sum of squares from fp32 two-pass sums, max |x|), one SUM and one MAX all-reduce over the world combine
them, then each rank counts its outliers against the global mean and std and a last SUM all-reduce adds the counts.
Three small collectives per probed step, whatever the model size. An element replicated on R ranks (a Replicate mesh
dim, or a sub-mesh repeated across the world) is counted R times and divided by R, so the result equals the
statistics of the full tensor (to fp64 rounding). Every rank must call `after_backward` on the same steps (it does:
probed steps are a pure function of the step).

lingua.tools.plot reads and draws the records (`read_probe`, `plot_probes`): `python -m lingua.plot RUN_DIR` puts the probe
figures next to the loss curves.
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lingua.errors import ConfigError, LinguaError

KINDS = ("activation", "weight", "grad")
STATS = ("mean", "std", "max_abs", "outlier_share")
# Wrappers that the parallelisms put in parameter and module names (activation checkpointing, compile, FSDP1).
WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass
class ProbeArgs:
    every: int = 0  # probe every N steps (0: off)
    steps: list[int] = field(default_factory=list)  # and at these steps (1-based, as metrics.jsonl numbers them)
    outlier_std: float = 6.0  # outlier: |x - mean| > outlier_std * std, mean and std of the same tensor
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # any of activation, weight, grad


def check_probe_args(args: ProbeArgs) -> None:
    if args.every < 0:
        raise ConfigError(f"probe.every must be >= 0 (got {args.every})")
    if any(s < 1 for s in args.steps):
        raise ConfigError(f"probe.steps are 1-based step numbers (got {list(args.steps)})")
    if not args.outlier_std > 0:
        raise ConfigError(f"probe.outlier_std must be > 0 (got {args.outlier_std})")
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"probe.kinds: unknown kind '{unknown[0]}' (choose from {', '.join(KINDS)})")


def clean_name(name: str) -> str:
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


# ---------------------------------------------------------------- statistics


def _flat32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).float()


def _moments(x: torch.Tensor) -> torch.Tensor:
    """fp64 [n, sum, sum of squares, max |x|] of a tensor. The sum of squares is n * mean^2 + the sum of squared
    deviations from the mean (two passes in fp32 with torch's pairwise sums: no cancellation, no fp64 copy)."""
    x = _flat32(x)
    if x.numel() == 0:
        return torch.zeros(4, dtype=torch.float64, device=x.device)
    n = x.numel()
    mean = x.sum() / n
    d = x - mean
    lo, hi = torch.aminmax(x)
    mean64 = mean.double()
    return torch.stack([torch.full_like(mean64, n), n * mean64, (d * d).sum().double() + n * mean64 * mean64,
                        torch.maximum(-lo, hi).double()])


def _mean_std(n, s1, s2) -> tuple[torch.Tensor, torch.Tensor]:
    mean = s1 / n.clamp(min=1)
    return mean, (s2 / n.clamp(min=1) - mean * mean).clamp(min=0).sqrt()


def _outliers(x: torch.Tensor, mean, std, k: float) -> torch.Tensor:
    """fp64 count of |x - mean| > k * std."""
    x = _flat32(x)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    return torch.count_nonzero((x - mean.float()).abs_() > k * std.float()).double()


def tensor_stats(x: torch.Tensor, outlier_std: float = 6.0) -> dict:
    """The probe's statistics of one whole (unsharded) tensor, as plain floats."""
    moments = _moments(x)
    mean, std = _mean_std(moments[0], moments[1], moments[2])
    n, _, _, max_abs = moments.tolist()
    count = _outliers(x, mean, std, outlier_std).item()
    return {"numel": int(n), "mean": mean.item(), "std": std.item(), "max_abs": max_abs,
            "outlier_share": count / n if n else 0.0}


def _local_and_replicas(t: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """This rank's part of `t` and on how many ranks of the world each of its elements lives."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(t, DTensor):
        shards = math.prod(t.device_mesh.size(d) for d, p in enumerate(t.placements) if isinstance(p, Shard))
        if any(not (isinstance(p, Shard) or p.is_replicate()) for p in t.placements):
            raise LinguaError(f"probe: a tensor with placements {t.placements} (partial sums) cannot be probed")
        return t.to_local(), world // shards
    return t, world


# ---------------------------------------------------------------- the probe


class Probe:
    def __init__(self, args: ProbeArgs, dump_dir, rank: int = 0):
        check_probe_args(args)
        self.args, self.rank = args, rank
        self.path = Path(dump_dir) / "probe" / f"probe_rank{rank}.jsonl"
        self._steps = frozenset(args.steps)
        self._hooks: list = []
        self._acts: dict[str, list] = {}  # block name -> [moments (4,), outlier count] pooled over micro-batches
        self._hook_s = 0.0
        self.last_overhead_ms = 0.0  # the probe's cost on the last probed step (hooks + stats + write)

    @property
    def enabled(self) -> bool:
        return bool(self.args.every or self._steps)

    def is_probe_step(self, step: int) -> bool:
        return (self.args.every > 0 and step % self.args.every == 0) or step in self._steps

    # ------------------------------------------------------------ the two calls of the train loop

    def before_step(self, step: int, model: nn.Module) -> None:
        if not self.is_probe_step(step):
            return
        self._remove_hooks()
        self._acts, self._hook_s = {}, 0.0
        if "activation" in self.args.kinds:
            for i, block in enumerate(getattr(model, "layers", ())):
                self._hooks.append(block.register_forward_hook(self._make_hook(f"layers.{i}")))

    def after_backward(self, step: int, model: nn.Module) -> None:
        if not self.is_probe_step(step):
            return
        start = time.perf_counter()
        self._remove_hooks()
        records = []
        for name, (moments, count) in self._acts.items():
            records.append(self._record(step, name, "activation", moments.tolist(), count.item()))
        self._acts = {}
        for kind in ("weight", "grad"):
            if kind in self.args.kinds:
                records += self._param_records(step, model, kind)
        stats_s = time.perf_counter() - start
        records.append({"step": step, "layer": "all", "kind": "probe", "hook_ms": 1000 * self._hook_s,
                        "stats_ms": 1000 * stats_s, "total_ms": 1000 * (self._hook_s + stats_s), "rank": self.rank})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        self.last_overhead_ms = 1000 * (time.perf_counter() - start + self._hook_s)

    def close(self) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------ internals

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _make_hook(self, name: str):
        k = self.args.outlier_std

        def hook(module, inputs, output):
            t0 = time.perf_counter()
            x = output[0] if isinstance(output, (tuple, list)) else output
            if hasattr(x, "to_local"):  # a DTensor: this rank's part
                x = x.to_local()
            with torch.no_grad():
                moments = _moments(x)
                mean, std = _mean_std(moments[0], moments[1], moments[2])
                count = _outliers(x, mean, std, k)
                if name in self._acts:
                    prev, prev_count = self._acts[name]
                    moments = torch.cat([prev[:3] + moments[:3], torch.maximum(prev[3:], moments[3:])])
                    count = prev_count + count
                self._acts[name] = [moments, count]
            self._hook_s += time.perf_counter() - t0

        return hook

    def _param_records(self, step: int, model: nn.Module, kind: str) -> list[dict]:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        names, tensors, replicas = [], [], []
        for name, p in model.named_parameters():
            t = p if kind == "weight" else p.grad
            if t is None:
                continue
            local, r = _local_and_replicas(t, world)
            names.append(clean_name(name))
            tensors.append(local)
            replicas.append(r)
        if not names:
            return []
        moments = torch.stack([_moments(t) for t in tensors])  # (n_tensors, 4): n, sum, sum of squares, max |x|
        scale = torch.tensor(replicas, dtype=torch.float64, device=moments.device)
        sums, maxes = moments[:, :3] / scale[:, None], moments[:, 3].contiguous()
        if distributed:
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        mean, std = _mean_std(sums[:, 0], sums[:, 1], sums[:, 2])
        counts = torch.stack([_outliers(t, m, s, self.args.outlier_std)
                              for t, m, s in zip(tensors, mean, std)]) / scale
        if distributed:
            dist.all_reduce(counts)
        if self.rank != 0:
            return []
        rows = torch.cat([sums, maxes[:, None], counts[:, None]], 1).tolist()
        return [self._record(step, name, kind, row[:3] + [row[3]], row[4]) for name, row in zip(names, rows)]

    def _record(self, step: int, layer: str, kind: str, moments: list, outliers: float) -> dict:
        n, s1, s2, max_abs = moments
        mean = s1 / n if n else 0.0
        std = math.sqrt(max(s2 / n - mean * mean, 0.0)) if n else 0.0
        return {"step": step, "layer": layer, "kind": kind, "numel": int(round(n)), "mean": mean, "std": std,
                "max_abs": max_abs, "outlier_share": outliers / n if n else 0.0, "rank": self.rank}
