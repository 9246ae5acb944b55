"""Time to quality of the debug recipe: train each recipe for a fixed budget of training time on this machine and
report bits per byte on the shakespeare validation split (the training corpus's) and on the State of the Union
speeches (a held-out corpus by other authors that no recipe trains on), against time.

    python benchmarks/time_to_quality.py [--seconds 300] [--recipes debug,adamw,...] [--out runs/ttq]

A recipe is apps/main/configs/debug.yaml plus overrides (RECIPES). Each first runs a few steps to measure its step
time here (that run also fills the compile cache), then trains for the number of steps that fits the budget, with its
own lr schedule over those steps; evaluations on a few documents of each split during the run give the curves, and
the final checkpoint is scored on both whole validation splits. Training time counts only the training steps
(`train_s` in metrics.jsonl: compilation included, evaluation and checkpoints not). Prints one table; with --plot, the
curves as PNG through lingua.tools.plot (x = training seconds). Needs data/shakespeare, data/sotu
(`setup/prepare_data.py sotu`) and the shakespeare tokenizer.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua.args import load_config  # noqa: E402
from lingua.data.loader import DataArgs  # noqa: E402
from lingua.data.tokenizer import TokenizerArgs  # noqa: E402
from lingua.distributed.mesh import DistributedArgs, init_distributed  # noqa: E402
from lingua.distributed.precision import autocast_context, cpu_bf16_features, cpu_name  # noqa: E402
from lingua.eval.bpb import EvalArgs, evaluate_source  # noqa: E402
from lingua.eval.load import load_model  # noqa: E402
from lingua.models.transformer.spec import TRANSFORMER_SPEC  # noqa: E402
from lingua.train.loop import TrainArgs, train  # noqa: E402

# The recipe the README's debug run used before this benchmark existed (lingua 0.1): AdamW, 8 x 256 tokens a step.
V1 = ["optim.name=adamw", "optim.decay_params=all", "optim.lr=3e-3", "optim.warmup=50", "optim.scheduler=cosine", "optim.lr_min_ratio=0.1",
      "optim.weight_decay=0.1", "model.qk_norm=false", "model.mlp=swiglu", "model.init_std_factor=disabled",
      "model.logit_softcap=null", "model.weight_tying=true", "model.mask=block_causal", "data.batch_size=8"]
MUON = ["optim.name=muon"]
# This round's first recipe (README ablation, first table): the debug recipe with an untied head and a logit soft-cap.
R1 = ["model.weight_tying=false", "model.logit_softcap=30"]
RECIPES = {  # name -> overrides of apps/main/configs/debug.yaml (the current recipe: AdamW + the model switches)
    "debug": [],
    "muon": MUON,
    "v1": V1,
    # each switch flipped, from the debug recipe
    "no-qk-norm": ["model.qk_norm=false"],
    "softcap": ["model.logit_softcap=30"],
    "swiglu": ["model.mlp=swiglu"],
    "no-zero-init": ["model.init_std_factor=disabled"],
    "untied": ["model.weight_tying=false"],
    "decay-all": ["optim.decay_params=all"],  # weight decay on norms and embeddings too
    # the first recipe of this round, and each switch flipped from it (the README's first ablation)
    "r1": R1,
    "r1-no-qk-norm": R1 + ["model.qk_norm=false"],
    "r1-no-softcap": R1 + ["model.logit_softcap=null"],
    "r1-swiglu": R1 + ["model.mlp=swiglu"],
    "r1-no-zero-init": R1 + ["model.init_std_factor=disabled"],
    "r1-tied": R1 + ["model.weight_tying=true"],
    "r1-decay-all": R1 + ["optim.decay_params=all"],
    "r1-lean": R1 + ["model.qk_norm=false", "model.logit_softcap=null"],
    "r1-muon": R1 + MUON,
}
SOURCES = ("shakespeare", "sotu")


def config(recipe: str, dump_dir: Path, extra: list[str]) -> TrainArgs:
    argv = [f"config={ROOT}/apps/main/configs/debug.yaml", f"dump_dir={dump_dir}", f"name={recipe}",
            "logging.progress=false"]
    return load_config(TrainArgs, argv + RECIPES[recipe] + extra)


def step_seconds(recipe: str, work: Path, extra: list[str]) -> float:
    """Median seconds of a training step of `recipe` on this machine (after the first four: compilation, warm-up)."""
    dump = work / f"{recipe}_timing"
    cfg = config(recipe, dump, extra + ["steps=16", "logging.freq=1", "checkpoint.dump.every=0", "eval.at_end=false",
                                        "eval.every=0"])
    train(cfg, TRANSFORMER_SPEC)
    rows = [json.loads(line) for line in open(dump / "metrics.jsonl")]
    return statistics.median(r["step_ms"] for r in rows[4:]) / 1000


def full_bpb(run_dir: Path) -> dict:
    """Bits per byte of the run's final checkpoint on the whole validation split of each source."""
    model, _, tokenizer = load_model(run_dir)
    dist_state = init_distributed(DistributedArgs(device="cpu"))
    cfg = json.loads(next((run_dir / "checkpoints").glob("*/params.json")).read_text())["data"]
    data_args = DataArgs(root_dir=cfg["root_dir"], seq_len=cfg["seq_len"], add_bos=cfg["add_bos"],
                         add_eos=cfg["add_eos"], tokenizer=TokenizerArgs(**cfg["tokenizer"]))
    out = {}
    for source in SOURCES:
        r = evaluate_source(model, data_args.root_dir, source, tokenizer, EvalArgs(batch_size=8), data_args,
                            dist_state, autocast_context("cpu", next(model.parameters()).dtype))
        out[source] = r[f"{source}/bpb"]
    return out


