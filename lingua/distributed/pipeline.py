"""Pipeline parallelism: the model's blocks split over the `pp` mesh dim, run by a torch.distributed.pipelining
schedule.

The model package says how it splits (its ModelSpec's `pipeline_stage`, lingua/models/stage.py: a stage is a range of
blocks, embeddings with the first stage, norm/output/loss with the last); here the blocks are divided into
pp_size x stages_per_rank stages, each stage this rank runs is parallelized like a whole model (spec.parallelize:
TP -> AC -> compile -> FSDP over the stage's own data-parallel mesh) and materialized, then initialised in the whole
model's order (lingua/models/init.py: a weight another rank owns still takes its random draw), so a pipelined run
starts from the 1-process weights. Which stages a rank runs: rank r runs stages r, r + pp, ... (looped schedules),
or r and 2 pp - 1 - r (the V-shaped zbv and dualpipev).

One pipeline step splits the local batch into distributed.pp_microbatches equal microbatches (they replace gradient
accumulation: grad_acc_steps must be 1) and averages their gradients; the loss exists on the last stage only.
"""

import dataclasses
import logging

import torch
from torch import nn

from lingua.distributed.mesh import DistributedArgs
from lingua.errors import ConfigError, LinguaError
from lingua.models.stage import LayerSlice

logger = logging.getLogger(__name__)

# schedule -> (torch.distributed.pipelining class, stages per rank it needs: exactly 1, exactly 2, or >= 2)
SCHEDULES = {"gpipe": ("ScheduleGPipe", "1"), "1f1b": ("Schedule1F1B", "1"),
             "interleaved_1f1b": ("ScheduleInterleaved1F1B", ">=2"), "zbv": ("ScheduleZBVZeroBubble", "2"),
             "dualpipev": ("ScheduleDualPipeV", "2")}


def stages_per_rank(args: DistributedArgs) -> int:
    need = SCHEDULES[args.pp_schedule][1]
    n = args.pp_stages_per_rank or (1 if need == "1" else 2)
    if (need == ">=2" and n < 2) or (need != ">=2" and n != int(need)):
        raise ConfigError(f"distributed.pp_schedule={args.pp_schedule} runs {need} stage(s) per rank, got "
                          f"distributed.pp_stages_per_rank={n}")
    return n


def layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous blocks per stage; when n_stages does not divide n_layers, the first n_layers % n_stages stages run
    one block more (the last stage already carries the output projection and the loss)."""
    if n_layers < n_stages:
        raise ConfigError(f"model.n_layers={n_layers} is below distributed.pp_size x pp_stages_per_rank = {n_stages}: "
                          "every pipeline stage needs a block")
    sizes = [n_layers // n_stages + (s < n_layers % n_stages) for s in range(n_stages)]
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def local_stage_ids(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    if schedule in ("zbv", "dualpipev"):
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(per_rank)]


def n_microbatches(args: DistributedArgs, batch_size: int, grad_acc_steps: int) -> int:
    """distributed.pp_microbatches (0: one per pipeline stage); it must divide the local batch."""
    m = args.pp_microbatches or args.pp_size * stages_per_rank(args)
    if batch_size % m:
        raise ConfigError(f"distributed.pp_microbatches={m} does not divide data.batch_size={batch_size}")
    if grad_acc_steps != 1:
        raise ConfigError(f"grad_acc_steps={grad_acc_steps} with distributed.pp_size={args.pp_size}: pipeline "
                          "microbatches replace gradient accumulation, set grad_acc_steps=1 and pp_microbatches")
    return m


class PipelinedModel(nn.Module):
    """The stages this rank runs, seen as one module by the optimizer, gradient clipping, metrics and checkpoints: its
    parameter names are the whole model's (`layers.5...` for block 5), so a checkpoint resumes on any pipeline layout.
    `step` runs one pipeline step (forward and backward of every microbatch); calling it as a model is refused."""

    def __init__(self, stages: list[nn.Module], schedule, pp_group, has_last: bool):
        super().__init__()
        for name in ("tok_embeddings", "norm", "output"):
            setattr(self, name, next((getattr(s, name) for s in stages if getattr(s, name) is not None), None))
        blocks = {int(i): b for s in stages for i, b in s.layers._modules.items()}
        self.layers = LayerSlice(dict(sorted(blocks.items())))
        self.schedule, self.pp_group, self.has_last = schedule, pp_group, has_last
        self.stages = stages  # a plain list: their modules are registered above, under the whole model's names
        self.warmed_up = False

    def step(self, tokens: torch.Tensor, target: torch.Tensor, tok_idx: torch.Tensor) -> torch.Tensor:
        """tokens, target, tok_idx: (bs, seqlen), the local batch. Returns this rank's part of the mean microbatch
        loss (detached): the last stage's loss, plus the extra losses (MoE aux) of the earlier stages it runs; summed
        over the pipeline's ranks, the loss of the whole model."""
        if not self.warmed_up:
            self._warm_up(tokens, target, tok_idx)
        losses = []
        self.schedule.step(tokens, target=target, losses=losses, return_outputs=False, tok_idx=tok_idx, labels=target)
        parts = [torch.stack([loss.detach() for loss in losses]).mean()] if self.has_last else []
        for stage in self.stages:
            if stage.sent_losses:
                parts.append(torch.stack(stage.sent_losses).mean())
                stage.sent_losses.clear()
        return sum(parts) if parts else torch.zeros((), device=tokens.device)

    def _warm_up(self, tokens: torch.Tensor, target: torch.Tensor, tok_idx: torch.Tensor) -> None:
        """torch's first pipeline step infers the stages' shapes with extra forwards (past the first stage on
        uninitialised inputs), whose side effects a model may keep (MoE's routing counts): run that step once and
        undo it (buffers, gradients, the extra losses kept for logging)."""
        buffers = [b for s in self.stages for b in s.buffers()]
        saved = [b.clone() for b in buffers]
        self.schedule.step(tokens, target=target, return_outputs=False, tok_idx=tok_idx, labels=target)
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)
        for p in self.parameters():
            p.grad = None
        for stage in self.stages:
            stage.sent_losses.clear()
        self.warmed_up = True

    def forward(self, *args, **kwargs):
        raise LinguaError("a pipelined model runs through PipelinedModel.step, not as one module (evaluate its "
                          "checkpoint with distributed.pp_size=1)")


