"""AdamW against Muon (optim.name=muon) on the debug model: the same config, data, lr and steps for each.

    python benchmarks/muon_vs_adamw.py [--steps 100] [--lr 3e-3] [--eval-docs 20] [--threads 2] [--step-reps 20]

Each optimizer trains apps/main/configs/debug.yaml's model for --steps steps (cosine schedule, warmup steps/10)
through the shared loop, then the loop's end-of-run evaluation scores --eval-docs validation documents. Printed per
optimizer: the last logged training loss (mean of the last 3 logged steps), validation bits per byte, and the
optimizer step alone in ms (median of --step-reps `optimizer.step()` calls on the same model with fixed random
gradients, outside the loop). Muon uses the AdamW lr unchanged (its updates are RMS-matched: lingua/train/muon.py).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua.args import load_config  # noqa: E402
from lingua.models.transformer.spec import TRANSFORMER_SPEC  # noqa: E402
from lingua.models.transformer.model import Transformer  # noqa: E402
from lingua.train.loop import TrainArgs, train  # noqa: E402
from lingua.train.optim import build_optimizer  # noqa: E402
from tests.conftest import read_jsonl  # noqa: E402

OPTIMIZERS = ("adamw", "muon")


def config(name: str, dump_dir: Path, opts) -> TrainArgs:
    return load_config(TrainArgs, [
        f"config={ROOT}/apps/main/configs/debug.yaml", f"dump_dir={dump_dir}", f"steps={opts.steps}",
        f"optim.name={name}", f"optim.lr={opts.lr}", f"optim.warmup={max(1, opts.steps // 10)}",
        "logging.progress=false", "logging.freq=5", "checkpoint.dump.every=0", "checkpoint.dump.keep=1",
        f"eval.max_docs={opts.eval_docs}", "distributed.model_dtype=fp32", f"data.root_dir={ROOT}/data",
        f"data.tokenizer.path={ROOT}/tokenizers/shakespeare_sp4096.model"])


def optimizer_step_ms(args: TrainArgs, reps: int) -> float:
    """Median ms of optimizer.step() alone on the config's model (one process), gradients fixed and random."""
    args.model.vocab_size = 4096
    model = Transformer.build(args.model)
    optimizer, _ = build_optimizer(model, args.optim, args.steps)
    for group in optimizer.param_groups:  # the peak lr (the schedule's step 0 is 0 under warmup)
        group["lr"] = group["initial_lr"]
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        optimizer.step()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times[1:] or times)


def run(name: str, work: Path, opts) -> dict:
    args = config(name, work / name, opts)
    t0 = time.perf_counter()
    train(args, TRANSFORMER_SPEC)
    wall = time.perf_counter() - t0
    rows = read_jsonl(work / name / "metrics.jsonl")
    evals = read_jsonl(work / name / "metrics.eval.jsonl")
    return {"loss": statistics.mean(r["loss"] for r in rows[-3:]), "bpb": evals[-1]["shakespeare/bpb"],
            "opt_ms": optimizer_step_ms(config(name, work / name, opts), opts.step_reps), "wall_s": wall}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-docs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step-reps", type=int, default=20)
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as work:
        results = {name: run(name, Path(work), opts) for name in OPTIMIZERS}
    print(f"\ndebug model, {opts.steps} steps, lr {opts.lr:g}, fp32, {opts.threads} thread(s)")
    print(f"{'optimizer':<10} {'train loss':>10} {'val bpb':>8} {'opt step ms':>12} {'run s':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['loss']:>10.4f} {r['bpb']:>8.4f} {r['opt_ms']:>12.1f} {r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
