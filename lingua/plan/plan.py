"""A run's plan: memory, FLOPs, collectives and time per GPU at any world size, from the app's real code on a fake
world (lingua.plan.simulate; a pipeline rank's own stages and schedule: lingua.plan.pipeline), priced on a GPU
(lingua.plan.estimate). One simulated rank per role: every rank alike without pipeline parallelism, else one per
pipeline stage kind; the plan fits when every role's peak does, and a pipeline runs at its slowest stage's speed.
For research code:

    from lingua.plan import plan
    p = plan(train_args, spec, world_size=64, gpu="h100")     # p.fits, p.roles[0].measure.memory, p.suggestions
    print(format_plan(p))                                      # lingua.plan.report
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from lingua.distributed.mesh import resolve_mesh_shape
from lingua.distributed.pipeline import n_microbatches, stages_per_rank
from lingua.errors import ConfigError, LinguaError
from lingua.models.spec import ModelSpec
from lingua.plan.estimate import StepTime, estimate_time, pipeline_factor
from lingua.plan.extrapolate import measure_step
from lingua.plan.gpus import GPU, get_gpu
from lingua.plan.pipeline import blocks_run, pipeline_roles, pipeline_stages
from lingua.plan.simulate import StepMeasure, whole_model
from lingua.plan.suggest import suggestions

# The share of a GPU's memory the tracked peak may take: the CUDA context, NCCL's buffers and the caching allocator's
# fragmentation take the rest (a few GiB on an 80 GB GPU).
USABLE = 0.9


@dataclass
class RolePlan:
    role: str  # which ranks behave like the simulated one
    rank: int  # the simulated rank
    measure: StepMeasure
    time: StepTime


@dataclass
class Plan:
    spec: str
    world_size: int
    gpu_key: str  # a lingua.plan.gpus.GPUS key
    mesh: tuple  # lingua.distributed.mesh.MeshShape (pp, dp_replicate, dp_shard, cp, tp)
    args: object  # the TrainArgs planned
    roles: list
    suggestions: list = field(default_factory=list)  # [(overrides, Plan)], smallest change first
    extrapolate: Optional[bool] = None  # lingua.plan.extrapolate: None = when the model is deep

    @property
    def gpu(self) -> GPU:
        return get_gpu(self.gpu_key)

    @property
    def peak_gib(self) -> float:
        return max(r.measure.peak_bytes for r in self.roles) / 2**30

    @property
    def slowest(self) -> RolePlan:
        """The role whose step is the longest: a pipeline's step (every stage waits for the slowest)."""
        return max(self.roles, key=lambda r: r.time.step_s)

    @property
    def fits(self) -> bool:
        return self.peak_gib <= USABLE * self.gpu.hbm_gib


def roles(args, world_size: int) -> list[tuple[str, int]]:
    """(description, rank to simulate) per distinct rank role. Data, tensor, context and expert parallelism give
    every rank the same work (rank 0 holds the largest shard when a dim does not divide evenly); pipeline
    parallelism gives each stage kind its own (lingua.plan.pipeline.pipeline_roles: first, middle, last)."""
    if args.distributed.pp_size > 1:
        return pipeline_roles(args, world_size)
    return [("every rank", 0)]


