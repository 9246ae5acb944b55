"""One optimizer step of the train loop (lingua/train/loop.py): forward and backward over the micro-batches (or one
pipeline schedule), the global loss, clipping, the update. lingua.plan runs the same Trainer on fake tensors."""

import time
from dataclasses import dataclass

import torch
from torch import nn

from lingua.distributed.mesh import DistState
from lingua.distributed.pipeline import PipelinedModel
from lingua.distributed.watchdog import Watchdog
from lingua.train.optim import clip_grad_norm_
from lingua.train.probe import Probe
from lingua.train.spikes import SpikeGuard
from lingua.train.stragglers import SlowRankMonitor, gather_rank_times


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A loss that loss_parallel returned as a replicated DTensor, as a plain tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP's reduce-scatter on all but the last micro-batch of a gradient accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


@dataclass
class StepResult:
    """One step's numbers, left on the device until `read` (a host sync, which a GPU step should not pay every step)."""

    stats: torch.Tensor  # [mean loss over micro-batches and ranks, grad norm before clipping]
    data_s: float  # time spent waiting for batches
    own_s: float  # data_s + CPU time of forward, backward and update: this rank's own share (stragglers.py)
    loss: float = float("nan")  # filled in by read()
    grad_norm: float = float("nan")
    stop: bool = False  # some rank was asked to stop (preemption; a host flag, lingua/train/preemption.py)

    def read(self) -> "StepResult":
        self.loss, self.grad_norm = self.stats.tolist()
        return self


class Trainer:
    """One optimizer step at a time: forward/backward over the micro-batches, one small collective (the global
    loss), clipping, the update. Nothing here waits for the device: the loop reads the
    step's numbers (and checks the loss is finite) only where it needs them, at logging and checkpoint steps."""

    def __init__(self, args, model, optimizer, scheduler, data, dist_state: DistState, autocast,
                 probe: Probe, after_optimizer_step=None, spikes: SpikeGuard = None):
        self.args, self.model, self.optimizer, self.scheduler = args, model, optimizer, scheduler
        self.data_iter, self.dist, self.autocast, self.probe = iter(data), dist_state, autocast, probe
        self.after_optimizer_step = after_optimizer_step  # the spec's hook, e.g. MoE's load-balancing bias update
        self.spikes = spikes or SpikeGuard()
        self.slow_ranks = SlowRankMonitor(args.logging.slow_rank_factor)
        self.watchdog = dist_state.watchdog or Watchdog(None, dist_state.rank, 1, dist_state.timeout_s)

    def step(self, step: int) -> StepResult:
        """Run optimizer step number `step` (1-based). A probed step runs a compiled model eagerly: the probe's
        activation hooks would otherwise recompile the graph twice (with hooks, and without them again)."""
        if self.probe.is_probe_step(step):
            with torch.compiler.set_stance("force_eager"):
                result = self._step(step)
        else:
            result = self._step(step)
        self.watchdog.arm()  # the watchdog times steps from the second one of this process on: the first one compiles
        self.watchdog.mark(step, "log")
        return result

    def rank_times(self, step: int, result: StepResult) -> dict:
        """Every rank's own time of this step (one small all-gather: call it on every rank, at logging steps only)."""
        return self.slow_ranks.metrics(step, gather_rank_times(1000 * result.own_s, self.dist.device))

    def _step(self, step: int) -> StepResult:
        args, dist_state, device = self.args, self.dist, self.dist.device
        loss_sum, data_s, cpu_s = torch.zeros((), device=device), 0.0, 0.0
        self.probe.before_step(step, self.model)  # off steps: one integer test, no hooks
        for micro in range(args.grad_acc_steps):
            self.watchdog.mark(step, "data")
            t0 = time.perf_counter()
            batch = _to_device(next(self.data_iter), device)
            data_s += time.perf_counter() - t0
            c0 = time.thread_time()  # CPU, not wall: a wait for other ranks in a collective takes none
            _grad_sync(self.model, micro == args.grad_acc_steps - 1)
            with dist_state.loss_context():  # tensor parallel: the loss is computed on vocab-sharded logits
                self.watchdog.mark(step, "forward")  # a pipeline's step runs forward and backward together
                if isinstance(self.model, PipelinedModel):  # forward and backward of every pipeline microbatch
                    with self.autocast:
                        loss = self.model.step(batch["input"], batch["target"], batch["tok_idx"])
                else:
                    with self.autocast:
                        loss = self.model(batch["input"], batch["target"], tok_idx=batch["tok_idx"])
                    self.watchdog.mark(step, "backward")
                    (loss / args.grad_acc_steps).backward()
            loss_sum += _local(loss.detach())
            cpu_s += time.thread_time() - c0
        self.watchdog.mark(step, "optimizer")
        c0 = time.thread_time()
        self.probe.after_backward(step, self.model)
        # Only the last pipeline stage has the loss (the other stages add 0): each pipeline counts it pp_size times.
        loss_sum = loss_sum * dist_state.pp_size / (args.grad_acc_steps * dist_state.world_size)
        loss_mean = dist_state.all_reduce(loss_sum)
        pp_group = self.model.pp_group if isinstance(self.model, PipelinedModel) else None
        grad_norm = clip_grad_norm_(self.model, args.optim.clip, pp_group=pp_group)
        if not self.spikes.skip(loss_mean):  # the global loss: every rank decides alike
            self.optimizer.step()
            if self.after_optimizer_step is not None:  # the spec's hook (MoE: the load-balancing bias update)
                self.after_optimizer_step(self.model)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        own_s = data_s + cpu_s + time.thread_time() - c0
        return StepResult(torch.stack([loss_mean, grad_norm.to(loss_mean.device, loss_mean.dtype)]), data_s, own_s)
