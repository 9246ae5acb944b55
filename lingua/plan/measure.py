"""The real side of the plan's check: one real training step of a small config on real gloo processes, measured
independently of the plan's memory tracker (README "Planning a run: plan vs measured").

    torchrun --nproc_per_node 2 -m lingua.plan.measure config=apps/main/configs/debug.yaml [key=value ...]

Each rank builds the model with the train loop's own build_model (materialized, initialised), takes one warm-up step,
then runs one step under torch's profiler with memory profiling on: the peak is the bytes alive before the step
(every distinct storage of the parameters, buffers, gradients and optimizer states) plus the highest running sum of
the CPU allocator's allocations minus frees during the step. FLOPs come from FlopCounterMode, collectives from the
same counter the plan uses (lingua.plan.comm: the c10d and functional collective ops torch's CommDebugMode counts;
CommDebugMode itself fails in torch 2.13 on the attention kernel module every layer shares). Every rank prints one
JSON line: {"world_size", "rank", "peak_bytes", "matmul_flops", "comm": {kind: bytes}, "calls": {kind: count}} (a
pipeline's ranks differ: one line per stage).
"""

import json
import sys

import torch

from lingua.plan.comm import CommCounter
from lingua.plan.tracker import flop_counter


def live_bytes(model, optimizer) -> int:
    """Bytes of every distinct storage the model and optimizer hold (local shards of DTensors)."""
    seen = {}
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def allocation_peak(prof) -> int:
    """The highest running sum of the allocator's [memory] records (allocations positive, frees negative), in time
    order (the raw records: the function events attribute allocations to ops, parents and children alike)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure_step(trainer, model) -> dict:
    """Step 2 of `trainer` (step 1 is the warm-up), measured."""
    from torch.profiler import ProfilerActivity, profile

    trainer.step(1)
    before = live_bytes(model, trainer.optimizer)
    flops, comm = flop_counter(), CommCounter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, flops, comm:
        trainer.step(2)
    return {"peak_bytes": before + allocation_peak(prof), "matmul_flops": float(flops.get_total_flops()),
            "comm": comm.counts.by_kind(), "calls": dict(comm.counts.calls)}


def main(argv: list[str]) -> None:
    from lingua.args import load_config
    from lingua.distributed.mesh import init_distributed
    from lingua.plan.__main__ import resolve_spec, split_argv
    from lingua.plan.simulate import make_trainer, sim_args
    from lingua.train.loop import build_model, train_args_cls

    ours, rest = split_argv(argv)
    config = next((a.split("=", 1)[1] for a in rest if a.startswith("config=")), None)
    spec = resolve_spec(ours.get("spec", ""), config)
    args = sim_args(load_config(train_args_cls(spec), rest))  # the same eager bf16 step the plan simulates
    dtype = torch.float32 if args.distributed.model_dtype == "fp32" else torch.bfloat16
    state = init_distributed(args.distributed)
    try:
        model = build_model(args, spec, state, dtype)
        model.train()
        result = measure_step(make_trainer(args, spec, model, state, dtype), model)
        print(json.dumps({"world_size": state.world_size, "rank": state.rank, **result}), flush=True)
    finally:
        state.close()


if __name__ == "__main__":
    main(sys.argv[1:])
