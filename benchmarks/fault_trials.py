"""Kill a rank at a random moment of a 2-process FSDP run under torchrun --max-restarts 1: does the job recover, and
does it end bit-identical to an uninterrupted run?

    python benchmarks/fault_trials.py [--trials 2] [--kinds step,save,async_save,eval] [--steps 24] [--seed 0]

Each trial launches tests/dist_helpers.py (the real train loop, tiny fp32 model, the tests' tiny corpus) and SIGKILLs
rank 0 or 1 (chosen at random) at a moment of its kind:
  step        after a random number of logged steps, plus a random 0-200 ms
  save        while a checkpoint's .tmp directory exists (its shards are being written)
  async_save  the same with checkpoint.async_save=true (the write runs in a background thread)
  eval        right after a step that evaluates (eval.every) was logged, while the evaluation runs
It reports, per kind: trials, recovered (exit 0 at the last step), identical (final weights bit for bit and
metrics.jsonl steps 1..N once each with the uninterrupted losses) and the time from the kill to the first step logged
by the restarted job, and the CPU that ran it. A trial whose moment was missed (the run finished first) is counted
as such, not as a recovery.
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua.distributed.precision import cpu_name  # noqa: E402
from tests.conftest import final_weights, read_jsonl, tiny_overrides, write_corpus  # noqa: E402
from tests.dist_helpers import torchrun, torchrun_cmd  # noqa: E402

EVAL_EVERY, SAVE_EVERY = 5, 4


def overrides(corpus: Path, dump: Path, steps: int, async_save: bool) -> list[str]:
    return tiny_overrides(corpus, dump, steps=steps, optim__warmup=0, distributed__dp_shard=2,
                          checkpoint__dump__every=SAVE_EVERY, checkpoint__async_save=async_save,
                          eval__every=EVAL_EVERY, distributed__timeout_s=60)


class Output:
    """torchrun's merged output, line by line with the time each arrived."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def first_new_step(self, after: float) -> float | None:
        """When the restarted job logged its first step: the first 'step N | loss' line after 'resumed from' (or
        after the restart began, for a kill before the first checkpoint)."""
        restarted = False
        for t, line in self.lines:
            if t < after:
                continue
            restarted = restarted or "resumed from" in line or "model (" in line
            if restarted and "step " in line and " | loss " in line:
                return t
        return None


def wait_for_moment(kind: str, dump: Path, proc, rng: random.Random, steps: int) -> bool:
    """Block until the moment of `kind`; False if the run ended first."""
    ckpts, metrics = dump / "checkpoints", dump / "metrics.jsonl"
    target = rng.randint(2, steps - 6)

    def logged() -> list[int]:
        try:
            return [r["step"] for r in read_jsonl(metrics)]
        except (OSError, ValueError):  # not there yet, or a line being written
            return []

    while proc.poll() is None:
        done = logged()
        if kind == "step" and len(done) >= target:
            time.sleep(rng.uniform(0, 0.2))
            return True
        if kind in ("save", "async_save") and done and done[-1] >= target and ckpts.is_dir() \
                and any(p.name.endswith(".tmp") for p in ckpts.iterdir()):
            return True
        if kind == "eval" and done and done[-1] >= target and done[-1] % EVAL_EVERY == 0:
            return True
        time.sleep(0.002)
    return False


def trial(kind: str, corpus: Path, work: Path, ref: Path, steps: int, rng: random.Random) -> dict:
    dump = work / f"{kind}_{rng.randrange(10**6)}"
    cmd = torchrun_cmd(2, overrides(corpus, dump, steps, kind == "async_save"), ["--record", str(dump / "rec")],
                       max_restarts=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, victim = Output(proc), rng.randint(0, 1)
    hit = wait_for_moment(kind, dump, proc, rng, steps)
    t_kill = time.time()
    if hit:
        os.kill(int((dump / "rec" / f"pid{victim}").read_text()), signal.SIGKILL)
    proc.wait(timeout=900)
    time.sleep(0.2)  # the reader thread takes the last lines
    result = {"kind": kind, "hit": hit, "rank": victim, "rc": proc.returncode, "recovered": False,
              "identical": False, "kill_to_step_s": None}
    if not hit:
        return result
    rows = read_jsonl(dump / "metrics.jsonl") if (dump / "metrics.jsonl").is_file() else []
    result["recovered"] = proc.returncode == 0 and bool(rows) and rows[-1]["step"] == steps
    first = out.first_new_step(t_kill)
    result["kill_to_step_s"] = None if first is None else first - t_kill
    if result["recovered"]:
        ref_rows = read_jsonl(ref / "metrics.jsonl")
        same_rows = [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in ref_rows]
        a, b = final_weights(ref), final_weights(dump)
        result["identical"] = same_rows and a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=2, help="per kind")
    p.add_argument("--kinds", default="step,save,async_save,eval")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args()
    rng = random.Random(opts.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus")
        t0 = time.time()
        torchrun(2, overrides(corpus, work / "ref", opts.steps, False))
        print(f"uninterrupted run: {time.time() - t0:.1f} s", flush=True)
        results = []
        for kind in opts.kinds.split(","):
            for _ in range(opts.trials):
                r = trial(kind, corpus, work, work / "ref", opts.steps, rng)
                print(json.dumps(r), flush=True)
                results.append(r)
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; 2 ranks (gloo), torchrun --max-restarts 1, {opts.steps} steps")
    print("| kill during | trials | moment hit | recovered | identical | kill -> first new step (median, max) |")
    print("|---|---|---|---|---|---|")
    for kind in opts.kinds.split(","):
        rs = [r for r in results if r["kind"] == kind]
        times = [r["kill_to_step_s"] for r in rs if r["kill_to_step_s"] is not None]
        span = f"{statistics.median(times):.1f} s, {max(times):.1f} s" if times else "-"
        print(f"| {kind} | {len(rs)} | {sum(r['hit'] for r in rs)} | {sum(r['recovered'] for r in rs)} | "
              f"{sum(r['identical'] for r in rs)} | {span} |")


if __name__ == "__main__":
    main()
