"""torch.profiler traces for a few steps of a run (Chrome trace), plus a CUDA memory snapshot on GPU."""

import contextlib
import logging
import os
import pickle
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class ProfilerArgs:
    run: bool = False
    trace_folder: str = "profiling"  # relative to dump_dir
    profile_warmup: int = 2  # steps skipped before tracing (the first steps include one-off costs)
    profile_steps: int = 3
    mem_snapshot: bool = True  # CUDA only: allocator history of the traced steps


class _NoProfiler:
    def step(self):
        pass


@contextlib.contextmanager
def maybe_profile(args: ProfilerArgs, dump_dir: str, rank: int, device: torch.device):
    """Yield an object with `.step()` to call after every train step; traces land in <dump_dir>/<trace_folder>/."""
    if not args.run:
        yield _NoProfiler()
        return
    folder = os.path.join(dump_dir, args.trace_folder)
    os.makedirs(folder, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        if args.mem_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def on_trace_ready(prof):
        path = os.path.join(folder, f"trace_rank{rank:05d}_step{prof.step_num}.json")
        prof.export_chrome_trace(path)
        logger.info(f"wrote profiler trace {path}")
        if cuda and args.mem_snapshot:
            with open(os.path.join(folder, f"memory_snapshot_rank{rank:05d}.pickle"), "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)

    schedule = torch.profiler.schedule(wait=0, warmup=args.profile_warmup, active=args.profile_steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=on_trace_ready) as prof:
        yield prof
    if cuda and args.mem_snapshot:
        torch.cuda.memory._record_memory_history(enabled=None)
