"""Evaluate a checkpoint: validation bits per byte per source, and optionally lm-evaluation-harness tasks.

    python -m apps.main.eval ckpt_dir=runs/debug/checkpoints/0000001000 dump_dir=runs/debug/eval_1000 \\
        [validation.max_docs=100] [validation.sources=[shakespeare]] [harness.tasks=[hellaswag,arc_easy]]
    torchrun --nproc-per-node 4 -m apps.main.eval ckpt_dir=... dump_dir=...

ckpt_dir: a DCP or consolidated checkpoint of any lingua app (params.json names its model spec), a Hugging Face Llama
directory, or a run directory (its latest checkpoint).
Validation reads `<root_dir>/<source>/<source>.val.jsonl` (root_dir, sources, seq_len, BOS/EOS default to the
checkpoint's training config) and reports NLL per token, perplexity and bits per byte (lingua.eval.bpb). Under
torchrun every rank holds the whole model and scores its share of the batches, or of the harness requests; rank 0
prints the table and writes `<dump_dir>/results.json`:

    {"ckpt_dir": ..., "validation": {"<source>": {"nll", "ppl", "bpb", "tokens", "bytes"}}, "harness": {...}}
"""

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lingua.args import run_cli
from lingua.data.loader import DataArgs
from lingua.data.tokenizer import TokenizerArgs
from lingua.distributed.mesh import DistributedArgs, init_distributed
from lingua.distributed.precision import autocast_context, resolve_model_dtype
from lingua.errors import ConfigError, LinguaError
from lingua.eval.bpb import EvalArgs, evaluate_source
from lingua.eval.load import TokenizerOverride, inspect_checkpoint, load_model
from lingua.files import write_text_atomic
from lingua.log import setup_logging

logger = logging.getLogger("lingua")


@dataclass
class ValidationArgs:
    enabled: bool = True  # score bits per byte on the validation splits
    root_dir: Optional[str] = None  # default: the checkpoint's data.root_dir
    sources: list[str] = field(default_factory=list)  # default: the checkpoint's data.sources
    max_docs: Optional[int] = None  # per source; None: the whole val split
    batch_size: int = 4  # rows per batch, per rank
    seq_len: Optional[int] = None  # default: the checkpoint's data.seq_len, at most model.max_seqlen


@dataclass
class HarnessArgs:
    tasks: list[str] = field(default_factory=list)  # lm-eval task names; empty: no harness
    include_path: Optional[str] = None  # a folder of your own task YAMLs
    include_defaults: bool = True  # index lm-eval's built-in tasks (~12 s); false for include_path tasks only
    limit: Optional[float] = None  # documents per task (a fraction if < 1)
    num_fewshot: Optional[int] = None  # few-shot examples per prompt; None: each task's default
    batch_size: int = 8  # requests scored together
    max_gen_len: int = 256  # generation tasks that set no max_gen_toks
    bootstrap_iters: int = 100000  # for the stderr of non-mean metrics; 0 skips it
    seed: int = 1234  # lm-eval's seed (few-shot sampling)


@dataclass
class EvalAppArgs:
    ckpt_dir: str = ""  # a checkpoint of any lingua app (DCP or consolidated), or a Hugging Face model folder
    dump_dir: str = ""  # where results.json is written
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # auto | bf16 | fp32 (bf16 runs under autocast, as in training)
    add_bos: Optional[bool] = None  # default: the checkpoint's data.add_bos (true for HF dirs)
    add_eos: Optional[bool] = None  # default: the checkpoint's data.add_eos
    tokenizer: TokenizerOverride = field(default_factory=TokenizerOverride)
    validation: ValidationArgs = field(default_factory=ValidationArgs)
    harness: HarnessArgs = field(default_factory=HarnessArgs)


def validation_plan(args: EvalAppArgs, params: dict, max_seqlen: int) -> tuple[str, list[str], DataArgs]:
    """root_dir, sources and the DataArgs (seq_len, BOS/EOS) validation runs with, from args then params.json."""
    data = params.get("data") or {}
    root_dir = args.validation.root_dir or data.get("root_dir")
    sources = list(args.validation.sources) or list(data.get("sources") or {})
    if not root_dir or not sources:
        raise ConfigError("validation needs validation.root_dir and validation.sources (the checkpoint names none); "
                          "or set validation.enabled=false")
    seq_len = min(args.validation.seq_len or data.get("seq_len") or max_seqlen, max_seqlen)
    add_bos = args.add_bos if args.add_bos is not None else data.get("add_bos", True)
    add_eos = args.add_eos if args.add_eos is not None else data.get("add_eos", True)
    tokenizer = TokenizerArgs(**(data.get("tokenizer") or {}))  # what token shards of the val split must match
    return root_dir, sources, DataArgs(root_dir=root_dir, seq_len=seq_len, add_bos=add_bos, add_eos=add_eos,
                                       format=data.get("format", "auto"), tokenizer=tokenizer)


