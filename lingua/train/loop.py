"""The train loop: one for every app. An app hands it a config and a ModelSpec (lingua/models/spec.py).

    from lingua.models.transformer.spec import TRANSFORMER_SPEC
    from lingua.train.loop import train, train_args_cls
    train(load_config(train_args_cls(TRANSFORMER_SPEC), argv), TRANSFORMER_SPEC)

A run resumes by itself from the latest complete checkpoint in its dump_dir; SIGUSR2/SIGTERM finish the step, save,
requeue under SLURM and exit; a non-finite loss stops the run before it can be saved. Everything a resume needs
besides model and optimizer is the `TrainState` (step, tokens seen, lr schedule, data loader, RNG).
"""

import contextlib
import dataclasses
import functools
import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lingua.args import config_to_dict, dump_config, run_cli
from lingua.checkpoint.lock import RunLock
from lingua.checkpoint.manager import CheckpointArgs, CheckpointManager, rng_state, set_rng_state
from lingua.checkpoint.weights import load_model_weights
from lingua.data.loader import DataArgs, DataLoader
from lingua.data.tokenizer import build_tokenizer
from lingua.distributed.mesh import DistributedArgs, DistState, init_distributed
from lingua.distributed.parallelize import resolve_compile
from lingua.distributed.pipeline import build_pipeline, n_microbatches
from lingua.distributed.precision import autocast_context, cpu_name, resolve_model_dtype
from lingua.distributed.watchdog import Watchdog
from lingua.errors import LinguaError
from lingua.eval.bpb import EvalArgs, evaluate
from lingua.kernels.attention import Placement, place_attention
from lingua.log import setup_logging
from lingua.models.decoder import materialize, num_params
from lingua.models.spec import ModelSpec
from lingua.models.transformer.model import TransformerArgs
from lingua.train.checks import validate_args
from lingua.train.metrics import (
    LoggingArgs,
    MetricLogger,
    Progress,
    format_console_line,
    memory_window,
    peak_flops,
)
from lingua.train.host_sync import HostSyncDetector, watch
from lingua.train.optim import (
    OptimArgs,
    build_optimizer,
    sync_scheduler,
)
from lingua.train.preemption import Preemption
from lingua.train.probe import Probe, ProbeArgs
from lingua.train.profiling import ProfilerArgs, maybe_profile
from lingua.train.spikes import SpikeGuard
from lingua.train.step import StepResult, Trainer

logger = logging.getLogger("lingua")


