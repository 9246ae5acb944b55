"""lingua.plan: the plan of a small config against the same step measured for real (1 process here, 2 gloo processes
under torchrun), the FLOPs against the analytic count, the verdict's re-planned changes, and bad input."""

import json
from types import SimpleNamespace

import pytest
import torch

from lingua.args import load_config
from lingua.distributed.pipeline import n_microbatches, stages_per_rank
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.plan import format_plan, plan
from lingua.plan import gpus as gpus_module
from lingua.plan.__main__ import main as plan_main
from lingua.plan.extrapolate import measure_step
from lingua.plan.gpus import GPU
from lingua.plan.simulate import simulate_step
from lingua.plan.suggest import candidates, suggestions
from lingua.train.loop import TrainArgs
from tests.dist_helpers import torchrun

SMALL = ["config=apps/main/configs/debug.yaml", "model.n_layers=2", "data.batch_size=2", "data.seq_len=128"]
# The plan's tracker counts tensor storages; the real side counts every CPU allocator call, which adds what no
# tensor of the step owns (autocast's weight-cast cache, dispatcher scratch, 64-byte alignment). Measured 3-4% on
# the debug model (README "Planning a run"); 10% leaves room for allocator differences between torch builds.
MEMORY_TOLERANCE = 0.10


def small_args(*extra):
    return load_config(TrainArgs, SMALL + list(extra))


def matmul_params(model_args) -> int:
    """Weights that take part in a matmul: every Linear's (a tied output projection is the embedding table)."""
    with torch.device("meta"):
        model = TRANSFORMER_SPEC.build(model_args)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def real_step_one_process(args) -> dict:
    from lingua.distributed.mesh import DistEnv, DistState
    from lingua.plan.measure import measure_step
    from lingua.plan.simulate import make_trainer, sim_args
    from lingua.train.loop import build_model

    args = sim_args(args)
    state = DistState(DistEnv("single"), torch.device("cpu"), None, 0, 1, 1)
    model = build_model(args, TRANSFORMER_SPEC, state, torch.bfloat16)
    model.train()
    return measure_step(make_trainer(args, TRANSFORMER_SPEC, model, state, torch.bfloat16), model)


@pytest.mark.slow
def test_plan_matches_a_real_step_on_one_process():
    args = small_args()
    planned, real = simulate_step(args, TRANSFORMER_SPEC, 1), real_step_one_process(args)
    assert abs(planned.peak_bytes - real["peak_bytes"]) <= MEMORY_TOLERANCE * real["peak_bytes"]
    tokens = 2 * 128
    assert planned.matmul_flops == real["matmul_flops"] == 6 * matmul_params(args.model) * tokens
    n = sum(p.numel() for p in TRANSFORMER_SPEC.build(args.model).parameters())
    assert planned.memory["optimizer"] == pytest.approx(2 * 4 * n, rel=0.01)  # AdamW's two fp32 moments
    assert not planned.comm.bytes and not real["calls"]


@pytest.mark.slow
def test_plan_matches_two_gloo_processes():
    out = torchrun(2, SMALL, module="lingua.plan.measure", timeout=300)
    real = next(r for r in map(json.loads, (line for line in out.stdout.splitlines() if line.startswith("{")))
                if r["rank"] == 0)
    planned = simulate_step(small_args(), TRANSFORMER_SPEC, 2)
    assert abs(planned.peak_bytes - real["peak_bytes"]) <= MEMORY_TOLERANCE * real["peak_bytes"]
    assert planned.matmul_flops == real["matmul_flops"]
    assert planned.comm.by_kind() == real["comm"]  # bytes per kind, exactly
    assert dict(planned.comm.calls) == real["calls"]
    # FSDP: every bf16 parameter gathered (forward, and backward but for the last block), fp32 gradients scattered
    n = sum(p.numel() for p in TRANSFORMER_SPEC.build(small_args().model).parameters())
    assert real["comm"]["reduce_scatter"] == pytest.approx(4 * n, rel=0.01)


def test_extrapolated_from_4_and_6_blocks_is_the_direct_simulation_of_8():
    """Full AC on 4 FSDP ranks: with depth the peak moves from the loss into the backward (block 1's: every later
    block's gradient held, block 0's parameters prefetched), which only a per-phase extrapolation follows. Measured
    equal to the byte (this config, and no AC, selective AC, TP 2, 1 process, gradient accumulation, the 7B)."""
    args = small_args("model.n_layers=8", "distributed.ac=full")
    direct = simulate_step(args, TRANSFORMER_SPEC, 4)
    extra = measure_step(args, TRANSFORMER_SPEC, 4, extrapolate=True)
    assert extra.extrapolated_from == (4, 6) and direct.extrapolated_from is None
    assert max(direct.phases, key=lambda phase: direct.phases[phase][1])[1:] == ("backward", "block 1")
    assert extra.peak_bytes == direct.peak_bytes and extra.memory == direct.memory
    assert extra.matmul_flops == direct.matmul_flops
    assert dict(extra.comm.bytes) == dict(direct.comm.bytes) and dict(extra.comm.calls) == dict(direct.comm.calls)


