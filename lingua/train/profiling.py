"""torch.profiler traces for a few steps of a run (Chrome trace), where their time went (`time_breakdown`: matmuls,
attention, compiled kernels, optimizer, the rest; logged and written next to the trace), and a CUDA memory snapshot on
GPU."""

import contextlib
import json
import logging
import os
import pickle
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class ProfilerArgs:
    run: bool = False  # trace some steps with torch.profiler into trace_folder
    trace_folder: str = "profiling"  # relative to dump_dir
    profile_warmup: int = 2  # steps skipped before tracing (the first steps include one-off costs)
    profile_steps: int = 3  # steps traced
    mem_snapshot: bool = True  # CUDA only: allocator history of the traced steps


# Op or kernel names (substrings) -> where the time goes, first match wins. CPU: the ops' own time; inductor's generated
# kernels run inside "## Call CompiledFxGraph" (their time is its self time). CUDA: the kernels' device time.
TIME_CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash", "fmha", "attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "_grouped_mm", "gemm", "cutlass", "xmma")),
    ("optimizer", ("adam", "Optimizer.", "_foreach_", "multi_tensor", "newton_schulz")),
    ("compiled kernels", ("CompiledFxGraph", "cpp_fused", "triton_")),
)


def time_breakdown(events, device_time: bool = False) -> dict:
    """Share of the profiled steps' time per TIME_CATEGORIES entry (and "other": eager ops, framework), from the
    events of `prof.key_averages()`: self CPU time, or for a CUDA run the device time of the kernels (only the
    kernel events: an op's own device time repeats that of the kernels it launched)."""
    from torch.autograd import DeviceType

    totals = {name: 0.0 for name, _ in TIME_CATEGORIES} | {"other": 0.0}
    for e in events:
        if device_time and getattr(e, "device_type", DeviceType.CUDA) != DeviceType.CUDA:
            continue
        t = e.self_device_time_total if device_time else e.self_cpu_time_total
        name = next((cat for cat, keys in TIME_CATEGORIES if any(k in e.key for k in keys)), "other")
        totals[name] += t
    total = sum(totals.values()) or 1.0
    return {name: t / total for name, t in totals.items()}


def format_breakdown(shares: dict) -> str:
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in shares.items())


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
        shares = time_breakdown(prof.key_averages(), device_time=cuda)
        with open(os.path.join(folder, f"time_breakdown_rank{rank:05d}.json"), "w") as f:
            json.dump(shares, f)
        logger.info(f"wrote profiler trace {path}; time of the traced steps: {format_breakdown(shares)}")
        if cuda and args.mem_snapshot:
            with open(os.path.join(folder, f"memory_snapshot_rank{rank:05d}.pickle"), "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)

    schedule = torch.profiler.schedule(wait=0, warmup=args.profile_warmup, active=args.profile_steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=on_trace_ready) as prof:
        yield prof
    if cuda and args.mem_snapshot:
        torch.cuda.memory._record_memory_history(enabled=None)
