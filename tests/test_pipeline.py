"""Pipeline parallelism (lingua/distributed/pipeline.py, lingua/models/stage.py) end to end: real torchrun processes on
CPU with gloo, the tiny model of conftest.py with 4 blocks, fp32 eager.

A pipelined run reads the same global batches as the 1-process run; its microbatches split the local batch, so its
mean loss is the 1-process loss (MoE: the 1-process run accumulates the same microbatches, its aux loss being per
microbatch). Every layout of one world size runs in one torchrun job (tests/pipeline_runs.py): process starts are the
cost here.
"""

import json
from pathlib import Path

import pytest
import torch

from apps.moe.model import MOE_SPEC
from lingua.args import load_config
from lingua.checkpoint.manager import CheckpointManager
from lingua.distributed.mesh import DistributedArgs, init_distributed
from lingua.distributed.pipeline import (
    layer_ranges,
    local_stage_ids,
    n_microbatches,
    stages_per_rank,
)
from lingua.errors import ConfigError
from lingua.models.stage import decoder_stage
from lingua.models.transformer.model import Transformer, TransformerArgs
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import build_model, train, train_args_cls
from lingua.train.optim import build_optimizer
from tests.conftest import cut_at, read_jsonl, tiny_overrides
from tests.dist_helpers import torchrun

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev")
LOSS_ATOL = 1e-5
CUT = 4  # checkpoints at steps 4 and 8; resumes start from 4
MOE = dict(model__n_experts=4, model__top_k=2, model__multiple_of=16, model__bias_update_rate=0.01)


def cfg(corpus, dump_dir, **extra) -> list[str]:
    return tiny_overrides(corpus, dump_dir, **{"model.n_layers": 4, "optim.warmup": 0, "eval.at_end": False, **extra})


def curve(dump_dir) -> dict:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_jsonl(Path(dump_dir) / "metrics.jsonl")}


def assert_close(ref: Path, got: Path, steps=range(1, 9)):
    a, b = curve(ref), curve(got)
    for s in steps:
        assert abs(a[s][0] - b[s][0]) <= LOSS_ATOL, f"{got.name} step {s}: loss {b[s][0]} vs 1 process {a[s][0]}"
        assert abs(a[s][1] - b[s][1]) <= LOSS_ATOL * a[s][1], f"{got.name} step {s}: grad norm {b[s][1]} vs {a[s][1]}"


def assert_identical(ref: Path, got: Path, steps=range(CUT + 1, 9)):
    a, b = curve(ref), curve(got)
    assert [a[s] for s in steps] == [b[s] for s in steps], f"{got.name}: the resumed run is not bit-identical"


def run_job(nproc: int, runs: list, path: Path) -> None:
    path.write_text(json.dumps(runs))
    torchrun(nproc, [str(path)], module="tests.pipeline_runs", timeout=900)


def run(spec, overrides) -> dict:
    return {"spec": spec.path, "overrides": overrides}


# ---------------------------------------------------------------- the split and bad input (no processes)