@dataclass
class TrainArgs:
    name: str = "lingua"  # run name: logs, metrics.jsonl, the SLURM job
    dump_dir: str = ""  # the run folder (required): config.yaml, checkpoints, metrics; a run resumes from it
    seed: int = 42  # seeds the model's init (and nothing else: the data order has data.seed)
    steps: int = 1000  # optimizer steps to train
    grad_acc_steps: int = 1  # micro-batches per optimizer step
    optim: OptimArgs = field(default_factory=OptimArgs)
    model: TransformerArgs = field(default_factory=TransformerArgs)
    data: DataArgs = field(default_factory=DataArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    profiling: ProfilerArgs = field(default_factory=ProfilerArgs)
    probe: ProbeArgs = field(default_factory=ProbeArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)


@functools.cache
def train_args_cls(spec: ModelSpec) -> type:
    """The app's config schema: TrainArgs whose `model` section is the spec's args dataclass."""
    if spec.args_cls is TransformerArgs:
        return TrainArgs
    name = spec.args_cls.__name__.removesuffix("Args") + "TrainArgs"
    return dataclasses.make_dataclass(name, [("model", spec.args_cls, field(default_factory=spec.args_cls))],
                                      bases=(TrainArgs,))


def main(spec: ModelSpec, argv: Optional[list[str]] = None):
    """`python -m apps.<app>.train config=... key=value ...` for the app of `spec`."""
    return run_cli(lambda args: train(args, spec), train_args_cls(spec), argv)


def make_dump_dir(dump_dir: str) -> None:
    try:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LinguaError(f"cannot create dump_dir '{dump_dir}': {e.strerror}") from None


def with_vocab_size(args: TrainArgs, tokenizer) -> TrainArgs:
    """The config with model.vocab_size=-1 resolved to the tokenizer's size: a new config (the caller's is kept),
    whose model args derive their sizes again."""
    if args.model.vocab_size > 0:
        return args
    return dataclasses.replace(args, model=dataclasses.replace(args.model, vocab_size=tokenizer.n_words))


def build_model(args: TrainArgs, spec: ModelSpec, dist_state: DistState, param_dtype: torch.dtype) -> nn.Module:
    """Meta-device construction, parallelization, then materialization and init: no rank holds the full model."""
    if dist_state.pp_size > 1:  # this rank's pipeline stages, each parallelized like a model
        microbatches = n_microbatches(args.distributed, args.data.batch_size, args.grad_acc_steps)
        return build_pipeline(spec, placed_model(args, spec, dist_state, param_dtype), dist_state.mesh,
                              dist_state.pp_rank, args.distributed, param_dtype, dist_state.device, args.seed,
                              microbatches)
    return materialize(build_parallel(args, spec, dist_state, param_dtype), dist_state.device, seed=args.seed)


def build_parallel(args: TrainArgs, spec: ModelSpec, dist_state: DistState, param_dtype: torch.dtype) -> nn.Module:
    """The model on the meta device, its attention kernel placed, parallelized, without pipeline stages (lingua.plan
    materializes it on fake tensors instead)."""
    model = placed_model(args, spec, dist_state, param_dtype)
    return spec.parallelize(model, dist_state.mesh, args.distributed, param_dtype, dist_state.device)


def placed_model(args: TrainArgs, spec: ModelSpec, dist_state: DistState, param_dtype: torch.dtype) -> nn.Module:
    """The model on the meta device with its attention kernel placed (before compiling: the kernel is in the graph)."""
    with torch.device("meta"):
        model = spec.build(args.model)
    compiled = resolve_compile(args.distributed.compile, dist_state.device, dist_state.tp_size,
                               dist_state.cp_size)[0]
    placement = Placement(dist_state.device.type, param_dtype, compiled, machine=cpu_name())
    place_attention(model, args.model, placement, args.data.batch_size, args.data.seq_len)
    return model


@dataclass
class TrainState:
    """What a checkpoint holds besides model and optimizer, per rank: step, tokens seen, the lr schedule, the data
    loader's position and the RNG."""

    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: DataLoader
    spikes: SpikeGuard = field(default_factory=SpikeGuard)
    step: int = 0
    tokens_seen: int = 0
    train_s: float = 0.0  # wall time spent in training steps (not in evaluation or saving), over every resume

    def state_dict(self, world_size: int) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train_s": self.train_s,
                "scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(), "rng": rng_state(),
                "spikes": self.spikes.state_dict(), "world_size": world_size}

    def load_state_dicts(self, states: list[dict], rank: int, world_size: int) -> None:
        """Every saving rank's state; a run resumed on another world size takes the loop position from any rank
        (they agree) and its data streams from whichever old ranks held them (the RNG only matters to an exact
        resume)."""
        same_world = len(states) == world_size
        mine = states[rank] if same_world else states[0]
        self.step, self.tokens_seen, self.train_s = mine["step"], mine["tokens_seen"], mine.get("train_s", 0.0)
        self.scheduler.load_state_dict(mine["scheduler"])
        sync_scheduler(self.scheduler)
        self.spikes.load_state_dict(mine.get("spikes", {}))  # the global loss's window: the same on every rank
        if same_world:
            set_rng_state(mine["rng"])
        self.data.load_state_dicts([s["data"] for s in states])  # any old layout: each rank takes its streams


def resume(state: TrainState, checkpoints: CheckpointManager, model, optimizer, args: TrainArgs, spec: ModelSpec,
           dist_state: DistState) -> None:
    """Continue from the latest complete checkpoint in dump_dir, or start from checkpoint.init_ckpt_path's weights."""
    checkpoints.clean_incomplete()
    dist_state.barrier()
    latest = checkpoints.latest_verified()
    if latest is not None:
        states = checkpoints.load(latest, model, optimizer)
        state.load_state_dicts(states, dist_state.rank, dist_state.world_size)
        logger.info(f"resumed from {latest} at step {state.step} (saved by {len(states)} rank(s))")
    elif args.checkpoint.init_ckpt_path:
        load_model_weights(args.checkpoint.init_ckpt_path, model, spec.hf)
        logger.info(f"initialised weights from {args.checkpoint.init_ckpt_path}")


class ThroughputWindow:
    """Tokens, data-wait time and wall time since the last logged step: tok/s, MFU and data share per log line."""

    def __init__(self, flops_per_token: float, peak: float, world_size: int):
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.data_s = time.perf_counter(), 0, 0.0

    def add(self, tokens: int, data_s: float) -> None:
        self.tokens += tokens
        self.data_s += data_s

    def metrics(self) -> dict:
        elapsed = time.perf_counter() - self.start
        tok_per_s = self.tokens / elapsed
        mfu = self.flops_per_token * tok_per_s / (self.peak * self.world_size) if self.peak else None
        return {"tok_per_s": tok_per_s, "mfu": mfu,
                "data_share": self.data_s / elapsed}


