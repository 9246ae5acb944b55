"""What a person needs to trust a run: metrics.jsonl, a console line, a progress bar, MFU and memory.

MFU = model FLOPs per second / peak FLOPs per second of the device. The peak comes from a table of common GPUs
(dense, no sparsity), from a short matmul calibration of the chosen dtype on CPU (and on GPUs missing from the
table), or from `logging.peak_flops`. On CPU the calibrated figure is what this machine's matmul achieves, so
MFU there reads "fraction of the best matmul throughput", which is the figure a CPU run can be held to.
"""

import json
import logging
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from lingua.errors import require
from lingua.files import write_text_atomic

# Keys every logged train step carries in metrics.jsonl (the train loop fills them).
TRAIN_KEYS = ("step", "tokens_seen", "train_s", "loss", "lr", "grad_norm", "tok_per_s", "mfu", "step_ms", "data_ms", "mem_gb")


@dataclass
class LoggingArgs:
    freq: int = 10  # log (file and console) every `freq` steps
    peak_flops: Optional[float] = None  # FLOP/s used for MFU instead of the table / calibration
    wandb: bool = False  # needs the 'wandb' extra; honours WANDB_MODE=offline
    tensorboard: bool = False  # needs the 'tensorboard' extra; writes <dump_dir>/tensorboard/
    progress: bool = True  # progress bar with ETA, only when stdout is a terminal
    # debugging: fail a step other than a logging/save step that makes the host wait for the device (.item(),
    # nonzero, ...; lingua/train/host_sync.py). Slow (every op is inspected); on CPU, tensors stand in for the GPU's
    check_host_syncs: bool = False
    # warn when one rank's own step time (lingua/train/stragglers.py) is this many times the other ranks' median at 3
    # logging steps in a row; 0 never warns (the rank_ms_max/min and slowest_rank metrics are logged either way)
    slow_rank_factor: float = 2.0


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl (+ optional wandb / tensorboard)
# ---------------------------------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    """A JSON-safe value: tensors and numpy scalars become numbers, nan/inf become null (strict JSON)."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of a metrics file up to `step`; a line that is not JSON (a write cut by kill -9) goes too."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = row.get("step", 0) <= step
        except (ValueError, AttributeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        dropped += not keep and bool(line.strip())
    if dropped:
        write_text_atomic(path, "".join(kept))


class MetricLogger:
    """Appends one JSON object per call to <dump_dir>/metrics.jsonl (eval: metrics.eval.jsonl), rank 0 only.

    Files are opened in append mode, so a resumed run continues the same files; `resume_step` first drops the rows
    past the step it resumed from (the steps it will replay) and any half-written last line. A context manager.
    """

    def __init__(
        self,
        dump_dir: str | os.PathLike,
        args: LoggingArgs,
        rank: int = 0,
        run_name: Optional[str] = None,
        config_dict: Optional[dict] = None,
        resume_step: Optional[int] = None,
    ):
        self.dump_dir = Path(dump_dir)
        self.args = args
        self.rank = rank
        self.run_name = run_name or self.dump_dir.name
        self._files: dict[str, TextIO] = {}
        self._wandb = None
        self._tb = None
        if rank != 0:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for name in ("metrics.jsonl", "metrics.eval.jsonl"):
                drop_rows_after(self.dump_dir / name, resume_step)
        if args.wandb:
            self._wandb = self._start_wandb(config_dict)
        if args.tensorboard:
            require("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dump_dir / "tensorboard"))

    def _start_wandb(self, config_dict: Optional[dict]):
        wandb = require("wandb", "wandb")
        # one wandb run per dump_dir: a resumed training run keeps logging into the same wandb run
        id_file = self.dump_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)  # wandb>=0.2x dropped wandb.util.generate_id
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lingua"),
            name=self.run_name,
            id=run_id,
            resume="allow",
            dir=str(self.dump_dir),
            config=config_dict,
        )

    def _append(self, filename: str, row: dict) -> None:
        f = self._files.get(filename)
        if f is None:
            f = self._files[filename] = open(self.dump_dir / filename, "a")
        f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()

    def _backends(self, row: dict, prefix: str) -> None:
        step = row.get("step")
        scalars = {
            prefix + k: v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=step)

    def _log(self, filename: str, metrics: dict, prefix: str, skip=()) -> None:
        """The row to the file; to wandb/tensorboard without the `skip` keys (counts, not metrics)."""
        if self.rank == 0:
            row = {k: _plain(v) for k, v in metrics.items()}
            self._append(filename, row)
            self._backends({k: v for k, v in row.items() if not k.endswith(tuple(skip))}, prefix)

    def log(self, metrics: dict) -> None:
        """One train row (see TRAIN_KEYS) to metrics.jsonl and the optional backends."""
        self._log("metrics.jsonl", metrics, prefix="")

    def log_eval(self, metrics: dict) -> None:
        """One evaluation row to metrics.eval.jsonl (backends get the keys under 'eval/')."""
        self._log("metrics.eval.jsonl", metrics, prefix="eval/", skip=("/tokens", "/bytes"))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# Console: one readable line per logged step, and a progress bar on terminals
