"""Architectures at a matched parameter count and a fixed CPU budget: tok/s and validation bits per byte.

    python benchmarks/arch_compare.py [--seconds 60] [--params 1.5e6] [--archs transformer,mamba,...] \\
        [--out arch_compare.png] [--threads 1] [--batch-size 8] [--seq-len 128] [--eval-docs 10]

Every architecture trains on the default corpus (data/shakespeare, tokenizers/shakespeare_sp4096.model) through the
shared loop `lingua.train.loop.train`, with the same data, optimizer, lr schedule shape and seed. Each has dim 128 and the
depth whose non-embedding parameter count (everything but the vocab-sized tables; tied embeddings) is closest to
--params. The loop has no time limit, so the budget is turned into steps: a 5-step timing run measures the step time
(the fastest of steps 2-5, the least disturbed by other load), then the real run does --seconds / step_time steps with
a full cosine schedule; "train s" reports the time those steps actually took. The final
validation bits per byte come from the loop's end-of-run evaluation (lingua.eval.bpb) on the first --eval-docs
documents of shakespeare.val.jsonl, the same for every architecture.

Architectures: transformer (apps.main), mtp (apps.mtp, 2 future heads; bits per byte of its next-token head),
mingru / minlstm / hawk (apps.fastRNN), mamba (apps.mamba), moe (apps.moe: 8 experts, top-2, matched at *active*
parameters, "params"; "total" counts every expert; "load" is the last step's max/mean tokens per expert, mean over
layers, 1 for dense models). Apps that do not import are skipped with a note.
Prints one table and saves a plot (training loss against training time, and final bits per byte) to --out.
On a shared machine tok/s moves with the load: compare architectures from the same invocation.
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua.args import load_config  # noqa: E402
from lingua.models.decoder import non_embedding_params  # noqa: E402
from lingua.models.spec import ModelSpec, get_spec  # noqa: E402
from lingua.train.loop import train, train_args_cls  # noqa: E402

VOCAB = 4096
DIM = 128

# name -> (the app's ModelSpec, model overrides besides dim/n_layers, other overrides)
ARCHS = {
    "transformer": ("lingua.models.transformer.spec:TRANSFORMER_SPEC", {"n_heads": 4, "mask": "block_causal"}, {}),
    "mtp": ("apps.mtp.model:MTP_SPEC", {"n_heads": 4, "mask": "block_causal", "n_future_head": 2}, {"data.n_views": 3}),
    "mingru": ("apps.fastRNN.model:FASTRNN_SPEC", {"cell": "mingru"}, {}),
    "minlstm": ("apps.fastRNN.model:FASTRNN_SPEC", {"cell": "minlstm"}, {}),
    "hawk": ("apps.fastRNN.model:FASTRNN_SPEC", {"cell": "hawk", "n_heads": 4}, {}),
    "mamba": ("apps.mamba.model:MAMBA_SPEC", {"d_state": 32, "head_dim": 32, "expand": 2, "chunk_size": 64}, {}),
    "moe": ("apps.moe.model:MOE_SPEC", {"n_heads": 4, "mask": "block_causal", "n_experts": 8, "top_k": 2,
                                        "bias_update_rate": 0.001}, {}),
}


def active_params(model) -> int:
    """Non-embedding parameters one token goes through: a MoE layer's experts count top_k / n_experts of theirs
    (the MoE is matched to the others at equal *active* parameters)."""
    n = non_embedding_params(model)
    for m in model.modules():
        if hasattr(m, "experts") and hasattr(getattr(m, "args", None), "top_k"):
            n -= sum(p.numel() for p in m.experts.parameters()) * (1 - m.args.top_k / m.args.n_experts)
    return int(n)


def load_app(spec_path: str) -> tuple[ModelSpec, type]:
    """The app's ModelSpec and its config schema."""
    spec = get_spec(spec_path)
    return spec, train_args_cls(spec)


