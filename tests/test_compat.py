"""Checkpoints written before the decoder/ModelSpec redesign (tests/fixtures/v0_checkpoints) still load, compute the
same logits, evaluate, generate and resume training."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from apps.main.eval import EvalAppArgs
from apps.main.eval import main as eval_main
from apps.main.generate import cli as generate_cli
from apps.mtp.model import MTP_SPEC, MTPTransformer
from lingua.args import load_config
from lingua.data.loader import StateMismatch
from lingua.eval.load import inspect_checkpoint, load_model
from lingua.models.transformer.model import Transformer
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import train, train_args_cls
from tests.conftest import read_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "v0_checkpoints"


@pytest.mark.parametrize("name, spec, cls", [("transformer", TRANSFORMER_SPEC, Transformer),
                                             ("mtp", MTP_SPEC, MTPTransformer)])
def test_old_checkpoints_find_their_spec_and_give_the_same_logits(name, spec, cls):
    ckpt = inspect_checkpoint(FIXTURES / name)
    assert ckpt.spec is spec and "model_spec" not in ckpt.params and "seed" in ckpt.params["model"]
    model, _, _ = load_model(FIXTURES / name)
    assert type(model) is cls
    ref = torch.load(FIXTURES / "reference_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(ref["tokens"], tok_idx=ref["tok_idx"])
    # fp32 rounding only: one q|k|v matmul (lingua.models.layers.linear_group) sums in another order than three did
    torch.testing.assert_close(logits, ref[name], rtol=0, atol=1e-5)


def test_old_checkpoints_evaluate_and_generate_through_the_main_apps(tmp_path, capsys):
    results = eval_main(load_config(EvalAppArgs, [f"ckpt_dir={FIXTURES / 'mtp'}", f"dump_dir={tmp_path}",
                                                  f"validation.root_dir={FIXTURES / 'corpus'}"]))
    assert 4 < results["validation"]["alpha"]["bpb"] < 10  # 2 steps of training: near a uniform 8 bits per byte
    completions, _ = generate_cli([f"ckpt_dir={FIXTURES / 'transformer'}", "prompt=the", "max_gen_len=4"])
    assert len(completions) == 1


def test_an_old_run_resumes_with_its_old_config(tmp_path):
    """config.yaml of an old run names model.seed and optim.annealing_step: accepted with a warning, and training
    continues from its step-2 checkpoint."""
    run = tmp_path / "transformer"
    shutil.copytree(FIXTURES / "transformer", run)
    args = load_config(train_args_cls(TRANSFORMER_SPEC), [f"config={run / 'config.yaml'}", f"dump_dir={run}",
                                                           f"data.root_dir={FIXTURES / 'corpus'}", "steps=4",
                                                           "logging.freq=1"])
    # its loader state (one data order per rank) predates the world-size-invariant streams: refused in one line ...
    with pytest.raises(StateMismatch, match="data.reset_state=true"):
        train(args, TRANSFORMER_SPEC)
    # ... and resumed, weights and optimizer included, once the user accepts a fresh data order
    args = load_config(train_args_cls(TRANSFORMER_SPEC), [f"config={run / 'config.yaml'}", f"dump_dir={run}",
                                                           f"data.root_dir={FIXTURES / 'corpus'}", "steps=4",
                                                           "logging.freq=1", "data.reset_state=true"])
    result = train(args, TRANSFORMER_SPEC)
    assert result["step"] == 4
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4]  # it did not start again from step 1


# ---------------------------------------------------------------- checkpoints of the flat layout (before the move)

V1 = Path(__file__).parent / "fixtures" / "v1_checkpoints"
V1_MODELS = ("transformer", "mtp", "fastRNN", "mamba", "moe")


@pytest.mark.parametrize("model", V1_MODELS)
def test_checkpoints_from_before_the_package_move_find_their_spec_and_give_the_same_logits(model):
    ckpt = inspect_checkpoint(V1 / model / "checkpoints" / "0000000002")
    assert ckpt.params["model_spec"] in ("lingua.spec:TRANSFORMER_SPEC", f"apps.{model}.model:{model.upper()}_SPEC")
    assert ckpt.spec.name == {"transformer": "transformer", "fastRNN": "fastrnn"}.get(model, model.lower())
    loaded, _, _ = load_model(V1 / model / "checkpoints" / "0000000002")
    ref = torch.load(V1 / "reference_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = loaded(ref["tokens"])
    # the same code path in fp32: equal here; 1e-5 leaves room for another CPU's matmul blocking (tests/golden)
    torch.testing.assert_close(logits, ref[model], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", V1_MODELS)
def test_runs_from_before_the_package_move_resume_with_the_same_losses(model, tmp_path):
    from tests.conftest import write_corpus
    from tests.golden.record import TOLERANCE

    run = tmp_path / model
    shutil.copytree(V1 / model, run)
    ckpt = inspect_checkpoint(run / "checkpoints" / "0000000002")
    corpus = write_corpus(tmp_path / "corpus")
    args = load_config(train_args_cls(ckpt.spec), [f"config={run / 'config.yaml'}", f"dump_dir={run}",
                                                   f"data.root_dir={corpus}"])
    assert train(args, ckpt.spec)["step"] == 4
    expected = {int(k): v for k, v in json.loads((run / "expected_losses.json").read_text()).items()}
    got = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl")}
    assert sorted(got) == [3, 4]  # resumed at step 3, not started again
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=TOLERANCE), step