def test_layer_split_rule_and_stage_placement():
    assert layer_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert layer_ranges(5, 2) == [range(0, 3), range(3, 5)]  # uneven: the first stages take one block more
    assert layer_ranges(7, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    assert local_stage_ids(1, 2, 2, "interleaved_1f1b") == [1, 3]  # looped
    assert local_stage_ids(0, 2, 2, "zbv") == [0, 3] and local_stage_ids(1, 2, 2, "dualpipev") == [1, 2]  # V
    assert stages_per_rank(DistributedArgs(pp_size=2, pp_schedule="interleaved_1f1b")) == 2


@pytest.mark.parametrize("call, message", [
    (lambda: layer_ranges(3, 4), "model.n_layers=3 is below distributed.pp_size x pp_stages_per_rank = 4"),
    (lambda: n_microbatches(DistributedArgs(pp_size=2, pp_microbatches=3), 4, 1),
     "distributed.pp_microbatches=3 does not divide data.batch_size=4"),
    (lambda: n_microbatches(DistributedArgs(pp_size=2), 4, 2), "grad_acc_steps=2 with distributed.pp_size=2"),
    (lambda: stages_per_rank(DistributedArgs(pp_size=2, pp_schedule="1f1b", pp_stages_per_rank=2)),
     "distributed.pp_schedule=1f1b runs 1 stage(s) per rank, got distributed.pp_stages_per_rank=2"),
    (lambda: stages_per_rank(DistributedArgs(pp_size=2, pp_schedule="zbv", pp_stages_per_rank=3)),
     "distributed.pp_schedule=zbv runs 2 stage(s) per rank"),
])
def test_bad_pipeline_input_is_one_line(call, message):
    with pytest.raises(ConfigError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_stages_keep_the_whole_models_parameter_names():
    with torch.device("meta"):
        model = Transformer(TransformerArgs(dim=32, n_layers=5, n_heads=4, vocab_size=64))
    stages = [decoder_stage(model, r) for r in layer_ranges(5, 3)]
    names = [set(dict(s.named_parameters())) for s in stages]
    assert set().union(*names) == set(dict(model.named_parameters()))
    assert sum(map(len, names)) == len(dict(model.named_parameters()))  # no parameter on two stages
    assert "tok_embeddings.weight" in names[0] and "output.weight" in names[2] and "layers.4.ffn_norm.weight" in names[2]
    assert stages[1].layers[1] is model.layers[3] and len(stages[1].layers) == 2  # by position, named by index


# ---------------------------------------------------------------- 2 processes: every schedule, MoE, resumes


@pytest.fixture(scope="module")
def two_process_runs(tiny_corpus, tmp_path_factory):
    """One torchrun job of 2 processes (pp=2) after the 1-process references it resumes from."""
    root = tmp_path_factory.mktemp("pp2")
    train(load_config(train_args_cls(TRANSFORMER_SPEC), cfg(tiny_corpus, root / "ref")), TRANSFORMER_SPEC)
    moe_args = load_config(train_args_cls(MOE_SPEC), cfg(tiny_corpus, root / "moe_ref", data__batch_size=2,
                                                         grad_acc_steps=2, **MOE))
    train(moe_args, MOE_SPEC)
    runs = [run(TRANSFORMER_SPEC, cfg(tiny_corpus, root / s, distributed__pp_size=2, distributed__pp_schedule=s))
            for s in SCHEDULES]
    runs += [run(MOE_SPEC, cfg(tiny_corpus, root / "moe", distributed__pp_size=2, **MOE))]
    for name, src in (("1f1b", "1f1b"), ("zbv", "zbv"), ("moe", "moe"), ("1to2", "ref")):
        runs.append({"cut": [str(root / src), str(root / f"{name}_resumed"), CUT]})
        spec, extra = (MOE_SPEC, MOE) if name == "moe" else (TRANSFORMER_SPEC, {})
        sched = "zbv" if name == "zbv" else "1f1b"
        runs.append(run(spec, cfg(tiny_corpus, root / f"{name}_resumed", distributed__pp_size=2,
                                  distributed__pp_schedule=sched, **extra)))
    run_job(2, runs, root / "runs.json")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_schedule_matches_one_process(two_process_runs, schedule):
    assert_close(two_process_runs / "ref", two_process_runs / schedule)


@pytest.mark.slow
def test_pp2_resumes_bit_identically_and_across_pipeline_sizes(two_process_runs, tiny_corpus, tmp_path):
    root = two_process_runs
    for name in ("1f1b", "zbv", "moe"):  # same layout: the resumed steps equal the uninterrupted run's, bit for bit
        assert_identical(root / name, root / f"{name}_resumed")
    assert_close(root / "ref", root / "1to2_resumed")  # 1 process -> pp=2
    # pp=2 -> 1 process: the loaded model and optimizer are the checkpoint's, bit for bit; the curve continues
    back = cut_at(root / "1f1b", tmp_path / "2to1", CUT)
    ckpt = back / "checkpoints" / f"{CUT:010d}"
    args = load_config(train_args_cls(TRANSFORMER_SPEC), cfg(tiny_corpus, back))
    model = build_model(args, TRANSFORMER_SPEC, init_distributed(DistributedArgs(device="cpu"), environ={}),
                        torch.float32)
    optimizer, _ = build_optimizer(model, args.optim, args.steps)
    CheckpointManager(args.checkpoint, str(back)).load(ckpt, model, optimizer)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt), str(tmp_path / "full.pt"))
    saved = torch.load(tmp_path / "full.pt", weights_only=False)
    assert saved["model"].keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(saved["model"][k], v), k
    for p, name in zip(model.parameters(), dict(model.named_parameters())):
        assert torch.equal(saved["optim"]["state"][name]["exp_avg"], optimizer.state[p]["exp_avg"]), name
    train(args, TRANSFORMER_SPEC)
    assert_close(root / "ref", back)


@pytest.mark.slow
def test_moe_pp2_matches_one_process_with_the_same_microbatches(two_process_runs):
    assert_close(two_process_runs / "moe_ref", two_process_runs / "moe")


# ---------------------------------------------------------------- 4 processes: pp x FSDP, pp x TP


@pytest.mark.slow
def test_pp2_with_fsdp_and_with_tp_match_one_process_and_resume(tiny_corpus, tmp_path):
    train(load_config(train_args_cls(TRANSFORMER_SPEC), cfg(tiny_corpus, tmp_path / "ref")), TRANSFORMER_SPEC)
    layouts = {"fsdp": dict(distributed__dp_shard=2, data__batch_size=2, distributed__pp_microbatches=2),
               "tp": dict(distributed__tp_size=2)}
    runs = []
    for name, extra in layouts.items():
        runs.append(run(TRANSFORMER_SPEC, cfg(tiny_corpus, tmp_path / name, distributed__pp_size=2, **extra)))
        runs.append({"cut": [str(tmp_path / name), str(tmp_path / f"{name}_resumed"), CUT]})
        runs.append(run(TRANSFORMER_SPEC, cfg(tiny_corpus, tmp_path / f"{name}_resumed", distributed__pp_size=2,
                                              **extra)))
    run_job(4, runs, tmp_path / "runs.json")
    for name in layouts:
        assert_close(tmp_path / "ref", tmp_path / name)
        assert_identical(tmp_path / name, tmp_path / f"{name}_resumed")