# ---------------------------------------------------------------------------------------------------------


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_console_line(metrics: dict) -> str:
    """e.g. 'step 120 | loss 3.2145 | lr 3.00e-04 | gnorm 0.842 | 12.30k tok/s | MFU 41.2% | 312 ms/step
    (data 3.1 ms) | mem 1.23 GB'. Keys that are missing or None are left out."""
    m = {k: _plain(v) for k, v in metrics.items()}
    m = {k: (float("nan") if v is None and k == "loss" else v) for k, v in m.items()}  # a null loss is a nan
    parts = []
    fmt = [
        ("step", lambda v: f"step {v}"),
        ("loss", lambda v: f"loss {v:.4f}"),
        ("lr", lambda v: f"lr {v:.2e}"),
        ("grad_norm", lambda v: f"gnorm {v:.3f}"),
        ("tok_per_s", lambda v: f"{_si(v)} tok/s"),
        ("mfu", lambda v: f"MFU {100 * v:.1f}%"),
        ("step_ms", lambda v: f"{v:.0f} ms/step"),
        ("data_ms", lambda v: f"data {v:.1f} ms"),
        ("mem_gb", lambda v: f"mem {v:.2f} GB"),
    ]
    for key, f in fmt:
        if m.get(key) is not None:
            parts.append(f(m[key]))
    return " | ".join(parts)