def base_overrides(args, dump_dir: str, steps: int) -> list[str]:
    return [
        f"dump_dir={dump_dir}", f"steps={steps}", "seed=42",
        f"data.root_dir={ROOT / 'data'}", "data.sources.shakespeare=1.0", "data.tokenizer.name=sp",
        f"data.tokenizer.path={ROOT / 'tokenizers' / 'shakespeare_sp4096.model'}", f"data.batch_size={args.batch_size}",
        f"data.seq_len={args.seq_len}", "data.load_async=false",
        f"optim.lr={args.lr}", f"optim.warmup={max(1, steps // 10)}", "optim.lr_min_ratio=0.1",
        "optim.scheduler=cosine", "optim.weight_decay=0.1", "optim.clip=1.0",
        f"model.dim={DIM}", f"model.vocab_size={VOCAB}", f"model.max_seqlen={args.seq_len}", "model.weight_tying=true",
        "distributed.model_dtype=fp32", "logging.freq=1", "logging.progress=false", "logging.peak_flops=1e12",
        "checkpoint.dump.every=0", f"eval.max_docs={args.eval_docs}", "eval.every=0",
    ]


def config(args, name: str, args_cls, dump_dir: str, steps: int, n_layers: int, eval_at_end: bool):
    _, model_kw, other = ARCHS[name]
    argv = base_overrides(args, dump_dir, steps) + [f"model.n_layers={n_layers}", f"eval.at_end={eval_at_end}"]
    argv += [f"model.{k}={v}" for k, v in model_kw.items()] + [f"{k}={v}" for k, v in other.items()]
    return load_config(args_cls, argv)


def match_depth(args, name: str, spec: ModelSpec, args_cls) -> tuple[int, int]:
    """(n_layers, active non-embedding params) closest to args.params, counted on the meta device (deeper until past it)."""
    model_args = config(args, name, args_cls, "unused", 1, 1, False).model
    best = None
    for n_layers in range(1, 65):
        with torch.device("meta"):
            count = active_params(spec.build(dataclasses.replace(model_args, n_layers=n_layers)))
        if best is None or abs(count - args.params) < abs(best[1] - args.params):
            best = (n_layers, count)
        if count > args.params:
            break
    return best


def meta_params(spec: ModelSpec, model_args) -> int:
    with torch.device("meta"):
        return non_embedding_params(spec.build(model_args))


def run_train(cfg, spec, log_path: Path) -> tuple[list[dict], list[dict], float]:
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        start = time.perf_counter()
        train(cfg, spec)
        wall = time.perf_counter() - start
    dump = Path(cfg.dump_dir)
    rows = [json.loads(line) for line in open(dump / "metrics.jsonl")]
    eval_path = dump / "metrics.eval.jsonl"
    evals = [json.loads(line) for line in open(eval_path)] if eval_path.exists() else []
    return rows, evals, wall


def bench(args, name: str, work: Path) -> dict:
    spec, args_cls = load_app(ARCHS[name][0])
    n_layers, params = match_depth(args, name, spec, args_cls)
    log = work / f"{name}.log"
    # timing run: the step time at this shape on this machine. Step 1 pays for warm-up; the fastest of the others is
    # the least disturbed by whatever else runs on the machine, so every architecture gets the same compute budget.
    rows, _, _ = run_train(config(args, name, args_cls, str(work / f"{name}_timing"), 5, n_layers, False), spec, log)
    step_s = min(r["step_ms"] for r in rows[1:]) / 1000
    steps = max(2, int(args.seconds / step_s))
    cfg = config(args, name, args_cls, str(work / name), steps, n_layers, True)
    rows, evals, wall = run_train(cfg, spec, log)
    bpb = evals[-1].get("shakespeare/bpb") if evals else None
    train_s = sum(r["step_ms"] for r in rows) / 1000
    tokens = args.batch_size * args.seq_len
    return {
        "arch": name, "n_layers": n_layers, "params": params, "steps": steps, "train_s": train_s, "wall_s": wall,
        "tok_per_s": tokens / (statistics.median(r["step_ms"] for r in rows[1:] or rows) / 1000),
        "best_tok_per_s": tokens / (min(r["step_ms"] for r in rows[1:] or rows) / 1000),
        "final_loss": rows[-1]["loss"], "bpb": bpb,  # final_loss: mtp's is the sum over its heads
        "curve": [(sum(r["step_ms"] for r in rows[: i + 1]) / 1000, r["loss"]) for i, r in enumerate(rows)],
        "mflop_per_token": spec.flops_per_token(cfg.model, args.seq_len) / 1e6,
        "loss_heads": getattr(cfg.model, "n_future_head", 1),
        "total_params": meta_params(spec, cfg.model),
        "imbalance": statistics.mean([v for k, v in rows[-1].items() if k.startswith("moe/imbalance/")] or [1.0]),
    }