def format_table(validation: dict) -> str:
    lines = [f"{'source':<20} {'tokens':>10} {'bytes':>10} {'nll/token':>10} {'ppl':>10} {'bits/byte':>10}"]
    for source, r in validation.items():
        lines.append(f"{source:<20} {r['tokens']:>10,} {r['bytes']:>10,} {r['nll']:>10.4f} {r['ppl']:>10.3f} "
                     f"{r['bpb']:>10.4f}")
    return "\n".join(lines)


def format_harness(results: dict) -> str:
    lines = []
    for task, metrics in results.get("results", {}).items():
        shown = ", ".join(f"{k.split(',')[0]}={v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        lines.append(f"{task:<20} {shown}")
    return "\n".join(lines)


def run_harness(model, tokenizer, args: HarnessArgs) -> Optional[dict]:
    """lm-eval's results dict on rank 0, None on the other ranks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lingua.eval.harness import (
        LinguaLM,  # the optional eval extra, only when tasks are asked for
    )

    if args.include_path and not os.path.isdir(args.include_path):
        raise LinguaError(f"harness.include_path '{args.include_path}' is not a directory")
    manager = TaskManager(include_path=args.include_path, include_defaults=args.include_defaults)
    missing = [t for t in args.tasks if t not in manager.all_tasks and not os.path.isfile(t)]
    if missing:
        close = difflib.get_close_matches(missing[0], manager.all_tasks, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        where = "" if args.include_defaults else " with harness.include_defaults=false"
        raise LinguaError(f"unknown lm-eval task '{missing[0]}'{where}{hint}")
    lm = LinguaLM(model, tokenizer, batch_size=args.batch_size, max_gen_len=args.max_gen_len, seed=args.seed)
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit, task_manager=manager,
        bootstrap_iters=args.bootstrap_iters, log_samples=False, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed,
    )


def run_validation(model, ckpt, tokenizer, args: EvalAppArgs, dist_state, autocast) -> dict:
    """{source: {nll, ppl, bpb, tokens, bytes}} over each source's validation split."""
    root_dir, sources, data_args = validation_plan(args, ckpt.params, ckpt.model_args.max_seqlen)
    eval_args = EvalArgs(max_docs=args.validation.max_docs, batch_size=args.validation.batch_size)
    results = {}
    for source in sources:
        flat = evaluate_source(model, root_dir, source, tokenizer, eval_args, data_args, dist_state, autocast,
                               progress=True)  # a bar on a terminal only
        if not flat:
            logger.warning(f"validation split of '{source}' has no tokens to score: skipped")
            continue
        results[source] = {k.split("/", 1)[1]: v for k, v in flat.items()}
    return results


def main(args: EvalAppArgs) -> dict:
    """Evaluate any lingua checkpoint (the architecture comes from its params.json) or Hugging Face Llama dir."""
    if not args.ckpt_dir:
        raise ConfigError("ckpt_dir is required (a checkpoint, consolidated or Hugging Face directory)")
    if not args.dump_dir:
        raise ConfigError("dump_dir is required (results.json goes there)")
    if not args.validation.enabled and not args.harness.tasks:
        raise ConfigError("nothing to evaluate: validation.enabled=false and no harness.tasks")
    dist_state = init_distributed(DistributedArgs(device=args.device))
    try:
        setup_logging(dist_state.rank)
        ckpt = inspect_checkpoint(args.ckpt_dir)
        model, _, tokenizer = load_model(ckpt, dist_state.device, tokenizer=args.tokenizer)
        dtype, _ = resolve_model_dtype(args.dtype, dist_state.device)
        autocast = autocast_context(dist_state.device, dtype)
        logger.info(f"evaluating {ckpt.path} on {dist_state.world_size} process(es), {dist_state.device}, "
                    f"{str(dtype)[6:]}")
        results: dict = {"ckpt_dir": str(ckpt.path)}
        if args.validation.enabled:
            results["validation"] = run_validation(model, ckpt, tokenizer, args, dist_state, autocast)
            if dist_state.is_main:
                print(format_table(results["validation"]), flush=True)
        if args.harness.tasks:
            with autocast:
                harness = run_harness(model, tokenizer, args.harness)
            if dist_state.is_main:
                results["harness"] = {k: harness[k] for k in ("results", "versions", "n-shot", "n-samples")
                                      if k in harness}
                print(format_harness(harness), flush=True)
        if dist_state.is_main:
            Path(args.dump_dir).mkdir(parents=True, exist_ok=True)
            path = write_text_atomic(Path(args.dump_dir) / "results.json", json.dumps(results, indent=1, default=str))
            logger.info(f"wrote {path}")
        return results
    finally:
        dist_state.close()


if __name__ == "__main__":
    run_cli(main, EvalAppArgs)
