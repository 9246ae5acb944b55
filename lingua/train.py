"""The train loop: one for every app. An app hands it a config and a ModelSpec (how to build and count its model).

    from lingua.train import TrainArgs, train
    train(load_config(TrainArgs, argv), TRANSFORMER_SPEC)

A run resumes by itself from the latest complete checkpoint in its dump_dir; SIGUSR2/SIGTERM finish the step, save,
requeue under SLURM and exit; a non-finite loss stops the run before it can be saved.
"""

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from lingua.args import config_to_dict, dump_config
from lingua.checkpoint import CheckpointArgs, CheckpointManager, load_model_weights, rng_state, set_rng_state
from lingua.data import DataArgs, DataLoader
from lingua.distributed import DistributedArgs, DistState, init_distributed
from lingua.parallelize import parallelize_model
from lingua.errors import ConfigError, LinguaError
from lingua.evaluation import EvalArgs, evaluate
from lingua.metrics import LoggingArgs, MetricLogger, Progress, format_console_line, memory_gb, peak_flops
from lingua.optim import OptimArgs, build_optimizer, clip_grad_norm_
from lingua.precision import autocast_context, resolve_model_dtype
from lingua.probe import Probe, ProbeArgs
from lingua.profiling import ProfilerArgs, maybe_profile
from lingua.tokenizer import build_tokenizer
from lingua.transformer import TransformerArgs

logger = logging.getLogger("lingua")