class Progress:
    """A tqdm progress bar (ETA, the terminal's width, redrawn in place); silent unless the stream is a terminal.

    While it is open the `lingua` logger's console lines go through tqdm (`logging_redirect_tqdm`), so log lines
    (checkpoints, evals, warnings) land above the bar instead of glued to it; `write()` does the same for a line.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream: Optional[TextIO] = None,
                 desc: str = "train", unit: str = "step"):
        self.stream = stream or sys.stdout
        self.enabled = enabled and self.stream.isatty()
        self._bar = self._redirect = None
        if not self.enabled:
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(total=max(total, 1), initial=start, file=self.stream, desc=desc, unit=unit,
                         dynamic_ncols=True, mininterval=0.1, leave=True)
        self._redirect = logging_redirect_tqdm([logging.getLogger("lingua")], tqdm_class=tqdm)
        self._redirect.__enter__()

    def update(self, step: int, suffix: str = "") -> None:
        if self._bar is None:
            return
        if suffix:
            self._bar.set_postfix_str(suffix, refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, text: str) -> None:
        """Print a full line; on a terminal it goes above the bar, which is redrawn below it."""
        if self._bar is None:
            print(text, file=self.stream, flush=True)
        else:
            self._bar.write(text, file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._redirect.__exit__(None, None, None)
            self._bar.close()
            self._bar = self._redirect = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# MFU: peak FLOP/s of the device, model FLOPs utilisation, memory
# ---------------------------------------------------------------------------------------------------------

# (the words of torch.cuda.get_device_name() that name the model, label, dense bf16 tensor-core FLOP/s, fp32 FLOP/s
# without tensor cores). A GPU matches when every word is one of its name's words (split on spaces and dashes), so
# "GH200" is not an "H200" and "A10" is not an "A100"; variants (PCIe, NVL) come before their base model.
# Sources, dense (no sparsity) per GPU: NVIDIA's H100/H200/H800/H20, A100/A800, L4/L40/L40S, A10/A10G datasheets;
# Blackwell: HGX B200 (36 PF bf16 sparse and 600 TF fp32 per 8 GPUs) and GB200 NVL72 (360 PF bf16 sparse and
# 5,760 TF fp32 per 72 GPUs) datasheets; GH200: its Hopper GPU is an H100 SXM's; AMD Instinct MI300X datasheet
# (1307.4 TF bf16 dense, 163.4 TF fp32 vector).
GPU_PEAK_FLOPS: list[tuple[tuple[str, ...], str, Optional[float], float]] = [
    (("H100", "PCIE"), "H100 PCIe", 756e12, 51.2e12),
    (("H100", "NVL"), "H100 NVL", 835e12, 60e12),
    (("H100",), "H100 SXM", 989e12, 67e12),
    (("H200", "NVL"), "H200 NVL", 835e12, 60e12),
    (("H200",), "H200", 989e12, 67e12),
    (("GH200",), "GH200", 989e12, 67e12),
    (("H800", "PCIE"), "H800 PCIe", 756e12, 51.2e12),
    (("H800",), "H800 SXM", 989e12, 67e12),
    (("H20",), "H20", 148e12, 44e12),
    (("B200",), "B200", 2.25e15, 75e12),
    (("GB200",), "GB200", 2.5e15, 80e12),
    (("A100",), "A100", 312e12, 19.5e12),
    (("A800",), "A800", 312e12, 19.5e12),
    (("A10G",), "A10G", 70e12, 35e12),
    (("A10",), "A10", 125e12, 31.2e12),
    (("L40S",), "L40S", 362e12, 91.6e12),
    (("L40",), "L40", 181e12, 90.5e12),
    (("L4",), "L4", 121e12, 30.3e12),
    (("V100",), "V100", None, 15.7e12),  # no native bf16
    (("RTX", "4090"), "RTX 4090", 165e12, 82.6e12),
    (("RTX", "3090"), "RTX 3090", 71e12, 35.6e12),
    (("MI300X",), "MI300X", 1307.4e12, 163.4e12),
]


def gpu_table_peak(name: str, dtype: torch.dtype) -> Optional[tuple[float, str]]:
    """Peak FLOP/s for a GPU name from the table, or None when the GPU is not in it."""
    words = set(re.split(r"[\s\-_]+", name.upper()))
    for required, label, bf16, fp32 in GPU_PEAK_FLOPS:
        if words.issuperset(required):
            if dtype == torch.bfloat16 and bf16 is not None:
                return bf16, f"table: {label} bf16"
            note = " (no native bf16)" if dtype == torch.bfloat16 else ""
            if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
                note = " (TF32 matmuls are on, so MFU can read high)"
            return fp32, f"table: {label} fp32{note}"
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))


@torch.no_grad()
def calibrate_matmul(
    dtype: torch.dtype, device: torch.device = torch.device("cpu"), size: Optional[int] = None, time_box_s: float = 1.0
) -> tuple[float, str]:
    """Best achieved FLOP/s of repeated square `size`^3 matmuls in `dtype`, measured for about `time_box_s`.

    A 256^3 probe first estimates the speed; if one `size` matmul would take over a quarter of the time box
    (bf16 emulated on an AVX2 CPU is ~100x slower than fp32), the size is halved until it fits, so the whole
    calibration stays close to `time_box_s`.
    """
    device = torch.device(device)
    size = size or (4096 if device.type == "cuda" else 1024)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def matrices(n):
        return torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)

    start = time.perf_counter()
    a, b = matrices(256)
    torch.mm(a, b)  # warms up the thread pool / CUDA context
    sync()
    t = time.perf_counter()
    torch.mm(a, b)
    sync()
    probe = time.perf_counter() - t
    while size > 128 and probe * (size / 256) ** 3 > time_box_s / 4:
        size //= 2
    a, b = matrices(size)
    c = torch.empty(size, size, device=device, dtype=dtype)
    t = time.perf_counter()
    torch.mm(a, b, out=c)  # warm-up at the chosen size: kernel selection, caches
    sync()
    first = time.perf_counter() - t

    reps = max(1, int(0.02 / max(first, 1e-9)))  # one sample lasts >= ~20 ms, so timer overhead is negligible
    best, samples = math.inf, 0
    while samples < 1 or time.perf_counter() - start < time_box_s:
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync()
        best = min(best, (time.perf_counter() - t) / reps)
        samples += 1
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return 2 * size**3 / best, f"calibrated: {size}^3 {_dtype_name(dtype)} matmul, best of {samples}{threads}"


def peak_flops(device: torch.device, dtype: torch.dtype, override: Optional[float] = None) -> tuple[Optional[float], str]:
    """(peak FLOP/s, where the number comes from) for MFU: the override, the GPU table, a calibration on CPU; None
    for a GPU missing from the table."""
    if override:
        return float(override), "logging.peak_flops override"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        # an unknown GPU gets no MFU: a calibrated matmul would make MFU look better than the datasheet's
        return gpu_table_peak(name, dtype) or (None, f"'{name}' is not in the table: no MFU (set logging.peak_flops)")
    return calibrate_matmul(dtype, device)


def mfu(flops_per_token: float, tok_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation as a fraction: flops_per_token (forward + backward) * tokens/s / peak FLOP/s."""
    return flops_per_token * tok_per_s / peak if peak > 0 else 0.0


def memory_gb(device: torch.device) -> float:
    """GiB in use: CUDA's peak allocated memory (since the last `memory_window`), or on CPU the process's RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS: bytes on macOS, kB elsewhere
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def cuda_memory_row(stats: dict) -> dict:
    """The allocator's numbers a person needs, from torch.cuda.memory_stats(): peak allocated and reserved GiB (a
    reserved figure far above the allocated one is fragmentation) and the allocation retries (cudaMalloc failed, the
    cache was flushed and the allocation retried: a run close to OOM and slow because of it)."""
    return {"mem_gb": stats.get("allocated_bytes.all.peak", 0) / 2**30,
            "mem_reserved_gb": stats.get("reserved_bytes.all.peak", 0) / 2**30,
            "alloc_retries": stats.get("num_alloc_retries", 0)}


def memory_window(device: torch.device) -> dict:
    """Memory keys of one logged row, then the peaks start again for the next logging window. On CUDA: mem_gb,
    mem_reserved_gb, alloc_retries (cumulative); on CPU only mem_gb (RSS): a CPU has no caching allocator, so the
    other keys are absent rather than null. Host-side counters: no device sync."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"mem_gb": memory_gb(device)}
    row = cuda_memory_row(torch.cuda.memory_stats(device))
    torch.cuda.reset_peak_memory_stats(device)
    return row