def test_tp_plan_counts_only_what_the_rank_holds():
    """The TP 2 step's peak equals, category by category, FSDPMemTracker's reading of the same step on 2 real gloo
    processes: 37,392,228 bytes with this config in torch 2.13 (lingua.plan.measure's allocator reads 0-5% more, as
    under FSDP). It read 13-16% more when DTensor's shape propagation ran in the plan's fake mode, whose global-shaped
    (tokens, vocab) fp32 tensors the tracker counted as the rank's (lingua.plan.tracker.sharding_propagation_apart)."""
    args = small_args("distributed.tp_size=2", "model.qk_norm=false", "model.weight_tying=false")
    assert simulate_step(args, TRANSFORMER_SPEC, 2).peak_bytes == 37_392_228


def add_gpu(monkeypatch, usable_gib: float) -> str:
    """An H100 with `usable_gib` of usable memory, as gpu=tiny."""
    h100 = gpus_module.GPUS["h100"]
    gpu = GPU("tiny", h100.bf16_flops, h100.fp8_flops, usable_gib / 0.9, h100.hbm_bw, h100.intra_bw, h100.inter_bw,
              8, "test")
    monkeypatch.setitem(gpus_module.GPUS, "tiny", gpu)
    return "tiny"


@pytest.mark.slow
def test_does_not_fit_then_replans_smaller_changes(monkeypatch):
    args = small_args("data.batch_size=8", "model.qk_norm=false", "model.weight_tying=false")
    roomy = plan(args, TRANSFORMER_SPEC, 4, "h100")
    assert roomy.fits and not roomy.suggestions
    p = plan(args, TRANSFORMER_SPEC, 4, add_gpu(monkeypatch, 0.8 * roomy.peak_gib))
    assert not p.fits
    changes = {tuple(sorted(f"{k}={v}" for k, v in c.items())): q.roles[0].measure for c, q in p.suggestions}
    base = p.roles[0].measure
    sac, full = changes[("distributed.ac=selective",)], changes[("distributed.ac=full",)]
    tp = changes[("distributed.tp_size=2",)]
    half = changes[("data.batch_size=4", "grad_acc_steps=2")]
    assert full.peak_bytes < sac.peak_bytes < base.peak_bytes and half.peak_bytes < base.peak_bytes
    # pipeline parallelism is the last candidate (2 stages under 1F1B, the same global batch in 4 x pp
    # microbatches), planned only when no cheaper change fits: here full AC does
    assert candidates(args, 4)[-1] == {"distributed.pp_size": 2, "distributed.pp_schedule": "1f1b",
                                       "data.batch_size": 16, "grad_acc_steps": 1, "distributed.pp_microbatches": 8}
    assert full.peak_bytes <= 0.8 * roomy.peak_gib * 2**30 and any(q.fits for _, q in p.suggestions)
    assert not any("distributed.pp_size" in c for c, _ in p.suggestions)
    # full AC recomputes the blocks' forward: a third more of their matmul FLOPs (the output projection is not redone)
    assert base.matmul_flops < full.matmul_flops < 4 / 3 * base.matmul_flops == 4 / 3 * sac.matmul_flops
    # TP halves every matmul of this rank and the block weights it gathers; its collectives sit on the critical path
    assert tp.matmul_flops == base.matmul_flops / 2
    end = (0, "forward", "after blocks")  # the same phase in both (TP's peak is in the loss's backward, FSDP's here)
    assert tp.phases[end][0]["unsharded params"] == pytest.approx(base.phases[end][0]["unsharded params"] / 2, rel=0.01)
    tp_time = next(q for c, q in p.suggestions if "distributed.tp_size" in c).roles[0].time
    assert tp_time.exposed_comm_s > 0 == p.roles[0].time.exposed_comm_s
    text = format_plan(p)
    assert "does NOT fit" in text and "distributed.ac=full" in text