def run_recipe(recipe: str, seconds: float, work: Path, extra: list[str], steps: int = 0) -> dict:
    if not steps:  # the steps that fit the budget at this machine's measured step time
        steps = max(10, int(seconds / step_seconds(recipe, work, extra)))
    dump = work / recipe
    cfg = config(recipe, dump, extra + [f"steps={steps}", f"eval.every={max(1, steps // 5)}", "eval.max_docs=6",
                                        f"eval.sources=[{','.join(SOURCES)}]", "checkpoint.dump.every=0",
                                        "logging.freq=10"])
    train(cfg, TRANSFORMER_SPEC)
    last = [json.loads(line) for line in open(dump / "metrics.jsonl")][-1]
    curve = [json.loads(line) for line in open(dump / "metrics.eval.jsonl")]
    return {"recipe": recipe, "steps": steps, "tokens": last["tokens_seen"], "train_s": last["train_s"],
            "optim": cfg.optim.name, "tok_per_s": last["tokens_seen"] / last["train_s"], **full_bpb(dump),
            "curve": [(round(r["train_s"]), round(r.get("shakespeare/bpb", float("nan")), 3),
                       round(r.get("sotu/bpb", float("nan")), 3)) for r in curve]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="training time per recipe")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"from {', '.join(RECIPES)}")
    parser.add_argument("--out", default=str(ROOT / "runs" / "time_to_quality"))
    parser.add_argument("--steps", type=int, default=0,
                        help="train this many steps instead of timing the budget (to compare recipes per step on a "
                             "busy machine)")
    parser.add_argument("--plot", action="store_true", help="curves against training time (lingua.tools.plot)")
    args, extra = parser.parse_known_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()}, native bf16: {', '.join(cpu_bf16_features()) or 'no'}; "
          f"budget {args.seconds:.0f} s of training per recipe", flush=True)
    rows = []
    for recipe in args.recipes.split(","):
        rows.append(run_recipe(recipe, args.seconds, work, extra, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'recipe':14s} {'optim':6s} {'steps':>6s} {'tokens':>8s} {'train s':>8s} {'tok/s':>6s} "
          f"{'shakespeare bpb':>16s} {'sotu bpb':>9s}  curve (s, shakespeare, sotu on 6 docs)")
    for r in rows:
        print(f"{r['recipe']:14s} {r['optim']:6s} {r['steps']:6d} {r['tokens']:8d} {r['train_s']:8.0f} "
              f"{r['tok_per_s']:6.0f} {r['shakespeare']:16.4f} {r['sotu']:9.4f}  {r['curve']}")
    if args.plot:
        subprocess.run([sys.executable, "-m", "lingua.tools.plot", *[str(work / r["recipe"]) for r in rows], "--x", "time",
                        "--smooth", "0.8", "--out", str(work / "plots")], check=True)


if __name__ == "__main__":
    main()
