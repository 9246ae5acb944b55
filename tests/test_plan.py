"""lingua.plan: the plan of a small config against the same step measured for real (1 process here, 2 gloo processes
under torchrun), the FLOPs against the analytic count, the verdict's re-planned changes, and bad input."""

import json

import pytest
import torch

from lingua.args import load_config
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.plan import format_plan, plan
from lingua.plan import gpus as gpus_module
from lingua.plan.__main__ import main as plan_main
from lingua.plan.gpus import GPU
from lingua.plan.simulate import simulate_step
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
    real = json.loads(out.stdout.strip().splitlines()[-1])
    planned = simulate_step(small_args(), TRANSFORMER_SPEC, 2)
    assert abs(planned.peak_bytes - real["peak_bytes"]) <= MEMORY_TOLERANCE * real["peak_bytes"]
    assert planned.matmul_flops == real["matmul_flops"]
    assert planned.comm.by_kind() == real["comm"]  # bytes per kind, exactly
    assert dict(planned.comm.calls) == real["calls"]
    # FSDP: every bf16 parameter gathered (forward, and backward but for the last block), fp32 gradients scattered
    n = sum(p.numel() for p in TRANSFORMER_SPEC.build(small_args().model).parameters())
    assert real["comm"]["reduce_scatter"] == pytest.approx(4 * n, rel=0.01)


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
    assert any(q.fits for _, q in p.suggestions)
    # full AC recomputes the blocks' forward: a third more of their matmul FLOPs (the output projection is not redone)
    assert base.matmul_flops < full.matmul_flops < 4 / 3 * base.matmul_flops == 4 / 3 * sac.matmul_flops
    # TP halves every matmul of this rank and the block weights it gathers; its collectives sit on the critical path
    assert tp.matmul_flops == base.matmul_flops / 2
    assert tp.memory["unsharded params"] == pytest.approx(base.memory["unsharded params"] / 2, rel=0.01)
    tp_time = next(q for c, q in p.suggestions if "distributed.tp_size" in c).roles[0].time
    assert tp_time.exposed_comm_s > 0 == p.roles[0].time.exposed_comm_s
    text = format_plan(p)
    assert "does NOT fit" in text and "distributed.ac=full" in text


@pytest.mark.parametrize("extra, message", [
    (["gpu=tpu"], "gpu='tpu' is not one of h100"),
    (["world_size=6", "distributed.tp_size=4"], "world size 6 does not factor"),
    (["world_size=2", "model.n_heads=3"], "model.n_heads=3 does not divide model.dim=256"),
    (["world_size=2", "spec=nope"], "spec='nope' is not a registered model"),
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
    assert "on 2 x H100" in text and "verdict: fits" in text
    capsys.readouterr()
    assert stool.main(job + [f"dump_dir={tmp_path / 'big'}", f"gpu={add_gpu(monkeypatch, 0.01)}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err and "plan=false" in err
    assert not (tmp_path / "big").exists()
    assert stool.main(job + [f"dump_dir={tmp_path / 'big'}", "gpu=tiny", "plan=false"]) == 0
    assert not (tmp_path / "big" / "plan.txt").exists()
