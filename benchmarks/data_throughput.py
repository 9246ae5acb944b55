"""Data throughput, in one run: the token-shard loader and the jsonl loader (tokens/s per process, sync and async),
setup/tokenize_data.py (MB/s with 1 and 2 workers), the async worker's share of a core, and the loader's share of a
real training step.

    python setup/prepare_data.py shakespeare --data_dir data
    python setup/train_tokenizer.py --data_dir data --source shakespeare
    python benchmarks/data_throughput.py --data_dir data --tokenizer tokenizers/shakespeare_sp4096.model

The source's jsonl files are linked into a temporary folder, tokenized there (your data folder is not written), and
loaded from there. Each loader configuration first pays its start-up (async: spawning the worker; both: filling the
shuffle buffers), reported separately; the rate is measured on the batches after the first one. Async measures the
consumer: the trainer's view. The training runs (--train_steps, 0 to skip) train the debug model from the token
shards with the async and the sync loader and report the median step time and the loader's share of it.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "setup"))  # tokenize_data, importable by name: its worker processes import it too

from lingua.data.loader import DataArgs, DataLoader  # noqa: E402
from lingua.data.tokenizer import TokenizerArgs  # noqa: E402
from lingua.distributed.precision import cpu_name  # noqa: E402
from lingua.errors import LinguaError, exit_on_error  # noqa: E402

TOKEN_TARGET = 20e6  # tokens/s per process for the token-shard loader (lingua issue 14)


def measure(args: DataArgs, seconds: float, min_batches: int, windows: int = 5) -> tuple[float, float, float]:
    """(start-up seconds, mean tokens/s, best window's tokens/s) of one loader configuration; the best of `windows`
    equal windows is what the loader does when the (shared) machine leaves it alone."""
    with DataLoader(args) as loader:
        t0 = time.perf_counter()
        next(loader)
        startup = time.perf_counter() - t0
        rates, total, elapsed = [], 0, 0.0
        for _ in range(windows):
            n, t0 = 0, time.perf_counter()
            while n < min_batches // windows or time.perf_counter() - t0 < seconds / windows:
                next(loader)
                n += 1
            dt = time.perf_counter() - t0
            rates.append(n / dt)
            total, elapsed = total + n, elapsed + dt
    tokens = args.batch_size * args.seq_len
    return startup, total * tokens / elapsed, max(rates) * tokens


def worker_share(args: DataArgs, step_s: float, steps: int) -> tuple[float, int]:
    """(share of one core the async worker used, its thread count) while a trainer takes a batch every step_s, in
    steady state (after its start-up and run-ahead)."""
    with DataLoader(args) as loader:
        for _ in range(2 * args.prefetch_size):
            next(loader)
        time.sleep(1.0)
        pid = loader._pipeline.proc.pid
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_s() -> float:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

        c0, t0 = cpu_s(), time.perf_counter()
        for _ in range(steps):
            time.sleep(step_s)  # the training step (the worker's cores are the trainer's)
            next(loader)
        share = (cpu_s() - c0) / (time.perf_counter() - t0)
        threads = int(open(f"/proc/{pid}/status").read().split("Threads:")[1].split()[0])
    return share, threads


def link_source(data_dir: str, source: str, tmp: Path) -> Path:
    """A data folder holding symlinks to the source's jsonl files (tokenizing it writes nothing into data_dir)."""
    folder = tmp / "data" / source
    folder.mkdir(parents=True)
    for name in os.listdir(os.path.join(data_dir, source)):
        if name.endswith(".jsonl"):
            os.symlink(os.path.abspath(os.path.join(data_dir, source, name)), folder / name)
    return folder.parent


def tokenize_rates(root: Path, source: str, tokenizer: str, workers: list[int]) -> list[dict]:
    """MB/s of jsonl tokenized by setup/tokenize_data.py (timed by the script: pool start-up included)."""
    import tokenize_data

    rows = []
    for n in workers:
        shutil.rmtree(root / source / "tokens", ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its summary line: the table below says it
            m = tokenize_data.main(["--data_dir", str(root), "--source", source, "--tokenizer", tokenizer,
                                    "--workers", str(n), "--quiet"])
        mb = sum(s["end"] - s["start"] for split in m["splits"].values() for s in split["shards"]) / 1e6
        rows.append({"workers": n, "mb": mb, "seconds": m["seconds"], "mb_s": mb / m["seconds"],
                     "tokens": sum(split["tokens"] for split in m["splits"].values())})
    return rows


def train_step_share(root: Path, source: str, tokenizer: str, steps: int, load_async: bool, tmp: Path) -> dict:
    """Median step time and mean loader share of the debug model trained from the token shards (steps 2..)."""
    dump = tmp / f"train_{'async' if load_async else 'sync'}"
    cmd = [sys.executable, "-m", "apps.main.train", "config=apps/main/configs/debug.yaml", f"dump_dir={dump}",
           f"steps={steps}", f"data.root_dir={root}", f"data.sources.{source}=1.0", "data.format=tokens",
           f"data.tokenizer.path={os.path.abspath(tokenizer)}", f"data.load_async={load_async}", "logging.freq=1",
           "logging.progress=false", "logging.peak_flops=1e12", "eval.at_end=false", "checkpoint.dump.every=0",
           "optim.warmup=2"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=1800)
    rows = [json.loads(line) for line in open(dump / "metrics.jsonl")][1:]
    return {"step_ms": statistics.median(r["step_ms"] for r in rows),
            "data_share": statistics.mean(r["data_ms"] / r["step_ms"] for r in rows)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--source", default="shakespeare")
    parser.add_argument("--tokenizer", default="tokenizers/shakespeare_sp4096.model", help="sentencepiece model")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--prefetch_size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per loader configuration")
    parser.add_argument("--step_ms", type=float, default=20.0, help="simulated step for the worker's core share")
    parser.add_argument("--train_steps", type=int, default=12, help="debug-model steps per training run (0: skip)")
    a = parser.parse_args(argv)
    if not os.path.isfile(a.tokenizer):
        raise LinguaError(f"no sentencepiece model at {a.tokenizer} (run setup/train_tokenizer.py)")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()[0]:.2f} at start")
    out = {"cpu": cpu_name(), "loader": [], "tokenize": [], "worker": [], "train": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = link_source(a.data_dir, a.source, tmp)
        print(f"\ntokenize_data.py on {a.source} with {a.tokenizer}")
        print(f"{'workers':>8} {'MB':>6} {'seconds':>8} {'MB/s':>7} {'MB/s/worker':>12}")
        out["tokenize"] = tokenize_rates(root, a.source, a.tokenizer, [1, 2])
        for r in out["tokenize"]:
            print(f"{r['workers']:>8} {r['mb']:>6.1f} {r['seconds']:>8.2f} {r['mb_s']:>7.2f} "
                  f"{r['mb_s'] / r['workers']:>12.2f}", flush=True)

        print(f"\nloader: batch_size={a.batch_size} seq_len={a.seq_len} prefetch_size={a.prefetch_size}, one process")
        print(f"{'format':>7} {'tokenizer':>10} {'mode':>6} {'start-up s':>10} {'tokens/s':>13} {'best window':>13}")
        sp = TokenizerArgs("sp", a.tokenizer)
        for fmt, tok in (("tokens", sp), ("jsonl", sp), ("jsonl", TokenizerArgs("bytes"))):
            for load_async in (False, True):
                args = DataArgs(root_dir=str(root), sources={a.source: 1.0}, format=fmt, batch_size=a.batch_size,
                                seq_len=a.seq_len, prefetch_size=a.prefetch_size, load_async=load_async,
                                tokenizer=tok)
                startup, rate, best = measure(args, a.seconds, min_batches=2 * a.prefetch_size)
                mode = "async" if load_async else "sync"
                out["loader"].append({"format": fmt, "tokenizer": tok.name, "mode": mode, "startup_s": startup,
                                      "tok_s": rate, "best_tok_s": best})
                print(f"{fmt:>7} {tok.name:>10} {mode:>6} {startup:>10.2f} {rate:>13,.0f} {best:>13,.0f}",
                      flush=True)

        print(f"\nasync worker while a trainer takes a batch every {a.step_ms:.0f} ms")
        print(f"{'format':>7} {'core share':>11} {'threads':>8}")
        for fmt in ("tokens", "jsonl"):
            args = DataArgs(root_dir=str(root), sources={a.source: 1.0}, format=fmt, batch_size=a.batch_size,
                            seq_len=a.seq_len, prefetch_size=a.prefetch_size, load_async=True, tokenizer=sp)
            share, threads = worker_share(args, a.step_ms / 1000, steps=4 * a.prefetch_size)
            out["worker"].append({"format": fmt, "core_share": share, "threads": threads})
            print(f"{fmt:>7} {100 * share:>10.1f}% {threads:>8}", flush=True)

        if a.train_steps:
            print(f"\ntraining the debug model from the token shards, {a.train_steps} steps (medians of steps 2..)")
            print(f"{'loader':>7} {'step ms':>8} {'loader share':>13}")
            for load_async in (True, False):
                r = train_step_share(root, a.source, a.tokenizer, a.train_steps, load_async, tmp)
                out["train"].append({"mode": "async" if load_async else "sync", **r})
                print(f"{out['train'][-1]['mode']:>7} {r['step_ms']:>8.0f} {100 * r['data_share']:>12.3f}%",
                      flush=True)
    worst = min(r["best_tok_s"] for r in out["loader"] if r["format"] == "tokens")
    verdict = "OK" if worst >= TOKEN_TARGET else "BELOW TARGET"
    print(f"\ntoken-shard loader, slowest mode (best window): {worst / 1e6:.1f}M tok/s per process "
          f"(target >= {TOKEN_TARGET / 1e6:.0f}M): {verdict}; load average {os.getloadavg()[0]:.2f} at the end")
    return out


if __name__ == "__main__":
    exit_on_error(main)()
