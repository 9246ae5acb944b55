"""The memory tracker the plan's step runs under: torch's FSDPMemTracker (MemTracker for a one-process run) keeping
only what the plan reads, the step's peak, and that peak per phase of the step (lingua.plan.extrapolate).

torch's trackers also keep every module's own peak: after every op they walk all the modules seen so far, each
through a weak reference whose lookup asks the module for an attribute it does not have (an AttributeError raised
and caught through nn.Module.__getattr__, twice under a checkpoint wrapper). That is ops x modules, quadratic in the
number of blocks: it was most of a 70B plan's time. Here the per-op update compares one total.

A phase is where the step is when the memory is counted: (segment, pass, place). A segment is a stretch of ops in
one pass (forward, backward, optimizer), counted from the tracked region's start (micro-batch 2's backward is another
segment than micro-batch 1's); the place is the block being run, named by its position from the nearer end (block 0,
block 1, middle, block -2, block -1), or before or after the blocks. A phase's peak is then a line in the number of
blocks (a middle block's peak lies between those of blocks 1 and -2), which is what lets lingua.plan.extrapolate
simulate 4 and 6 blocks for 80.
"""

import contextlib

import torch
from torch import nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker


# Blocks this close to either end of the stack are phases of their own: the first block has no input gradient to
# compute, the last is not resharded after the forward, FSDP prefetches the next block's parameters (none after
# the last in the pass). Beyond them, a block's peak is a line in its index.
EDGE = 2


def block_place(i: int, n: int) -> str:
    """Block i of n by its position: "block 0", "block 1", ..., "middle", ..., "block -2", "block -1" (the last)."""
    if i < EDGE:
        return f"block {i}"
    return f"block {i - n}" if i >= n - EDGE else "middle"


class StepPeaks:
    """Mixin over torch's MemTracker (first base) replacing its per-op peak update. `phase_peaks`: {phase:
    {device: {category: bytes, "Total": bytes}}} at each phase's own peak."""

    def watch_blocks(self, model: nn.Module) -> None:
        layers = getattr(model, "layers", None) or []
        root = type(model).__name__  # how the tracker's ModTracker names the root (and so its blocks' fqns)
        n = len(layers)
        self.block_place = {f"{root}.layers.{i}": block_place(i, n) for i in range(n)}
        self.phase_peaks, self.segment, self.seen_block = {}, (-1, ""), False

    def phase(self) -> tuple:
        pass_ = "optimizer" if self._in_opt else "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        if pass_ != self.segment[1]:
            self.segment, self.seen_block = (self.segment[0] + 1, pass_), False
        place = next((self.block_place[p] for p in self._mod_tracker.parents if p in self.block_place), None)
        if place is not None:
            self.seen_block = True
        return (*self.segment, place or ("after blocks" if self.seen_block else "before blocks"))

    def _update_peak_stats(self, peak_state) -> None:
        phase = self.phase() if hasattr(self, "phase_peaks") else None
        for dev, snap in self._curr_mem_snap.items():
            total = snap[_TOTAL_KEY]
            if self._peak_mem.get(dev, 0) < total:
                self._peak_mem[dev] = total
                self._peak_mem_snap[dev] = dict(snap)
            if phase is not None:
                at = self.phase_peaks.setdefault(phase, {})
                if at.get(dev, {}).get(_TOTAL_KEY, -1) < total:
                    at[dev] = dict(snap)


class PlanFSDPMemTracker(StepPeaks, FSDPMemTracker):
    pass


class PlanMemTracker(StepPeaks, MemTracker):
    pass


def memory_tracker(model: nn.Module, optimizer):
    """The tracker for `model` and its optimizer: FSDPMemTracker's kind for one FSDP module, else MemTracker's (one
    process, or a pipelined model's stages, lingua.plan.pipeline); a model's own `layers` are watched for phases."""
    from torch.distributed.fsdp import FSDPModule

    stages = getattr(model, "stages", [model])  # a pipelined model: the stage modules it runs
    if len(stages) == 1 and isinstance(stages[0], FSDPModule):
        tracker = PlanFSDPMemTracker(stages[0], optimizer)
    else:
        tracker = PlanMemTracker()
        tracker.track_external(model, optimizer)
    tracker.watch_blocks(model if len(stages) == 1 and stages[0] is model else nn.Module())
    return tracker


class _NoModules:
    """FlopCounterMode's module tracker, tracking nothing: every FLOP is counted under "Global" only."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        pass


def flop_counter():
    """torch's FlopCounterMode with lingua.plan.flops's formulas (the MoE's grouped GEMM) and without its per-module
    attribution, which the plan does not read: that attribution hooks every module's outputs for the backward and
    keeps the hooks' handles to the end of the region, in reference cycles that hold activations until Python's
    garbage collector runs (measured: 30 GB more of the 7B's step held with the collector off, and what the collector
    happens to free mid-step moved repeated plans by about 1 GiB)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lingua.plan.flops import extra_flop_formulas

    counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
    counter.mod_tracker = _NoModules()
    return counter


@contextlib.contextmanager
def sharding_propagation_apart():
    """DTensor derives an op's output shape by running it on global-shaped fake tensors, in the fake mode it finds
    active or else a fresh one (torch.distributed.tensor._sharding_prop: `detect_fake_mode() or FakeTensorMode()`).
    In a real run that is a fresh mode, which the memory tracker skips; in the plan's step it found the plan's own,
    and the tracker counted those global-shaped tensors as the rank's (loss parallel's log-softmax: two fp32
    (tokens, vocab) tensors, not (tokens, vocab / tp); the plan's TP peaks were 10-16% above the measured ones).
    Here propagation always gets a fresh mode, as in a real run."""
    from torch.distributed.tensor import _sharding_prop

    detect = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args: None
    try:
        yield
    finally:
        _sharding_prop.detect_fake_mode = detect