def _stage_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns its loss; loss_parallel returns it as a replicated DTensor."""
    return out.to_local() if hasattr(out, "to_local") else out


def build_schedule(name: str, stages: list, microbatches: int):
    from torch.distributed import pipelining

    cls = getattr(pipelining, SCHEDULES[name][0])
    try:  # scale_grads: the gradients are averaged over microbatches, like the mean loss of one big batch
        if SCHEDULES[name][1] == "1":
            return cls(stages[0], microbatches, loss_fn=_stage_loss, scale_grads=True)
        return cls(stages, microbatches, loss_fn=_stage_loss, scale_grads=True)
    except ValueError as e:  # torch's own constraints (e.g. microbatches vs stages), as one line
        raise ConfigError(f"distributed.pp_schedule={name} with pp_microbatches={microbatches}: "
                          f"{str(e).splitlines()[0]}") from None


def build_pipeline(spec, model: nn.Module, mesh, pp_rank: int, args: DistributedArgs, param_dtype: torch.dtype,
                   device: torch.device, seed: int, microbatches: int) -> PipelinedModel:
    """This rank's stages of `model` (`spec`'s, on the meta device), parallelized, materialized, initialised, and
    their schedule."""
    ids, n_stages, modules = stage_modules(spec, model, mesh, pp_rank, args, param_dtype, device)
    for m in modules:
        m.to_empty(device=device)
    with torch.no_grad():  # the whole model's init order; only the weights this rank materialized are written
        torch.manual_seed(seed)
        model.init_weights()
        for m in modules:
            m.init_buffers()
    return pipelined_model(modules, ids, n_stages, mesh, args, device, microbatches)


def stage_modules(spec, model: nn.Module, mesh, pp_rank: int, args: DistributedArgs, param_dtype: torch.dtype,
                  device: torch.device) -> tuple[list[int], int, list[nn.Module]]:
    """(this rank's stage ids, the number of stages, its stage modules parallelized on the meta device)."""
    if model.args.weight_tying:
        raise ConfigError("model.weight_tying=true cannot be combined with distributed.pp_size > 1 (the embeddings "
                          "and the output projection live on different stages)")
    if mesh["cp"].size() > 1:
        raise ConfigError("distributed.cp_size > 1 cannot be combined with distributed.pp_size > 1 yet (the "
                          "context-parallel hook cuts a whole model's tokens, not a pipeline stage's inputs)")
    per_rank = stages_per_rank(args)
    n_stages = args.pp_size * per_rank
    ranges = layer_ranges(len(model.layers), n_stages)
    ids = local_stage_ids(pp_rank, args.pp_size, per_rank, args.pp_schedule)
    # Several microbatches run forward before their backward: resharding after each forward would all-gather again.
    stage_args = dataclasses.replace(args, fsdp_reshard_after_forward=False)
    modules = [spec.parallelize(spec.pipeline_stage(model, ranges[i]), mesh, stage_args, param_dtype, device)
               for i in ids]
    logger.info(f"pipeline: {args.pp_schedule}, {n_stages} stages ({per_rank} per rank); this rank runs stages "
                f"{ids}, blocks {[list(ranges[i]) for i in ids]}")
    return ids, n_stages, modules


def pipelined_model(modules: list[nn.Module], ids: list[int], n_stages: int, mesh, args: DistributedArgs,
                    device: torch.device, microbatches: int, stage_kwargs=None) -> PipelinedModel:
    """The materialized stage modules `ids` of `n_stages`, as torch PipelineStages under their schedule.
    stage_kwargs(stage id) -> extra PipelineStage arguments (lingua.plan gives the shapes a fake world cannot send)."""
    from torch.distributed.pipelining import PipelineStage

    group = mesh["pp"].get_group()
    stages = [PipelineStage(m, i, n_stages, device, group=group, **(stage_kwargs(i) if stage_kwargs else {}))
              for i, m in zip(ids, modules)]
    return PipelinedModel(modules, build_schedule(args.pp_schedule, stages, microbatches), group,
                          has_last=n_stages - 1 in ids)