@pytest.mark.parametrize("extra, message", [
    (["gpu=tpu"], "gpu='tpu' is not one of h100"),
    (["world_size=6", "distributed.tp_size=4"], "world size 6 does not factor"),
    (["world_size=2", "model.n_heads=3"], "model.n_heads=3 does not divide model.dim=256"),
    (["world_size=2", "spec=nope"], "spec='nope' is not a registered model"),
    (["world_size=4", "distributed.pp_size=2", "distributed.cp_size=2", "model.weight_tying=false"],
     "distributed.cp_size > 1 cannot be combined with distributed.pp_size > 1"),
    (["world_size=2", "distributed.pp_size=2"], "model.weight_tying=true cannot be combined"),
    (["world_size=4", "distributed.pp_size=4", "model.weight_tying=false"], "model.n_layers=2 is below"),
    (["world_size=2", "distributed.pp_size=2", "model.weight_tying=false", "distributed.pp_microbatches=3"],
     "distributed.pp_microbatches=3 does not divide data.batch_size=2"),
    (["world_size=2", "distributed.pp_size=2", "model.weight_tying=false", "distributed.pp_schedule=zbv",
      "model.n_layers=4"], "distributed.pp_schedule=zbv is not planned yet"),
    (["extrapolate=maybe"], "extrapolate='maybe' is not one of auto, true, false"),
    (["extrapolate=true"], "extrapolate=true needs model.n_layers > 6 (got 2)"),
])
def test_bad_input_is_one_line(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        plan_main(SMALL + extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and message in err


@pytest.mark.slow
def test_stool_plans_a_gpu_job_writes_it_and_refuses_one_that_does_not_fit(tmp_path, monkeypatch, capsys):
    from lingua.tools import stool

    job = SMALL + ["nodes=1", "ngpu=2", "dry_run=true"]
    assert stool.main(job + [f"dump_dir={tmp_path / 'fits'}"]) == 0
    text = (tmp_path / "fits" / "plan.txt").read_text()
    # the plan of this config on 1 node x 2 GPUs, as `python -m lingua.plan` computes it (fake tensors: no timing)
    want = format_plan(plan(small_args(), TRANSFORMER_SPEC, 2, "h100", suggest=False), "apps/main/configs/debug.yaml")
    assert text == want + "\n" and "on 2 x H100" in text and "verdict: fits" in text
    capsys.readouterr()
    assert stool.main(job + [f"dump_dir={tmp_path / 'big'}", f"gpu={add_gpu(monkeypatch, 0.01)}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err and "plan=false" in err
    assert not (tmp_path / "big").exists()
    assert stool.main(job + [f"dump_dir={tmp_path / 'big'}", "gpu=tiny", "plan=false"]) == 0
    assert not (tmp_path / "big" / "plan.txt").exists()


# ---------------------------------------------------------------- pipeline and context parallelism

UNTIED = ("model.weight_tying=false",)  # pipeline stages cannot share the embedding with the output projection


def hidden_bytes(args, microbatches: int, dtype_bytes: int) -> int:
    """One microbatch's hidden state between two stages: (batch / microbatches, seq, dim)."""
    return args.data.batch_size // microbatches * args.data.seq_len * args.model.dim * dtype_bytes


@pytest.mark.slow
@pytest.mark.parametrize("world, extra, sends", [
    (2, ["distributed.pp_size=2"], [1, 1]),  # no data parallelism: the hidden state stays fp32 (fp32 params)
    (4, ["distributed.pp_size=2", "distributed.dp_shard=2"], [1, 1]),  # FSDP's bf16 params: bf16
    (4, ["distributed.pp_size=4", "model.n_layers=4", "data.batch_size=4"], [1, 2, 1]),  # a middle rank
    # TP: sequence-parallel hidden states; two TP simulations in one process (DTensor's caches emptied between them)
    (4, ["distributed.pp_size=2", "distributed.tp_size=2", "model.qk_norm=false"], [1, 1]),
])
def test_pipeline_stages_add_up_to_the_whole_model(world, extra, sends):
    args = small_args(*UNTIED, *extra)
    p = plan(args, TRANSFORMER_SPEC, world, "h100", suggest=False)
    pp, tp = args.distributed.pp_size, args.distributed.tp_size
    dp = world // (pp * tp)
    assert [r.role.split(" (")[0] for r in p.roles] == [f"pp stage {i}" for i in ((0, 1) if pp == 2 else (0, 1, 3))]
    assert [r.rank for r in p.roles] == [i * dp * tp for i in ((0, 1) if pp == 2 else (0, 1, 3))]
    # every stage once: its parameters (FSDP shards x dp) and matmuls add up to the whole model's, exactly
    stages = p.roles if pp == 2 else p.roles + [p.roles[1]]  # stages 1 and 2 are alike (one block each)
    with torch.device("meta"):
        whole = sum(w.numel() for w in TRANSFORMER_SPEC.build(args.model).parameters())
    assert sum(r.measure.params for r in stages) * dp == whole or tp > 1  # TP replicates the norms' weights
    tokens = args.data.batch_size * args.data.seq_len  # the 1-process step's count (test_plan_matches_a_real_step...)
    assert sum(r.measure.matmul_flops for r in stages) * tp == 6 * matmul_params(args.model) * tokens
    # each microbatch's hidden state sent forward and its gradient back, per neighbour, exactly
    m, v = n_microbatches(args.distributed, args.data.batch_size, 1), stages_per_rank(args.distributed)
    act = hidden_bytes(args, m, 4 if dp == 1 else 2) // tp
    assert [r.measure.comm.by_kind()["send_recv"] for r in p.roles] == [2 * m * act * n for n in sends]
    bubble = 1 - m / (m + (pp - 1) / v)  # compute x (m + (p - 1) / v) / m
    assert all(r.time.bubble == pytest.approx(bubble) for r in p.roles)
    assert f"pipeline bubble: {100 * bubble:.1f}%" in format_plan(p)


@pytest.mark.slow
def test_gpipe_keeps_every_microbatch_in_flight_1f1b_only_pp():
    from lingua.plan.pipeline import pipeline_stages

    def stage0_activations(schedule):
        args = small_args(*UNTIED, "distributed.pp_size=2", f"distributed.pp_schedule={schedule}",
                          "data.batch_size=8", "distributed.pp_microbatches=8")
        return simulate_step(args, TRANSFORMER_SPEC, 2, 0, build=pipeline_stages).memory["activations"]

    gpipe, one_f_one_b = stage0_activations("gpipe"), stage0_activations("1f1b")
    # GPipe runs all 8 forwards before any backward; 1F1B at most pp = 2 on stage 0. Measured 4.29 (the peak is
    # not at the same instant of the last microbatch in both): m / p within 10%.
    assert gpipe / one_f_one_b == pytest.approx(8 / 2, rel=0.10)


@pytest.mark.slow
def test_interleaved_stages_of_one_rank_are_tracked_apart():
    """Rank 0 runs stages 0 and 2 of 4: the tracker forgets a stage's modules before its next microbatch, never the
    other stage's, whose backward is still to come."""
    from lingua.plan.pipeline import pipeline_stages

    args = small_args(*UNTIED, "distributed.pp_size=2", "distributed.pp_schedule=interleaved_1f1b", "model.n_layers=4",
                      "data.batch_size=4", "data.seq_len=64")
    measure = simulate_step(args, TRANSFORMER_SPEC, 2, 0, build=pipeline_stages)
    # 4 microbatches; stage 0 talks to stage 1, stage 2 to stages 1 and 3: forward and backward, fp32
    assert measure.comm.by_kind()["send_recv"] == 2 * 4 * hidden_bytes(args, 4, 4) * 3
    assert measure.matmul_flops == 6 * (matmul_params(args.model) - args.model.vocab_size * args.model.dim) // 2 * 256


def test_pipeline_factor():
    from lingua.plan.estimate import pipeline_factor

    assert pipeline_factor("1f1b", 8, 1, 1) == 1.0
    assert pipeline_factor("gpipe", 8, 4, 1) == pipeline_factor("1f1b", 8, 4, 1) == 11 / 8
    assert pipeline_factor("interleaved_1f1b", 8, 4, 2) == (8 + 3 / 2) / 8
    assert pipeline_factor("zbv", 8, 4, 2) == pipeline_factor("dualpipev", 8, 4, 2) == (8 + 1) / 8


@pytest.mark.slow
def test_context_parallel_plan_splits_the_step_over_cp():
    args = small_args()  # block_causal: the ring runs every block with its mask on fake tensors
    one, cp = plan(args, TRANSFORMER_SPEC, 1, suggest=False), plan(small_args("distributed.cp_size=2"),
                                                                   TRANSFORMER_SPEC, 2, suggest=False)
    # the linears see half the tokens; the zigzag chunks give each rank half the causal triangle (split = tp x cp)
    assert cp.roles[0].measure.matmul_flops == one.roles[0].measure.matmul_flops / 2
    assert cp.roles[0].time.executed_flops == pytest.approx(one.roles[0].time.executed_flops / 2, rel=1e-12)
    # per layer: K/V (bf16) passed on once forward, once backward, their fp32 gradients twice; sent and received
    m = args.model
    kv = 2 * args.data.batch_size * m.n_kv_heads * args.data.seq_len // 2 * (m.dim // m.n_heads)
    assert cp.roles[0].measure.comm.by_kind()["send_recv"] == m.n_layers * 2 * (kv * 2 + kv * 2 + 2 * kv * 4)


@pytest.mark.parametrize("fitting, planned", [
    ("distributed.ac", ["distributed.ac"] * 2 + ["distributed.tp_size", "data.batch_size"]),
    ("distributed.pp_size", ["distributed.ac"] * 2 + ["distributed.tp_size", "data.batch_size", "distributed.pp_size"]),
])
def test_pipeline_changes_are_planned_only_when_no_cheaper_one_fits(fitting, planned):
    """suggestions() re-plans the cheap changes first and the pipeline ones (slow to simulate) only when none fits."""
    args = small_args("data.batch_size=8", "model.qk_norm=false", "model.weight_tying=false")
    seen = []

    def replan(base, spec, change):
        seen.append(next(iter(change)))
        return SimpleNamespace(fits=fitting in change)

    out = suggestions(SimpleNamespace(args=args, world_size=4), TRANSFORMER_SPEC, replan)
    assert seen == planned and [next(iter(c)) for c, _ in out] == planned


def test_collectives_are_counted_at_their_full_buffer_with_their_group():
    """The plan's counter (the same one lingua.plan.measure uses on the real step): one call per collective, sized as
    lingua/plan/comm.py defines it, on a 4-rank fake world (nothing is sent)."""
    import torch.distributed as dist

    from lingua.plan.comm import CommCounter
    from lingua.plan.simulate import fake_world

    with fake_world(4, 0):
        with CommCounter() as c:
            dist.all_gather_single(torch.empty(4 * 10), torch.ones(10))  # the gathered output: 160 bytes
            dist.reduce_scatter_single(torch.empty(10), torch.ones(4 * 10))  # the unreduced input: 160 bytes
            dist.all_reduce(torch.ones(6, dtype=torch.bfloat16))  # the tensor: 12 bytes
        pair = dist.new_group([0, 1])
        with CommCounter() as p:
            dist.all_reduce(torch.ones(3), group=pair)
    assert c.counts.by_kind() == {"all_gather": 160, "reduce_scatter": 160, "all_reduce": 12, "all_to_all": 0,
                                  "send_recv": 0}
    assert dict(c.counts.calls) == {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 1}
    assert dict(p.counts.bytes) == {("all_reduce", (0, 1)): 12}  # the group's global ranks, for the link


def test_collective_seconds_are_bytes_times_the_ring_factor_over_the_link():
    from lingua.plan.comm import CommCounts
    from lingua.plan.estimate import comm_seconds, split_comm

    gpu, nbytes = gpus_module.GPUS["h100"], 8e9
    node, across = (0, 1, 2, 3), (0, gpu.per_node)  # 4 ranks of one node; 2 ranks on two nodes
    # README "Planning a run": bytes x (n-1)/n per rank (all-reduce twice that, send/recv the bytes) over NVLink
    # inside a node, else the inter-node link; the same products in another order, so 1e-12
    want = {("all_gather", node): nbytes * 3 / 4 / gpu.intra_bw,
            ("reduce_scatter", node): nbytes * 3 / 4 / gpu.intra_bw,
            ("all_reduce", node): nbytes * 2 * 3 / 4 / gpu.intra_bw,
            ("send_recv", (0, 1)): nbytes / gpu.intra_bw,
            ("all_gather", across): nbytes / 2 / gpu.inter_bw,
            ("all_reduce", (5,)): 0.0}
    for (kind, ranks), seconds in want.items():
        assert comm_seconds(kind, ranks, nbytes, gpu) == pytest.approx(seconds, rel=1e-12), (kind, ranks)
    # data-parallel collectives overlap with compute; the TP group's, all-to-all and send/recv are exposed
    counts = CommCounts()
    for key in (("all_gather", node), ("all_reduce", (0, 1)), ("all_to_all", node), ("send_recv", (0, 1))):
        counts.bytes[key] = nbytes
    dp, exposed = split_comm(counts, (0, 1), gpu)
    ring4, ar2, p2p = nbytes * 3 / 4 / gpu.intra_bw, nbytes * 2 * 1 / 2 / gpu.intra_bw, nbytes / gpu.intra_bw
    assert dp == pytest.approx(ring4, rel=1e-12)  # the all-gather
    assert exposed == pytest.approx(ar2 + ring4 + p2p, rel=1e-12)  # TP all-reduce, all-to-all, send/recv