def format_table(results: list[dict]) -> str:
    head = ("arch", "layers", "params", "total", "MFLOP/tok", "tok/s", "best", "steps", "train s", "loss", "val bpb",
            "load")
    lines = ["{:<12} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6} {:>8} {:>7} {:>8} {:>5}".format(*head)]
    for r in results:
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "-"
        lines.append(f"{r['arch']:<12} {r['n_layers']:>6} {r['params'] / 1e6:>8.2f}M {r['total_params'] / 1e6:>8.2f}M "
                     f"{r['mflop_per_token']:>9.1f} "
                     f"{r['tok_per_s']:>8.0f} {r['best_tok_per_s']:>8.0f} {r['steps']:>6} {r['train_s']:>8.1f} "
                     f"{r['final_loss'] / r['loss_heads']:>7.3f} {bpb:>8} {r['imbalance']:>5.2f}")  # loss: per head
    return "\n".join(lines)


def plot(results: list[dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        t, loss = zip(*r["curve"])
        heads = r["loss_heads"]  # mtp logs the sum of its heads' losses: plot their mean
        label = f"{r['arch']} ({r['params'] / 1e6:.2f}M)" + (f", mean of {heads} heads" if heads > 1 else "")
        left.plot(t, [v / heads for v in loss], label=label)
    left.set_xlabel("training time (s)")
    left.set_ylabel("train loss (nats/token)")
    left.set_title(f"loss vs time, {args.batch_size}x{args.seq_len} tokens/step")
    left.legend()
    scored = [r for r in results if r["bpb"] is not None]
    right.bar([r["arch"] for r in scored], [r["bpb"] for r in scored], color="tab:blue")
    for i, r in enumerate(scored):
        right.text(i, r["bpb"], f"{r['bpb']:.3f}", ha="center", va="bottom")
    right.set_ylabel("validation bits per byte")
    right.set_title(f"after ~{args.seconds:.0f} s of training each")
    if scored:
        right.set_ylim(min(r["bpb"] for r in scored) * 0.9, max(r["bpb"] for r in scored) * 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="training budget per architecture")
    parser.add_argument("--params", type=float, default=1.5e6, help="target non-embedding parameters")
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    parser.add_argument("--out", default="arch_compare.png", help="plot path (PNG)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the same for every architecture)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-docs", type=int, default=10, help="validation documents scored at the end")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    unknown = [a for a in args.archs.split(",") if a not in ARCHS]
    if unknown:
        parser.error(f"unknown arch {unknown[0]!r}: choose from {', '.join(ARCHS)}")
    if not (ROOT / "data" / "shakespeare").is_dir() or not (ROOT / "tokenizers" / "shakespeare_sp4096.model").is_file():
        parser.error("needs data/shakespeare and tokenizers/shakespeare_sp4096.model (setup/prepare_data.py, "
                     "setup/train_tokenizer.py)")
    results, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs.split(","):
            try:
                load_app(ARCHS[name][0])
            except Exception as e:  # apps are optional here: another one may be missing or mid-edit
                notes.append(f"{name}: skipped, {ARCHS[name][0]} does not import ({type(e).__name__}: {e})")
                print(notes[-1], flush=True)
                continue
            print(f"{name}: training for ~{args.seconds:.0f} s ...", flush=True)
            try:
                results.append(bench(args, name, Path(tmp)))
            except Exception as e:
                log = Path(tmp) / f"{name}.log"
                tail = log.read_text()[-1500:] if log.exists() else ""
                notes.append(f"{name}: failed ({type(e).__name__}: {e})")
                print(notes[-1] + ("\n" + tail if tail else ""), flush=True)
    print(f"\n{args.batch_size}x{args.seq_len} tokens/step, dim {DIM}, fp32, {args.threads} thread(s), "
          f"budget {args.seconds:.0f} s each, val bpb on {args.eval_docs} shakespeare val docs; "
          "params = non-embedding (tied 4096-token embedding excluded); tok/s: median step, best: fastest step; "
          "loss = last train loss (mtp: per head)")
    print(format_table(results))
    for note in notes:
        print("note: " + note)
    if results:
        plot(results, args.out, args)
        print(f"plot: {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
