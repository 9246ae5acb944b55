"""Layer extrapolation: the step of a model of n blocks, from the simulated steps of the same config with 4 and 6
blocks (everything else the same: embeddings, output, loss, optimizer, parallelism).

A simulated step costs time in proportion to its ops, so to its blocks (the 70B: 80). Every quantity the plan reads
is a line in the number of blocks n for blocks that are all alike: the FLOPs, the bytes and calls of each collective
(per kind and group), and the memory at each phase's own peak (lingua.plan.tracker: a phase is a stretch of one pass
at one place: the two blocks at either end of the stack, before or after the blocks; in a pass the blocks run in
order, so a middle block's memory lies between those of the second and the second-to-last). The step's peak is the
largest extrapolated phase peak, so a peak that moves with depth (full AC: from the loss at a few blocks into the
backward at many, where every later block's gradient is held) moves with it. tests/test_plan.py checks the debug
model's 8 blocks against the direct simulation; README "Planning a run" gives the 7B's and the 70B's both ways.

    measure = measure_step(args, spec, world_size, rank)          # extrapolated above AUTO_ABOVE blocks
    measure = measure_step(args, spec, world_size, rank, extrapolate=False)
"""

import copy
from collections import defaultdict
from typing import Callable, Optional

from lingua.errors import ConfigError
from lingua.models.spec import ModelSpec
from lingua.plan.comm import CommCounts
from lingua.plan.simulate import StepMeasure, simulate_step, whole_model

# the two simulated depths: 4 has each of lingua.plan.tracker's edge places (blocks 0, 1, -2, -1), 6 two middle blocks
FROM_BLOCKS = (4, 6)
AUTO_ABOVE = 12  # blocks: deeper models are extrapolated unless told not to (4 + 6 blocks simulated instead)


def parse_extrapolate(value: str) -> Optional[bool]:
    """The CLI's extrapolate=auto|true|false -> None (auto) | True | False."""
    choices = {"auto": None, "true": True, "false": False}
    if value.lower() not in choices:
        raise ConfigError(f"extrapolate={value!r} is not one of auto, true, false")
    return choices[value.lower()]


def with_blocks(args, n_blocks: int):
    """A copy of `args` (a TrainArgs) whose model has `n_blocks` blocks."""
    args = copy.deepcopy(args)
    args.model.n_layers = n_blocks
    return args


def line(y1: float, y2: float, n: int, x1: int, x2: int) -> float:
    return y1 + (y2 - y1) * (n - x1) / (x2 - x1)


def extrapolate_measure(m1: StepMeasure, m2: StepMeasure, n: int, blocks: tuple = FROM_BLOCKS) -> StepMeasure:
    """The StepMeasure of `n` blocks from those of blocks[0] (m1) and blocks[1] (m2) blocks."""
    x1, x2 = blocks
    phases = {}
    for phase in m1.phases.keys() & m2.phases.keys():  # a middle block's phase is not in the 2-block step
        (mem1, total1), (mem2, total2) = m1.phases[phase], m2.phases[phase]
        mem = {k: round(line(mem1.get(k, 0), mem2.get(k, 0), n, x1, x2)) for k in mem1.keys() | mem2.keys()}
        phases[phase] = (mem, round(line(total1, total2, n, x1, x2)))
    memory, peak = max(phases.values(), key=lambda mt: mt[1]) if phases else (m2.memory, m2.peak_bytes)
    comm = CommCounts(defaultdict(int), defaultdict(int))
    for key in m1.comm.bytes.keys() | m2.comm.bytes.keys():
        comm.bytes[key] = round(line(m1.comm.bytes.get(key, 0), m2.comm.bytes.get(key, 0), n, x1, x2))
    for kind in m1.comm.calls.keys() | m2.comm.calls.keys():
        comm.calls[kind] = round(line(m1.comm.calls.get(kind, 0), m2.comm.calls.get(kind, 0), n, x1, x2))
    flops = line(m1.matmul_flops, m2.matmul_flops, n, x1, x2)
    params = round(line(m1.params, m2.params, n, x1, x2))
    return StepMeasure(memory, peak, flops, comm, m2.tokens, params, phases, extrapolated_from=blocks)


def extrapolated(simulate: Callable, args, blocks: tuple = FROM_BLOCKS) -> StepMeasure:
    """`simulate(args) -> StepMeasure` (simulate_step for one rank, or a pipeline stage's) run at blocks[0] and
    blocks[1] blocks and extrapolated to args.model.n_layers."""
    m1, m2 = (simulate(with_blocks(args, b)) for b in blocks)
    return extrapolate_measure(m1, m2, args.model.n_layers, blocks)


def should_extrapolate(args, extrapolate: Optional[bool]) -> bool:
    """extrapolate None: when the model has more than AUTO_ABOVE blocks and no pipeline stages (whose blocks the
    tracker's phases do not follow yet); True needs more than FROM_BLOCKS[1] blocks and no pipeline."""
    n, pp = getattr(args.model, "n_layers", 0), args.distributed.pp_size
    if extrapolate and pp > 1:
        raise ConfigError(f"extrapolate=true cannot be combined with distributed.pp_size={pp} yet: plan it with "
                          "extrapolate=false")
    if extrapolate and n <= FROM_BLOCKS[1]:
        raise ConfigError(f"extrapolate=true needs model.n_layers > {FROM_BLOCKS[1]} (got {n}): it extrapolates "
                          f"from {FROM_BLOCKS[0]} and {FROM_BLOCKS[1]} blocks")
    return n > AUTO_ABOVE and pp == 1 if extrapolate is None else extrapolate


def measure_step(args, spec: ModelSpec, world_size: int, rank: int = 0, extrapolate: Optional[bool] = None,
                 build=whole_model) -> StepMeasure:
    """simulate_step (with `build`: the whole model, or lingua.plan.pipeline's stages), extrapolated from FROM_BLOCKS
    blocks when should_extrapolate says so."""
    if not should_extrapolate(args, extrapolate):
        return simulate_step(args, spec, world_size, rank, build=build)
    return extrapolated(lambda a: simulate_step(a, spec, world_size, rank, build=build), args)