def throughput_window(args: TrainArgs, spec: ModelSpec, dist_state: DistState, dtype) -> ThroughputWindow:
    """The MFU's peak (logged once; a GPU missing from the table gets a warning and no MFU) and FLOPs per token."""
    peak, peak_src = peak_flops(dist_state.device, dtype, args.logging.peak_flops)
    flops_per_token = spec.flops_per_token(args.model, args.data.seq_len)
    if peak is None:
        logger.warning(f"MFU not logged: {peak_src}")
    else:
        logger.info(f"peak FLOP/s for MFU: {peak / 1e12:.3f} TFLOP/s ({peak_src}); {flops_per_token / 1e6:.1f} MFLOP/token")
    return ThroughputWindow(flops_per_token, peak, dist_state.world_size)


def read_checked(result: StepResult, step: int, checkpoints: CheckpointManager) -> None:
    """Bring the step's numbers to the host; a non-finite loss stops the run before anything can save it."""
    result.read()
    if not math.isfinite(result.loss):
        raise LinguaError(f"loss is {result.loss} at step {step}: stopping without saving "
                          f"(last complete checkpoint: {checkpoints.latest() or 'none'})")


def log_step(metrics: MetricLogger, progress: Progress, window: ThroughputWindow, state: TrainState,
             result: StepResult, step_start: float, device, extra: dict) -> None:
    """One metrics row; `extra` is the spec's step_metrics (model-specific numbers such as per-head losses)."""
    entry = {"step": state.step, "tokens_seen": state.tokens_seen, "train_s": state.train_s, "loss": result.loss,
             "lr": state.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm, **window.metrics(),
             "step_ms": 1000 * (time.perf_counter() - step_start), "data_ms": 1000 * result.data_s,
             **memory_window(device), **extra}
    if state.spikes.enabled:
        entry["skipped_steps"] = state.spikes.skipped
    metrics.log(entry)
    if progress.enabled:
        progress.write(format_console_line(entry))
    else:
        logger.info(format_console_line(entry))
    window.reset()