def pipeline_layout(args, rank: int, world_size: int) -> tuple[float, float]:
    """(the share of the blocks rank `rank` runs, lingua.plan.estimate.pipeline_factor): (1, 1) without a pipeline."""
    d = args.distributed
    if d.pp_size == 1:
        return 1.0, 1.0
    share = blocks_run(args, rank // (world_size // d.pp_size)) / args.model.n_layers
    m = n_microbatches(d, args.data.batch_size, args.grad_acc_steps)
    return share, pipeline_factor(d.pp_schedule, m, d.pp_size, stages_per_rank(d))


def attention_flops_per_token(spec: ModelSpec, model_args, seq_len: int) -> float:
    """The sequence-dependent part of the spec's FLOPs per token (the attention scores; PaLM's convention)."""
    try:
        return spec.flops_per_token(model_args, seq_len) - spec.flops_per_token(model_args, 0)
    except Exception:  # noqa: BLE001 (any spec: one whose count needs a positive length has no attention term here)
        return 0.0


def plan_role(args, spec: ModelSpec, world_size: int, gpu: GPU, role: str, rank: int,
              extrapolate: Optional[bool] = None) -> RolePlan:
    build = pipeline_stages if args.distributed.pp_size > 1 else whole_model
    measure = measure_step(args, spec, world_size, rank, extrapolate, build=build)
    return price(args, spec, world_size, gpu, RolePlan(role, rank, measure, None))


def price(args, spec: ModelSpec, world_size: int, gpu: GPU, role: RolePlan) -> RolePlan:
    """`role` with its step timed on `gpu` (lingua.plan.estimate)."""
    measure, rank = role.measure, role.rank
    shape = resolve_mesh_shape(args.distributed, world_size)
    tp, split = shape.tp, shape.tp * shape.cp  # the ranks one data-parallel replica's tokens are split over
    d = args.distributed
    share, pipeline = pipeline_layout(args, rank, world_size)
    time = estimate_time(
        measure, gpu, attn_flops_per_token=attention_flops_per_token(spec, args.model, args.data.seq_len),
        model_flops_per_token=spec.flops_per_token(args.model, args.data.seq_len),
        tp_ranks=tuple(range(rank - rank % tp, rank - rank % tp + tp)), split=split,
        tokens_per_gpu=measure.tokens * shape.dp_replicate * shape.dp_shard / world_size, full_ac=d.ac == "full",
        dtype=d.model_dtype, float8=bool(d.float8_recipe), layer_share=share, pipeline=pipeline)
    return RolePlan(role.role, rank, measure, time)


def on_gpu(p: Plan, spec: ModelSpec, gpu: str) -> Plan:
    """The same simulated steps priced on another GPU (the memory does not depend on it; whether it fits does)."""
    target = get_gpu(gpu)
    roles = [price(p.args, spec, p.world_size, target, r) for r in p.roles]
    return Plan(p.spec, p.world_size, gpu.lower(), p.mesh, p.args, roles, extrapolate=p.extrapolate)


def plan(args, spec: ModelSpec, world_size: int, gpu: str = "h100", suggest: bool = True,
         extrapolate: Optional[bool] = None) -> Plan:
    """Plan `args` (a TrainArgs of `spec`) on `world_size` GPUs of kind `gpu`; when it does not fit and `suggest`,
    re-plan the smallest changes that would make it fit (lingua.plan.suggest). `extrapolate`: simulate 4 and 6 blocks
    and extrapolate to the model's (lingua.plan.extrapolate); None: when it has more than 12."""
    target = get_gpu(gpu)
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    mesh = resolve_mesh_shape(args.distributed, world_size)
    args = with_vocab(args)
    result = Plan(spec.name, world_size, gpu.lower(), mesh, args,
                  [plan_role(args, spec, world_size, target, role, rank, extrapolate)
                   for role, rank in roles(args, world_size)], extrapolate=extrapolate)
    if suggest and not result.fits:
        result.suggestions = suggestions(result, spec, replan)
    return result


def with_vocab(args):
    """model.vocab_size -1 means the tokenizer's, resolved as the train loop resolves it."""
    if getattr(args.model, "vocab_size", 1) > 0:
        return args
    from lingua.data.tokenizer import build_tokenizer
    from lingua.train.loop import with_vocab_size

    return with_vocab_size(args, build_tokenizer(args.data.tokenizer.name, args.data.tokenizer.path))


def with_overrides(args, overrides: dict):
    """A copy of `args` with dotted keys set (e.g. {"distributed.tp_size": 2})."""
    args = copy.deepcopy(args)
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = args
        for part in path:
            node = getattr(node, part)
        if name not in {f.name for f in dataclasses.fields(node)}:
            raise KeyError(key)
        setattr(node, name, value)
    return args


def replan(base: Plan, spec: ModelSpec, overrides: dict) -> Plan | None:
    """`base` re-planned with `overrides`; None when the change itself is not a valid config."""
    try:
        return plan(with_overrides(base.args, overrides), spec, base.world_size, base.gpu_key, suggest=False,
                    extrapolate=base.extrapolate)
    except LinguaError:
        return None

