"""Golden losses: the per-step loss and grad norm of every shipped model on a tiny fixed run, recorded once and
compared bit for bit on the same machine, within a measured tolerance elsewhere.

    python -m tests.golden.record                    # print the runs as JSON
    python -m tests.golden.record --write            # regenerate tests/golden/losses.json (say why in the commit)
    python -m tests.golden.record --check            # compare with tests/golden/losses.json (tolerance: TOLERANCE)
    python -m tests.golden.record --out a.json       # keep a run's numbers, then --compare a.json b.json: bit for bit

Every run goes through the public command line (`python -m apps.<app>.train key=value ...`, under torchrun for the
2-process FSDP runs), so the same script measures a commit before and after a refactor that moves every module: the
comparison of two commits on one machine is the proof that a move changed no number.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("losses.json")
STEPS = 20

# Largest relative difference allowed between this machine's run and the checked-in file. Measured (tests/golden/
# README.md): recording on one AVX512-BF16 CPU with the kernels forced to each ISA they dispatch to
# (ATEN_CPU_CAPABILITY=avx2/default, ONEDNN_MAX_CPU_ISA=AVX2/SSE41, MKL_ENABLE_INSTRUCTIONS=AVX2) moved no loss or
# grad norm of the 200 recorded steps by more than 3.4e-7 relative. Other CPUs (AMX, another vendor's BLAS blocking)
# round in other orders we could not force here, so the file is checked at ~150x that spread; a real numerical
# change (an eps, an init, a reduction) moves these numbers by 1e-3 or more. Two commits on one machine are
# compared with --compare, bit for bit.
TOLERANCE = 5e-5

TRAIN = {"dump_dir": None, "steps": STEPS, "seed": 7, "data.batch_size": 4, "data.seq_len": 32,
         "data.load_async": False, "data.tokenizer.name": "bytes", "data.sources.alpha": 1.0, "optim.lr": 3e-3,
         "optim.warmup": 2, "logging.freq": 1, "logging.progress": False, "logging.peak_flops": 1e11,
         "checkpoint.dump.every": 10, "eval.every": 0, "eval.at_end": False, "distributed.model_dtype": "fp32",
         "distributed.compile": False}
DENSE = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.vocab_size": 258, "model.max_seqlen": 64}
MODELS = {
    "transformer": ("apps.main.train", {**DENSE, "model.mask": "block_causal"}),
    "mtp": ("apps.mtp.train", {**DENSE, "model.mask": "block_causal", "model.n_future_head": 2, "data.n_views": 3}),
    "fastRNN": ("apps.fastRNN.train", {**DENSE, "model.cell": "hawk"}),
    "mamba": ("apps.mamba.train", {"model.dim": 32, "model.n_layers": 2, "model.d_state": 8, "model.head_dim": 16,
                                    "model.chunk_size": 8, "model.vocab_size": 258, "model.max_seqlen": 64}),
    "moe": ("apps.moe.train", {**DENSE, "model.mask": "block_causal", "model.n_experts": 4, "model.top_k": 2,
                               "model.multiple_of": 16, "model.bias_update_rate": 0.01}),
}
LAYOUTS = {"1proc": 1, "fsdp2": 2}


def _overrides(model: str, corpus: Path, dump_dir: Path, nproc: int) -> list[str]:
    kv = {**TRAIN, **MODELS[model][1], "dump_dir": dump_dir, "data.root_dir": corpus}
    if nproc > 1:  # the same global batch on 2 ranks: 2 rows each
        kv["data.batch_size"] = TRAIN["data.batch_size"] // nproc
    return [f"{k}={v}" for k, v in kv.items()]


def run(model: str, layout: str, corpus: Path, dump_dir: Path) -> dict:
    """{"loss": [...], "grad_norm": [...]} of one run, step by step, read from its metrics.jsonl."""
    nproc = LAYOUTS[layout]
    module = MODELS[model][0]
    launch = [sys.executable, "-m", module] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run(launch + _overrides(model, corpus, dump_dir, nproc), cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{model}/{layout} exited {out.returncode}:\n{out.stdout[-4000:]}")
    rows = [json.loads(line) for line in (dump_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}


def record(models=tuple(MODELS), layouts=tuple(LAYOUTS)) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import (
        write_corpus,  # the tests' synthetic two-source corpus, fixed seed
    )

    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus")
        return {m: {lay: run(m, lay, corpus, Path(tmp) / f"{m}_{lay}") for lay in layouts} for m in models}


def differences(a: dict, b: dict, rtol: float) -> list[str]:
    """Each (model, layout, metric, step) where a and b differ by more than rtol (relative), as a readable line."""
    bad = []
    for model in sorted(set(a) | set(b)):
        for layout in sorted(set(a.get(model, {})) | set(b.get(model, {}))):
            ra, rb = a.get(model, {}).get(layout), b.get(model, {}).get(layout)
            if ra is None or rb is None:
                bad.append(f"{model}/{layout}: only in {'the second' if ra is None else 'the first'}")
                continue
            for metric in ("loss", "grad_norm"):
                if len(ra[metric]) != len(rb[metric]):
                    bad.append(f"{model}/{layout} {metric}: {len(ra[metric])} against {len(rb[metric])} steps")
                    continue
                for step, (x, y) in enumerate(zip(ra[metric], rb[metric]), 1):
                    if abs(x - y) > rtol * max(abs(x), abs(y)):
                        bad.append(f"{model}/{layout} {metric} step {step}: {x!r} against {y!r}")
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"regenerate {GOLDEN.relative_to(ROOT)}")
    p.add_argument("--check", action="store_true", help="compare this machine's runs with the golden file")
    p.add_argument("--out", help="write this run's numbers to a file")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two recorded files bit for bit")
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        bad = differences(a, b, 0.0)
        print("\n".join(bad) or f"identical: {sum(len(v) for v in a.values())} runs, bit for bit")
        return 1 if bad else 0
    runs = record(tuple(args.models.split(",")))
    text = json.dumps(runs, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.write:
        GOLDEN.write_text(text + "\n")
    if args.check:
        bad = differences({m: v for m, v in json.loads(GOLDEN.read_text()).items() if m in runs}, runs, TOLERANCE)
        print("\n".join(bad) or f"golden losses match within {TOLERANCE:g} relative")
        return 1 if bad else 0
    if not (args.out or args.write):
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