def run_eval(model, args: TrainArgs, tokenizer, dist_state: DistState, autocast, metrics: MetricLogger,
             state: TrainState) -> None:
    if dist_state.pp_size > 1:
        logger.warning("evaluation is skipped under pipeline parallelism: evaluate the checkpoint (apps/main/eval.py)")
        return
    if dist_state.watchdog is not None:  # evaluation is not timed (it may take longer than a step), only named
        dist_state.watchdog.mark(state.step, "eval")
    results = evaluate(model, args.data, args.eval, tokenizer, dist_state, autocast, progress=args.logging.progress)
    if results:
        metrics.log_eval({"step": state.step, "tokens_seen": state.tokens_seen, "train_s": state.train_s, **results})
        logger.info("eval " + " ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))


def requeue_if_slurm(dist_state: DistState) -> None:
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


def _setup(args: TrainArgs, spec: ModelSpec, dist_state: DistState, stack: contextlib.ExitStack):
    """Everything the loop needs, resumed: (args with model.vocab_size resolved, model, optimizer, state,
    checkpoints, tokenizer, dtype)."""
    setup_logging(dist_state.rank)
    tokenizer = build_tokenizer(args.data.tokenizer.name, args.data.tokenizer.path)
    args = with_vocab_size(args, tokenizer)
    validate_args(args, spec, tokenizer)
    if dist_state.is_main:
        make_dump_dir(args.dump_dir)
        stack.enter_context(RunLock(args.dump_dir))  # before anything in dump_dir is touched
    dist_state.barrier()
    dtype, why = resolve_model_dtype(args.distributed.model_dtype, dist_state.device)
    logger.info(f"world: {dist_state.world_size} process(es) via {dist_state.env.launcher} on {dist_state.device}; "
                f"pp={dist_state.pp_size} dp={dist_state.dp_size} cp={dist_state.cp_size} tp={dist_state.tp_size}; "
                f"dtype {why}")
    model = build_model(args, spec, dist_state, dtype)
    n_params = num_params(model)
    logger.info(f"model ({spec.name}): {n_params:,} parameters ({n_params / 1e6:.2f}M)")
    if spec.describe is not None:
        logger.info("attention kernels:\n" + spec.describe(args.model, dist_state.device, dtype, args.data.seq_len))
    optimizer, scheduler = build_optimizer(model, args.optim, args.steps)
    data = stack.enter_context(DataLoader(args.data, dist_state.dp_rank, dist_state.dp_size, args.grad_acc_steps))
    state = TrainState(scheduler, data, SpikeGuard(args.optim.spike_factor, args.optim.spike_window))
    dist_state.watchdog = Watchdog(dist_state.store, dist_state.rank, dist_state.world_size, dist_state.timeout_s)
    stack.callback(dist_state.watchdog.close)
    checkpoints = CheckpointManager(args.checkpoint, args.dump_dir, spec.path)
    resume(state, checkpoints, model, optimizer, args, spec, dist_state)
    if dist_state.is_main:  # only now: a config that its checkpoint rejected must not replace the one that trained
        dump_config(args, Path(args.dump_dir) / "config.yaml")
    return args, model, optimizer, state, checkpoints, tokenizer, dtype


def _train(args: TrainArgs, spec: ModelSpec, dist_state: DistState, stack: contextlib.ExitStack) -> dict:
    args, model, optimizer, state, checkpoints, tokenizer, dtype = _setup(args, spec, dist_state, stack)
    if state.step >= args.steps:  # re-running a finished run (e.g. the quickstart again) costs nothing
        logger.info(f"run already complete at step {state.step} (steps={args.steps}): nothing to do")
        return {"step": state.step, "status": "done", "loss": float("nan")}
    window = throughput_window(args, spec, dist_state, dtype)
    tokens_per_step = args.data.batch_size * args.data.seq_len * args.grad_acc_steps * dist_state.dp_size
    metrics = stack.enter_context(MetricLogger(args.dump_dir, args.logging, rank=dist_state.rank,
                                               run_name=args.name, config_dict=config_to_dict(args),
                                               resume_step=state.step))
    preempt = stack.enter_context(Preemption())
    profiler = stack.enter_context(maybe_profile(args.profiling, args.dump_dir, dist_state.rank, dist_state.device))
    probe = Probe(args.probe, args.dump_dir, dist_state.rank)
    stack.callback(probe.close)
    progress = stack.enter_context(Progress(args.steps, start=state.step,
                                            enabled=dist_state.is_main and args.logging.progress))
    autocast = autocast_context(dist_state.device, dtype)
    trainer = Trainer(args, model, optimizer, state.scheduler, state.data, dist_state, autocast, probe,
                      spec.after_optimizer_step, state.spikes)
    status, result, last_read = "done", None, None
    syncs = HostSyncDetector(dist_state.device.type == "cpu") if args.logging.check_host_syncs else None
    model.train()
    while state.step < args.steps:
        step_start, step = time.perf_counter(), state.step + 1
        logging_step = step % args.logging.freq == 0 or step == args.steps
        # the host reads the step's numbers only at logging and save steps; elsewhere nothing may wait for the device
        with watch(syncs, step, enabled=not (logging_step or checkpoints.kinds_due(step))):
            result = trainer.step(step)
            result.stop = preempt.should_stop()  # every step, a host flag: ranks agree without a device sync
            checkpoints.poll()  # completes an async save of an earlier step once its files are written
        state.step, state.tokens_seen = step, state.tokens_seen + tokens_per_step
        state.train_s += time.perf_counter() - step_start
        window.add(tokens_per_step, result.data_s)
        profiler.step()
        last = (state.step == args.steps and args.checkpoint.save_at_end) or result.stop
        kinds = checkpoints.kinds_due(state.step, last=last)
        if logging_step or kinds:
            read_checked(result, state.step, checkpoints)  # a non-finite loss stops here, before any save
            last_read = result
        progress.update(state.step, f"loss {last_read.loss:.4f}" if last_read else "")
        if logging_step or result.stop:
            extra = spec.step_metrics(getattr(model, "_orig_mod", model)) if spec.step_metrics else {}
            extra.update(trainer.rank_times(state.step, result))
            log_step(metrics, progress, window, state, result, step_start, dist_state.device, extra)
        if args.eval.every and state.step % args.eval.every == 0 and state.step != args.steps:
            run_eval(model, args, tokenizer, dist_state, autocast, metrics, state)
        trainer.watchdog.mark(state.step, "checkpoint")
        if kinds:  # the final and preemption saves wait for their files
            checkpoints.save(state.step, model, optimizer, state.state_dict(dist_state.world_size),
                             config_to_dict(args), kinds, wait=last)
        if result.stop:
            status = "preempted"
            requeue_if_slurm(dist_state)
            break
    progress.close()
    if status == "done" and args.eval.at_end:
        run_eval(model, args, tokenizer, dist_state, autocast, metrics, state)
    loss = result.loss if result is not None else float("nan")
    logger.info(f"{status} at step {state.step}, loss {loss:.4f}")
    return {"step": state.step, "status": status, "loss": loss}
