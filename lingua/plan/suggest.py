"""When a plan does not fit: the smallest config changes that would make it fit, each re-planned on the fake world
(never a guess from a formula). Tried in order of what they cost: activation checkpointing (selective, then full:
recompute), a larger tensor-parallel group (collectives on the critical path), the model's own (spec.plan_candidates;
MoE: a larger expert-parallel group), a smaller micro-batch with more gradient accumulation (the same global batch,
smaller matmuls), then, only when none of those fits, pipeline parallelism (pp_size 2, 4, 8 with 1F1B, the same
global batch in up to 4 x pp microbatches: a bubble under 20%). When no single change fits, they are stacked in that
order (pipeline parallelism last, never stacked) until one does."""

from typing import Callable, Optional

from lingua.models.spec import ModelSpec

MAX_TP = 8  # a tensor-parallel group stays inside one node (NVLink)
# Pipeline microbatches per stage at most: 4 x pp keeps 1F1B's bubble, (pp - 1) / (m + pp - 1), under 20%
# (Megatron-LM's advice: m >= 4 pp) with smaller microbatches than gradient accumulation's
MICROBATCHES_PER_STAGE = 4


def larger_tp(args, world_size: int) -> dict:
    """The overrides that double tp_size, taking the factor from the data-parallel dim that has it; {} if none."""
    d = args.distributed
    tp = d.tp_size * 2
    if tp > MAX_TP or world_size % tp:
        return {}
    change = {"distributed.tp_size": tp}
    if d.compile is True:  # compile=true with TP is refused (lingua.distributed.mesh.resolve_mesh_shape)
        change["distributed.compile"] = False
    if d.dp_shard > 1:
        change["distributed.dp_shard"] = d.dp_shard // 2
    elif d.dp_replicate > 1:
        change["distributed.dp_replicate"] = d.dp_replicate // 2
    return change


def pipeline(args, world_size: int, pp: int) -> dict:
    """The overrides that split the layers over `pp` pipeline ranks under 1F1B, taking the factor from the
    data-parallel dims and keeping the global batch: the rank's batch grows by `pp` x grad_acc_steps (pipeline
    microbatches replace gradient accumulation), cut into as many microbatches as divide it, up to 4 x pp. {} where
    that is not valid."""
    d = args.distributed
    if d.pp_size != 1 or args.model.n_layers < pp or getattr(args.model, "weight_tying", False):
        return {}
    change = {"distributed.pp_size": pp, "distributed.pp_schedule": "1f1b"}
    if d.dp_shard > 1 and d.dp_shard % pp == 0:
        change["distributed.dp_shard"] = d.dp_shard // pp
    elif d.dp_replicate > 1 and d.dp_replicate % pp == 0:
        change["distributed.dp_replicate"] = d.dp_replicate // pp
    elif world_size % (pp * d.dp_shard * d.cp_size * d.tp_size):  # dp_replicate left at 1 is inferred
        return {}
    batch = args.data.batch_size * args.grad_acc_steps * pp
    microbatches = max(m for m in range(1, min(batch, MICROBATCHES_PER_STAGE * pp) + 1) if batch % m == 0)
    return {**change, "data.batch_size": batch, "grad_acc_steps": 1, "distributed.pp_microbatches": microbatches}


def candidates(args, world_size: int, spec: Optional[ModelSpec] = None) -> list[dict]:
    """Single changes, cheapest first; each is a dict of dotted config keys. The spec's own (spec.plan_candidates)
    come after TP, before the smaller micro-batch."""
    d, out = args.distributed, []
    if d.ac == "none":
        out.append({"distributed.ac": "selective"})
    if d.ac != "full":
        out.append({"distributed.ac": "full"})
    if larger_tp(args, world_size):
        out.append(larger_tp(args, world_size))
    if spec is not None and spec.plan_candidates is not None:
        out.extend(spec.plan_candidates(args, world_size))
    if args.data.batch_size > 1 and args.data.batch_size % 2 == 0 and d.pp_size == 1:
        out.append({"data.batch_size": args.data.batch_size // 2, "grad_acc_steps": args.grad_acc_steps * 2})
    out += [c for pp in (2, 4, 8) if (c := pipeline(args, world_size, pp))]
    return out


def suggestions(base, spec: ModelSpec, replan: Callable) -> list:
    """[(overrides, Plan)] for every single change that is a valid config, then, if none of them fits, the changes
    stacked one more at a time (full AC, larger TP, the spec's, smaller micro-batch, again) until the plan fits.
    `replan(plan, spec, overrides)` is lingua.plan.plan.replan: a new Plan, or None when the change is not a valid
    config."""
    options = candidates(base.args, base.world_size, spec)
    # pipeline parallelism, the costliest change (and the slowest to plan: a stage is simulated block by block), is
    # planned only when no cheaper change fits
    singles = []
    for cheap in (True, False):
        planned = [(c, replan(base, spec, c)) for c in options if ("distributed.pp_size" in c) != cheap]
        singles += [(c, p) for c, p in planned if p is not None]
        if any(p.fits for _, p in singles):
            return singles
    stacked, current = [], base
    for _ in range(6):  # AC, then the first valid of TP, the spec's and the micro-batch halved, five more times
        options = [c for c in candidates(current.args, current.world_size, spec)
                   if c.get("distributed.ac") != "selective" and "distributed.pp_size" not in c]
        step = next(((c, p) for c in options if (p := replan(current, spec, c)) is not None), None)
        if step is None:
            break
        change = {**(stacked[-1][0] if stacked else {}), **step[0]}
        current = step[1]
        stacked.append((change, current))
        if current.fits:
            break
    return singles + stacked[-1:]
