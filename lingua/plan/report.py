"""A plan as text: one table per rank role (memory by category against the GPU, FLOPs, bytes per collective kind, the
pipeline bubble, the step time and what it gives), a pipeline's speed (its slowest stage's), then the verdict and the
re-planned changes."""

from lingua.distributed.pipeline import n_microbatches
from lingua.plan.comm import KINDS
from lingua.plan.estimate import KERNEL_EFFICIENCY
from lingua.plan.plan import USABLE, Plan

MEMORY_ROWS = ("params", "unsharded params", "grads", "optimizer", "activations", "temporaries")
GiB = 2**30


def layout(p: Plan) -> str:
    pp, rep, shard, cp, tp = p.mesh
    d, a = p.args.distributed, p.args
    ac = {"full": "full AC", "selective": "selective AC"}.get(d.ac, "no AC")
    dp = "DDP" if d.fsdp_type == "no_shard" else ("HSDP" if rep > 1 and shard > 1 else "FSDP")
    ep = f" ep {d.ep_size}" if d.ep_size > 1 else ""
    pipe = (f" | {d.pp_schedule}, {n_microbatches(d, a.data.batch_size, a.grad_acc_steps)} pipeline microbatches"
            if pp > 1 else "")
    return (f"pp {pp} x dp_replicate {rep} x dp_shard {shard} x cp {cp} x tp {tp}{ep} ({dp}) | {ac} | "
            f"{'fp32' if d.model_dtype == 'fp32' else 'bf16'}"
            f"{' + float8 ' + d.float8_recipe if d.float8_recipe else ''}"
            f" | micro-batch {a.data.batch_size} x {a.data.seq_len}, grad_acc {a.grad_acc_steps}{pipe}")


def role_table(p: Plan, r) -> list[str]:
    m, t, gpu = r.measure, r.time, p.gpu
    how = (f"rank {r.rank} simulated with {' and '.join(map(str, m.extrapolated_from))} blocks, extrapolated to "
           f"{p.args.model.n_layers}" if m.extrapolated_from else f"rank {r.rank} simulated")
    lines = [f"  role: {r.role} ({how})", "    memory at the step's peak            GiB"]
    lines += [f"      {k:<32}{m.memory.get(k, 0) / GiB:8.2f}" for k in MEMORY_ROWS]
    lines.append(f"      {'total':<32}{m.peak_bytes / GiB:8.2f}  of {gpu.hbm_gib:.1f} "
                 f"({USABLE * gpu.hbm_gib:.1f} usable)")
    counted = f"{m.matmul_flops / 1e12:,.4g} TFLOP matmuls counted"
    lines.append(f"    FLOPs per GPU per step: {t.executed_flops / 1e12:,.4g} TFLOP executed ({counted}; attention by "
                 "formula; the spec's count where the counter sees less)")
    by_kind = m.comm.by_kind()
    lines.append("    collectives per GPU per step: " + ", ".join(
        f"{k} {by_kind[k] / 1e9:,.2f} GB ({m.comm.calls.get(k, 0)})" for k in KINDS if m.comm.calls.get(k)) or "none")
    if t.bubble:
        lines.append(f"    pipeline bubble: {100 * t.bubble:.1f}% of the compute time idle "
                     f"(compute x {1 / (1 - t.bubble):.3f}; README 'Planning a run')")
    lines.append(f"    time: compute {t.compute_s * 1e3:,.4g} ms | data-parallel comm {t.dp_comm_s * 1e3:,.4g} ms "
                 f"(overlapped) | exposed comm {t.exposed_comm_s * 1e3:,.4g} ms | optimizer {t.optimizer_s * 1e3:,.4g} "
                 f"ms | step {t.step_s * 1e3:,.4g} ms")
    lines.append(f"    {t.tok_per_s_gpu:,.0f} tok/s per GPU, MFU {100 * t.mfu:.1f}% "
                 f"(kernels at {KERNEL_EFFICIENCY:.0%} of peak; README 'Planning a run')")
    return lines


def verdict(p: Plan) -> list[str]:
    if p.fits:
        return [f"verdict: fits ({p.peak_gib:.1f} GiB of {USABLE * p.gpu.hbm_gib:.1f} usable per GPU)"]
    lines = [f"verdict: does NOT fit ({p.peak_gib:.1f} GiB > {USABLE * p.gpu.hbm_gib:.1f} usable per GPU)"]
    for change, q in p.suggestions:
        keys = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())
        t = q.slowest.time
        lines.append(f"  {'fits' if q.fits else 'no  '}  {q.peak_gib:6.1f} GiB  "
                     f"{t.tok_per_s_gpu:8,.0f} tok/s/GPU  MFU {100 * t.mfu:4.1f}%  {keys}")
    return lines


def pipeline_line(p: Plan) -> list[str]:
    """A pipelined plan's speed: its slowest stage's (every stage waits for it)."""
    if len(p.roles) == 1:
        return []
    t = p.slowest.time
    return [f"pipeline: step {t.step_s * 1e3:,.4g} ms (the slowest stage: {p.slowest.role}), "
            f"{t.tok_per_s_gpu:,.0f} tok/s per GPU, MFU {100 * t.mfu:.1f}%"]


def format_plan(p: Plan, where: str = "") -> str:
    gpu = p.gpu
    nodes = -(-p.world_size // gpu.per_node)
    head = [f"plan: {p.spec}{' ' + where if where else ''} on {p.world_size} x {gpu.name} ({nodes} node(s))",
            f"  {layout(p)}"]
    body = [line for r in p.roles for line in role_table(p, r)]
    return "\n".join(head + body + pipeline_line(p) + verdict(p) + [f"  GPU figures: {gpu.source}"])