@dataclass
class TrainArgs:
    name: str = "lingua"
    dump_dir: str = ""
    seed: int = 42
    steps: int = 1000
    grad_acc_steps: int = 1
    optim: OptimArgs = field(default_factory=OptimArgs)
    model: TransformerArgs = field(default_factory=TransformerArgs)
    data: DataArgs = field(default_factory=DataArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    profiling: ProfilerArgs = field(default_factory=ProfilerArgs)
    probe: ProbeArgs = field(default_factory=ProbeArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)


@dataclass
class ModelSpec:
    """What the loop needs to know about a model family; everything else is shared."""

    build: Callable[[Any], nn.Module]  # model args -> module; called on the meta device
    flops_per_token: Callable[[Any, int], float]  # (model args, seq_len) -> training FLOPs per token
    tp_plan: Optional[Callable] = None  # (model, tp_mesh, loss_parallel) -> None; default: lingua.parallelize.apply_tp
    describe: Optional[Callable] = None  # (model args, device, dtype, seq_len) -> str logged at start


class Preemption:
    """SIGUSR2 (SLURM's warning) and SIGTERM set a flag; the loop saves and exits at the end of the step."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.requested: Optional[str] = None
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        logger.warning(f"received {self.requested}: will checkpoint and stop after this step")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [{rank}] %(levelname)s %(message)s" if rank else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def validate_args(args: TrainArgs, tokenizer) -> None:
    if not args.dump_dir:
        raise ConfigError("dump_dir is required (e.g. dump_dir=runs/debug)")
    if os.path.exists(args.dump_dir) and not os.path.isdir(args.dump_dir):
        raise LinguaError(f"dump_dir '{args.dump_dir}' exists and is not a directory")
    if args.steps < 1 or args.grad_acc_steps < 1:
        raise ConfigError(f"steps and grad_acc_steps must be >= 1 (got {args.steps}, {args.grad_acc_steps})")
    if args.model.vocab_size <= 0:
        args.model.vocab_size = tokenizer.n_words
    if tokenizer.n_words > args.model.vocab_size:
        raise ConfigError(
            f"tokenizer '{args.data.tokenizer.path or args.data.tokenizer.name}' has {tokenizer.n_words} tokens, "
            f"more than model.vocab_size={args.model.vocab_size}"
        )
    max_seqlen = getattr(args.model, "max_seqlen", None)
    if max_seqlen is not None and args.data.seq_len > max_seqlen:
        raise ConfigError(f"data.seq_len={args.data.seq_len} is above model.max_seqlen={max_seqlen}")


def build_model(args: TrainArgs, spec: ModelSpec, dist_state: DistState, param_dtype: torch.dtype) -> nn.Module:
    """Meta-device construction, parallelization, then materialization and init: no rank holds the full model."""
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = spec.build(args.model)
    model = parallelize_model(model, dist_state.mesh, args.distributed, param_dtype, spec.tp_plan)
    model.to_empty(device=dist_state.device)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        model.init_weights()
    return model


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A loss that loss_parallel returned as a replicated DTensor, as a plain tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP's reduce-scatter on all but the last micro-batch of a gradient accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def _requeue_if_slurm(dist_state: DistState) -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if job and dist_state.is_main:
        logger.warning(f"requeueing SLURM job {job}")
        subprocess.run(["scontrol", "requeue", job], check=False)


def train(args: TrainArgs, spec: ModelSpec) -> dict:
    """Run (or resume) training; returns {"step", "status", "loss"} for callers such as tests."""
    dist_state = init_distributed(args.distributed)
    try:
        with dist_state.peer_failures_as_errors(), contextlib.ExitStack() as stack:
            return _train(args, spec, dist_state, stack)
    finally:
        dist_state.close()


def _train(args: TrainArgs, spec: ModelSpec, dist_state: DistState, stack: contextlib.ExitStack) -> dict:
    setup_logging(dist_state.rank)
    tokenizer = build_tokenizer(args.data.tokenizer.name, args.data.tokenizer.path)
    validate_args(args, tokenizer)
    dump_dir = Path(args.dump_dir)
    if dist_state.is_main:
        dump_dir.mkdir(parents=True, exist_ok=True)
        dump_config(args, dump_dir / "config.yaml")
    dist_state.barrier()

    device = dist_state.device
    dtype, why = resolve_model_dtype(args.distributed.model_dtype, device)
    logger.info(f"world: {dist_state.world_size} process(es) via {dist_state.env.launcher} on {device}; "
                f"dp={dist_state.dp_size} tp={dist_state.tp_size}; dtype {why}")
    model = build_model(args, spec, dist_state, dtype)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    logger.info(f"model: {n_params:,} parameters ({n_params / 1e6:.2f}M)")
    if spec.describe is not None:
        logger.info("attention kernels:\n" + spec.describe(args.model, device, dtype, args.data.seq_len))
    optimizer, scheduler = build_optimizer(model, args.optim, args.steps)

    data = stack.enter_context(DataLoader(args.data, dist_state.dp_rank, dist_state.dp_size, args.grad_acc_steps))
    checkpoints = CheckpointManager(args.checkpoint, args.dump_dir)
    step, tokens_seen = 0, 0
    checkpoints.clean_incomplete()
    dist_state.barrier()
    latest = checkpoints.latest()
    if latest is not None:
        states = checkpoints.load(latest, model, optimizer)
        mine = states[dist_state.rank] if len(states) == dist_state.world_size else states[0]
        step, tokens_seen = mine["step"], mine["tokens_seen"]
        scheduler.load_state_dict(mine["scheduler"])
        if len(states) == dist_state.world_size:
            set_rng_state(mine["rng"])
        data.load_state_dicts([s["data"] for s in states])  # any old layout: each rank takes its streams
        logger.info(f"resumed from {latest} at step {step} (saved by {len(states)} rank(s))")
    elif args.checkpoint.init_ckpt_path:
        load_model_weights(args.checkpoint.init_ckpt_path, model)
        logger.info(f"initialised weights from {args.checkpoint.init_ckpt_path}")

    if step >= args.steps:  # re-running a finished run (e.g. the quickstart again) costs nothing
        logger.info(f"run already complete at step {step} (steps={args.steps}): nothing to do")
        return {"step": step, "status": "done", "loss": float("nan")}
    peak, peak_src = peak_flops(device, dtype, args.logging.peak_flops)
    flops_per_token = spec.flops_per_token(args.model, args.data.seq_len)
    logger.info(f"peak FLOP/s for MFU: {peak / 1e12:.3f} TFLOP/s ({peak_src}); {flops_per_token / 1e6:.1f} MFLOP/token")
    tokens_per_step = args.data.batch_size * args.data.seq_len * args.grad_acc_steps * dist_state.dp_size

    metrics = stack.enter_context(MetricLogger(args.dump_dir, args.logging, rank=dist_state.rank,
                                               run_name=args.name, config_dict=config_to_dict(args)))
    preempt = stack.enter_context(Preemption())
    profiler = stack.enter_context(maybe_profile(args.profiling, args.dump_dir, dist_state.rank, device))
    probe = Probe(args.probe, args.dump_dir, dist_state.rank)
    stack.callback(probe.close)
    progress = Progress(args.steps, start=step, enabled=dist_state.is_main and args.logging.progress)
    autocast = autocast_context(device, dtype)
    data_iter = iter(data)

    def save(kinds):
        train_state = {"step": step, "tokens_seen": tokens_seen, "scheduler": scheduler.state_dict(),
                       "data": data.state_dict(), "rng": rng_state(), "world_size": dist_state.world_size}
        checkpoints.save(step, model, optimizer, train_state, config_to_dict(args), kinds)

    def run_eval():
        results = evaluate(model, args.data, args.eval, tokenizer, dist_state, autocast)
        if results:
            metrics.log_eval({"step": step, "tokens_seen": tokens_seen, **results})
            logger.info("eval " + " ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))

    status, loss_value = "done", float("nan")
    window_start, window_tokens, window_data_s = time.perf_counter(), 0, 0.0
    model.train()
    while step < args.steps:
        step_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        data_s = 0.0
        probe.before_step(step + 1, model)  # off steps: one integer test, no hooks
        for micro in range(args.grad_acc_steps):
            t0 = time.perf_counter()
            batch = _to_device(next(data_iter), device)
            data_s += time.perf_counter() - t0
            _grad_sync(model, micro == args.grad_acc_steps - 1)
            with dist_state.loss_context():  # tensor parallel: the loss is computed on vocab-sharded logits
                with autocast:
                    loss = model(batch["input"], batch["target"], tok_idx=batch["tok_idx"])
                (loss / args.grad_acc_steps).backward()
            loss_sum += _local(loss.detach())
        probe.after_backward(step + 1, model)
        # One small collective per step: the global mean loss, and whether any rank was asked to stop.
        flags = torch.stack([loss_sum / args.grad_acc_steps, torch.tensor(float(preempt.requested is not None), device=device)])
        dist_state.all_reduce(flags)
        loss_value, stop = flags[0].item() / dist_state.world_size, flags[1].item() > 0
        if not math.isfinite(loss_value):
            last = checkpoints.latest()
            raise LinguaError(f"loss is {loss_value} at step {step + 1}: stopping without saving "
                              f"(last complete checkpoint: {last or 'none'})")
        grad_norm = clip_grad_norm_(model, args.optim.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        window_data_s += data_s
        profiler.step()
        progress.update(step, f"loss {loss_value:.4f}")

        if step % args.logging.freq == 0 or step == args.steps or stop:
            elapsed = time.perf_counter() - window_start
            tok_per_s = window_tokens / elapsed
            entry = {
                "step": step, "tokens_seen": tokens_seen, "loss": loss_value,
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                "tok_per_s": tok_per_s, "mfu": flops_per_token * tok_per_s / (peak * dist_state.world_size),
                "step_ms": 1000 * (time.perf_counter() - step_start), "data_ms": 1000 * data_s,
                "data_share": window_data_s / elapsed, "mem_gb": memory_gb(device),
            }
            metrics.log(entry)
            if progress.enabled:
                progress.write(format_console_line(entry))
            else:
                logger.info(format_console_line(entry))
            window_start, window_tokens, window_data_s = time.perf_counter(), 0, 0.0

        if args.eval.every and step % args.eval.every == 0 and step != args.steps:
            run_eval()
        kinds = checkpoints.kinds_due(step, last=step == args.steps or stop)
        if kinds:
            save(kinds)
        if stop:
            status = "preempted"
            _requeue_if_slurm(dist_state)
            break
    progress.close()
    if status == "done" and args.eval.at_end:
        run_eval()
    logger.info(f"{status} at step {step}, loss {loss_value:.4f}")
    return {"step": step, "status": status, "loss": loss_value}
