"""One training step of one rank of an N-rank job, simulated in this process: the app's real build and
`spec.parallelize` on a fake process group (every collective a no-op), then the real train step
(lingua.train.step.Trainer) on fake tensors, so nothing the size of the model is ever allocated.

Parallelization runs on the meta device outside FakeTensorMode (fully_shard inside it fails in torch 2.13:
DeviceMesh._concatenate reaches aten.nonzero); materialization, the optimizer and the steps run inside it. The step
runs on device "cpu" with the GPU's dtype policy (bf16 params and autocast): fake CUDA tensors abort in backward on a
CPU build. One untracked warm-up step first (FSDP's lazy init, the optimizer's states), then the tracked step under
the memory tracker, torch's FlopCounterMode and lingua.plan.comm.CommCounter, all inside spec.simulate_context()
(what a step without data must assume; MoE: balanced routing).
"""

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from lingua.distributed.mesh import DistState, init_distributed
from lingua.errors import LinguaError
from lingua.models.spec import ModelSpec
from lingua.plan.comm import CommCounter, CommCounts
from lingua.plan.tracker import flop_counter, memory_tracker, sharding_propagation_apart

# the memory tracker's categories -> the plan's (FSDPMemTracker's, then MemTracker's names for a one-process run)
CATEGORIES = {
    "Sharded Param": "params", "Buffer": "params", "Parameter": "params",
    "Unsharded Param": "unsharded params", "All Gather": "unsharded params",
    "Sharded Grad": "grads", "Unsharded Grad": "grads", "Reduce Scatter": "grads", "Gradient": "grads",
    "OptState": "optimizer", "Optstate": "optimizer",
    "Activation": "activations", "Inputs": "activations",
    "Temp": "temporaries", "Other": "temporaries",
}


@dataclass
class StepMeasure:
    """What one rank's tracked step used: memory by category at its peak (bytes), matmul FLOPs counted, collectives."""

    memory: dict
    peak_bytes: int
    matmul_flops: float
    comm: CommCounts
    tokens: int  # tokens this rank's data-parallel group consumes per step (batch x seq x grad_acc)
    params: int = 0  # parameters this rank holds (its shards; a pipeline rank: its stages')
    phases: dict = field(default_factory=dict)  # {phase: (memory, total)} at each phase's peak (lingua.plan.tracker)
    extrapolated_from: Optional[tuple] = None  # the block counts simulated, when extrapolated (lingua.plan.extrapolate)


@contextlib.contextmanager
def fake_world(world_size: int, rank: int):
    """torch's fake process group for `world_size` ranks (nothing for one process, as the train loop has none)."""
    import torch.distributed as dist

    if world_size == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import (
        FakeStore,  # registers the "fake" backend
    )

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        forget_meshes()


def forget_meshes() -> None:
    """Empty DTensor's caches of sharding decisions: they hold the meshes of the world just destroyed, and a mesh of
    another rank's world compares equal to them (same layout), so the next simulation would use a dead group."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    torch._C._clear_DTensor_sharding_propagator_cache()  # its C++ fast path's copy
    clear_redistribute_planner_cache()


def sim_args(args):
    """The config as the simulation runs it: no compile (fake tensors cannot be compiled; the plan is of eager memory),
    no float8 (no CPU kernels: its FLOP rate is applied by the time model instead), bf16 unless fp32 was asked."""
    args = copy.deepcopy(args)
    d = args.distributed
    d.compile, d.float8_recipe, d.device = False, None, "cpu"
    return args


def dist_state(args, world_size: int, rank: int) -> DistState:
    """What lingua.distributed.mesh.init_distributed gives rank `rank` (its mesh on the fake group fake_world made)."""
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"}
    return init_distributed(args.distributed, environ=env)


def fake_batches(args):
    """Endless int64 batches shaped like the loader's (input, target, tok_idx); the values do not matter."""
    d = args.data
    shape = (d.batch_size, d.seq_len)
    target = np.zeros(shape if d.n_views == 2 else (*shape, d.n_views - 1), dtype=np.int64)
    batch = {"input": np.zeros(shape, dtype=np.int64), "target": target,
             "tok_idx": np.broadcast_to(np.arange(d.seq_len, dtype=np.int64), shape).copy()}
    while True:
        yield batch


def build_parallel(args, spec: ModelSpec, state: DistState, dtype: torch.dtype) -> nn.Module:
    """The meta-device model, its attention placed and parallelized by the app's own spec.parallelize, exactly as
    lingua.train.loop.build_model does before it materializes."""
    from lingua.train.loop import build_parallel as loop_build_parallel

    try:
        return loop_build_parallel(args, spec, state, dtype)
    except LinguaError:
        raise
    except Exception as e:  # noqa: BLE001 (a config the model rejects without wording it)
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise LinguaError(f"the config does not build a {spec.name} model "
                          f"({type(e).__name__}: {first[:200]})") from None


def in_categories(snap: dict) -> tuple[dict, int]:
    """A tracker snapshot ({reference type: bytes, "Total": bytes}) in the plan's categories, and its total."""
    out = {}
    for key, n in snap.items():
        name = getattr(key, "value", key)
        if name != "Total":
            out[CATEGORIES.get(name, "temporaries")] = out.get(CATEGORIES.get(name, "temporaries"), 0) + n
    return out, snap.get("Total", sum(out.values()))


