"""One pipeline rank's step on the fake world: its own stages (lingua/distributed/pipeline.py: the real stage split,
parallelization and torch.distributed.pipelining schedule), run by the Trainer on fake tensors, so the peak holds the
microbatches the real schedule keeps in flight on that rank (GPipe: all of them on every rank; 1F1B: up to pp - rank
on rank `rank`) and the send/recv the schedule issues are counted (batch_isend_irecv reaches c10d's send / recv_).

Two things a fake world cannot carry, given here instead:
- shapes: torch infers a stage's input shape from metadata the previous rank sends (send_object_list), and the
  fake process group delivers nothing. Every stage is given its shapes (PipelineStage's input_args / output_args):
  the first takes tokens (mb, seq) int64, the last returns the loss (a scalar); between stages the hidden state is
  (mb, seq / (cp x tp), dim) (sequence parallel under TP) in the dtype the first stage's embedding produces: the
  params' dtype under data parallelism's mixed precision, else the built model's fp32.
- the warm-up vote: the ranks agree on static or dynamic shapes by sending an int around the pipe and reading it
  (.item(), which a fake tensor cannot); with every shape given, the real vote is static, and so is this one.

The zero-bubble schedules (zbv, dualpipev) run but are not planned: torch's MemTracker hooks fail when their
backward takes the input gradients alone (autograd.grad of a received leaf); the plan says so in one line.

Which rank stands for a stage kind (lingua.plan.plan.roles): the first, the last and, with pp > 2, the middle rank
with the most microbatches in flight (rank 1: in 1F1B rank r keeps pp - r in flight) among the ranks with the most
blocks.
"""

import torch

from lingua.distributed.mesh import DistState
from lingua.distributed.pipeline import (
    layer_ranges,
    local_stage_ids,
    n_microbatches,
    pipelined_model,
    stage_modules,
    stages_per_rank,
)
from lingua.errors import LinguaError
from lingua.models.spec import ModelSpec

ZERO_BUBBLE = ("zbv", "dualpipev")  # their backward runs as autograd.grad (inputs) then the weights' gradients


def pipeline_roles(args, world_size: int) -> list[tuple[str, int]]:
    """(description, rank to simulate) per pipeline stage kind: pp rank p is ranks p x (world / pp) onwards (pp is
    the outermost mesh dim)."""
    pp = args.distributed.pp_size
    per = world_size // pp
    kinds = [("first", 0)] + ([("middle", middle_rank(args))] if pp > 2 else []) + [("last", pp - 1)]
    return [(f"pp stage {p} ({kind}; ranks {p * per}-{(p + 1) * per - 1})" if per > 1 else
             f"pp stage {p} ({kind}; rank {p})", p * per) for kind, p in kinds]


def blocks_run(args, pp_rank: int) -> int:
    """How many blocks pipeline rank `pp_rank` runs (its stages', as lingua.distributed.pipeline splits them)."""
    d = args.distributed
    per_rank = stages_per_rank(d)
    ranges = layer_ranges(args.model.n_layers, d.pp_size * per_rank)
    return sum(len(ranges[i]) for i in local_stage_ids(pp_rank, d.pp_size, per_rank, d.pp_schedule))


def middle_rank(args) -> int:
    """The middle pp rank (neither first nor last) with the most blocks, the earliest of those: the most
    microbatches in flight under 1F1B."""
    blocks = {p: blocks_run(args, p) for p in range(1, args.distributed.pp_size - 1)}
    return max(blocks, key=lambda p: (blocks[p], -p))


def stage_shapes(args, state: DistState, dtype: torch.dtype, microbatches: int, n_stages: int):
    """stage id -> PipelineStage's input_args / output_args (meta tensors): what the fake world cannot send."""
    d, mb = args.data, args.data.batch_size // microbatches
    hidden = torch.empty((mb, d.seq_len // (state.cp_size * state.tp_size), args.model.dim), dtype=dtype,
                         device="meta", requires_grad=True)  # its gradient travels back
    tokens = torch.empty((mb, d.seq_len), dtype=torch.int64, device="meta")
    loss = torch.empty((), dtype=torch.float32, device="meta", requires_grad=True)
    return lambda i: {"input_args": tokens if i == 0 else hidden,
                      "output_args": loss if i == n_stages - 1 else hidden}


def static_vote(stages, has_backward, p2p_done) -> None:
    """The outcome of torch's warm-up vote when every stage's shapes are given (see the module docstring)."""
    from torch.distributed.pipelining._utils import InferenceMode

    for stage in stages:
        stage._inference_mode = InferenceMode.STATIC


def watch_microbatches(pipelined) -> None:
    """Call pipelined.before_microbatch(stage module) (when set: lingua.plan.simulate's memory tracker) before every
    stage's forward of a microbatch: the tracker refuses a module's second forward in one tracked region."""
    pipelined.before_microbatch = None
    for stage in pipelined.schedule._stages if hasattr(pipelined.schedule, "_stages") else [pipelined.schedule._stage]:
        forward = stage.forward_one_chunk

        def forward_one_chunk(*args, _forward=forward, _module=stage.submod, **kwargs):
            if pipelined.before_microbatch is not None:
                pipelined.before_microbatch(_module)
            return _forward(*args, **kwargs)

        stage.forward_one_chunk = forward_one_chunk


def pipeline_stages(args, spec: ModelSpec, state: DistState, dtype: torch.dtype):
    """lingua.plan.simulate.simulate_step's `build` for a pipelined config: this rank's stages on the meta device,
    and how to make them a PipelinedModel under FakeTensorMode."""
    from lingua.train.loop import placed_model

    d = args.distributed
    if d.pp_schedule in ZERO_BUBBLE:
        raise LinguaError(f"distributed.pp_schedule={d.pp_schedule} is not planned yet: torch's memory tracker cannot "
                          "follow its split backward (autograd.grad of the received inputs); plan interleaved_1f1b, "
                          "the same two stages per rank, for an estimate")
    microbatches = n_microbatches(d, args.data.batch_size, args.grad_acc_steps)
    try:
        model = placed_model(args, spec, state, dtype)
        ids, n_stages, modules = stage_modules(spec, model, state.mesh, state.pp_rank, d, dtype, state.device)
    except LinguaError:
        raise
    except Exception as e:  # noqa: BLE001 (a config the model or torch's pipelining rejects without wording it)
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise LinguaError(f"the config does not build {spec.name} pipeline stages "
                          f"({type(e).__name__}: {first[:200]})") from None
    # the hidden state's dtype: what the embedding gives (FSDP/replicate cast params to `dtype`, else fp32 params)
    hidden = dtype if state.dp_size * state.cp_size > 1 else next(modules[0].parameters()).dtype

    def finish(_):
        for m in modules:
            m.to_empty(device="cpu")
            with torch.no_grad():
                m.init_buffers()  # RoPE tables; no init: values do not matter
        pipelined = pipelined_model(modules, ids, n_stages, state.mesh, d, torch.device("cpu"), microbatches,
                                    stage_shapes(args, state, hidden, microbatches, n_stages))
        pipelined.schedule._warmup_p2p = static_vote
        watch_microbatches(pipelined)
        return pipelined

    return modules, finish