def peak_by_category(tracker) -> tuple[dict, int]:
    """The tracker's breakdown at its peak, in the plan's categories (bytes), and the peak itself."""
    return in_categories(next(iter(tracker.get_tracker_snapshot("peak").values()), {}))


def phase_peaks(tracker) -> dict:
    """{phase: (memory by category, total)} at each phase's own peak (lingua.plan.tracker)."""
    return {phase: in_categories(next(iter(snaps.values()), {})) for phase, snaps in tracker.phase_peaks.items()}


@contextlib.contextmanager
def micro_batches_tracked(model: nn.Module, tracker):
    """FSDPMemTracker refuses a second forward of the root in one tracked region (gradient accumulation): forget its
    per-module stats (its global peak stays) where the train loop starts each micro-batch, at
    set_requires_gradient_sync (a forward pre-hook would run after FSDP's own, too late). A pipelined model
    (lingua.plan.pipeline) runs each stage once per microbatch and calls its `before_microbatch(stage module)`: that
    stage's modules are forgotten (not another stage's, whose backward is still to come)."""
    if hasattr(model, "before_microbatch") and hasattr(tracker, "memory_tracking"):
        model.before_microbatch = lambda stage: [tracker.memory_tracking.pop(m, None) for m in stage.modules()]
        try:
            yield
        finally:
            model.before_microbatch = None
        return
    sync = getattr(model, "set_requires_gradient_sync", None)
    if sync is None or not hasattr(tracker, "reset_mod_stats"):
        yield
        return

    def reset_then_sync(*args, **kwargs):
        tracker.reset_mod_stats()
        return sync(*args, **kwargs)

    model.set_requires_gradient_sync = reset_then_sync
    try:
        yield
    finally:
        del model.set_requires_gradient_sync


@contextlib.contextmanager
def step_errors_as_one_line(spec: ModelSpec):
    """A step that cannot run on fake tensors (an op whose output size is data, which a fake tensor does not have;
    the MoE's expert-parallel dispatch avoids it under spec.simulate_context) is one line naming the op."""
    try:
        yield
    except LinguaError:
        raise
    except Exception as e:  # noqa: BLE001 (whatever fake tensors cannot run)
        while e.__cause__ is not None:  # torch's pipelining wraps a stage's error: name the error itself
            e = e.__cause__
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise LinguaError(f"the {spec.name} training step cannot be simulated on fake tensors "
                          f"({type(e).__name__}: {first[:200]})") from None


def make_trainer(args, spec: ModelSpec, model: nn.Module, state: DistState, dtype: torch.dtype):
    """The train loop's own Trainer (forward/backward per micro-batch, the loss all-reduce, clipping, the optimizer
    step, the spec's after-step hook) over fake batches."""
    from lingua.distributed.precision import autocast_context
    from lingua.train.optim import build_optimizer
    from lingua.train.probe import Probe, ProbeArgs
    from lingua.train.step import Trainer

    optimizer, scheduler = build_optimizer(model, args.optim, args.steps)
    return Trainer(args, model, optimizer, scheduler, fake_batches(args), state, autocast_context("cpu", dtype),
                   Probe(ProbeArgs(), "", state.rank), spec.after_optimizer_step)


def whole_model(args, spec: ModelSpec, state: DistState, dtype: torch.dtype):
    """(the parallelized meta-device model, how to make it trainable under FakeTensorMode): no pipeline stages."""
    from lingua.models.decoder import materialize

    # buffers (RoPE tables) and tied weights; no init: values do not matter
    return build_parallel(args, spec, state, dtype), lambda model: materialize(model, "cpu")


def simulate_step(args, spec: ModelSpec, world_size: int, rank: int = 0, build=whole_model) -> StepMeasure:
    """Rank `rank`'s training step of `args` (a TrainArgs of `spec`) on `world_size` ranks, measured on fake tensors.
    build(args, spec, state, dtype) -> (meta model, finish): `whole_model`, or this rank's pipeline stages
    (lingua.plan.pipeline); finish(model) runs under FakeTensorMode and returns the model the Trainer steps."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = sim_args(args)
    dtype = torch.float32 if args.distributed.model_dtype == "fp32" else torch.bfloat16
    with fake_world(world_size, rank):
        state = dist_state(args, world_size, rank)
        model, finish = build(args, spec, state, dtype)
        with FakeTensorMode(allow_non_fake_inputs=True), spec.simulate_context(), step_errors_as_one_line(spec), \
                sharding_propagation_apart():
            model = finish(model)
            trainer = make_trainer(args, spec, model, state, dtype)
            model.train()
            trainer.step(1)  # warm-up: FSDP's lazy init, the optimizer's states
            tracker, flops, comm = memory_tracker(model, trainer.optimizer), flop_counter(), CommCounter()
            with tracker, flops, comm, micro_batches_tracked(model, tracker):
                trainer.step(2)
            memory, peak = peak_by_category(tracker)
            params = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    tokens = args.data.batch_size * args.data.seq_len * args.grad_acc_steps
    return StepMeasure(memory, peak, float(flops.get_total_flops()), comm.counts, tokens, params, phase_peaks(tracker))
