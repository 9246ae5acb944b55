"""lingua/kernels/attention/select.py: the kernel chosen once per placement, from a measured table on CPU, the
override winning; old configs and checkpoints with model.cpu_attn_backward still load."""

import json
import logging

import pytest
import torch

from lingua.args import load_config
from lingua.errors import ConfigError
from lingua.kernels.attention import KERNELS, Placement, place_attention, select_kernel
from lingua.kernels.attention.measure import AttentionShape, cache_key, cache_path
from lingua.kernels.attention.select import resolve_backward
from lingua.models.spec import model_args_from_params, spec_for_params
from lingua.models.transformer.model import Transformer, TransformerArgs
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs

BF16_COMPILED = Placement("cpu", torch.bfloat16, compiled=True, machine="Test CPU 9000")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGUA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny(**kw) -> TransformerArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seqlen=16, mask="block_causal")
    return TransformerArgs(**{**base, **kw})


SHAPE = AttentionShape(2, 16, 4, 2, 8, "block_causal")  # tiny()'s attention at batch 2


def write_timings(aten_ms: float, matmul_ms: float) -> None:
    """A measured table, as measure.store writes it, for tiny()'s shape in compiled bf16."""
    cache_path().parent.mkdir(parents=True, exist_ok=True)
    key = cache_key("Test CPU 9000", SHAPE, torch.bfloat16, compiled=True)
    cache_path().write_text(json.dumps({key: {"aten": aten_ms, "matmul": matmul_ms, "batch": 2}}))


@pytest.mark.parametrize("impl, mask, device, backward, kernel", [
    ("auto", "block_causal", "cuda", "aten", "flex"),  # skips the masked blocks
    ("auto", "causal", "cuda", "aten", "sdpa"),  # is_causal: SDPA's flash path
    ("auto", "block_causal", "cpu", "aten", "sdpa"),  # flex has no CPU backward
    ("auto", "causal", "cpu", "matmul", "cpu_matmul_backward"),
    ("sdpa", "block_causal", "cuda", "aten", "sdpa"),  # asked for: the dense-mask SDPA
    ("flex_attention", "causal", "cuda", "aten", "flex"),
    ("xformers", "block_causal", "cuda", "aten", "xformers"),
])
def test_selection_is_a_function_of_config_and_device(impl, mask, device, backward, kernel):
    assert select_kernel(impl, mask, device, backward) == kernel
    assert KERNELS[kernel].name == kernel


def test_matmul_backward_elsewhere_than_cpu_sdpa_is_a_one_line_error():
    with pytest.raises(ConfigError, match="model.attn_backward=matmul .* model.attn_impl=flex_attention on cuda"):
        select_kernel("auto", "block_causal", "cuda", "matmul")


@pytest.mark.parametrize("aten_ms, matmul_ms, kernel", [(1.0, 5.0, "sdpa"), (5.0, 1.0, "cpu_matmul_backward")])
def test_auto_follows_the_measured_table_and_logs_it(aten_ms, matmul_ms, kernel, caplog):
    write_timings(aten_ms, matmul_ms)
    model = Transformer.build(tiny())
    with caplog.at_level(logging.INFO, logger="lingua"):
        line = place_attention(model, model.args, BF16_COMPILED, batch=2, seqlen=16)
    holders = [m for m in model.modules() if hasattr(m, "kernel")]
    assert len(holders) == 3 and {id(m.kernel) for m in holders} == {id(model.kernel)}  # one kernel, shared
    assert model.kernel.name == kernel and line in caplog.text
    best, other = ("aten", "matmul") if kernel == "sdpa" else ("matmul", "aten")
    assert f"{best} backward, 1.0 ms vs {other} 5.0 ms (cached" in line


def test_the_table_is_per_machine():
    write_timings(5.0, 1.0)
    other = Placement("cpu", torch.bfloat16, compiled=True, machine="Another CPU")
    assert resolve_backward("auto", "auto", "block_causal", other, SHAPE, run=False)[0] == "auto"  # not measured there
    assert resolve_backward("auto", "auto", "block_causal", BF16_COMPILED, SHAPE, run=False)[0] == "matmul"


@pytest.mark.parametrize("choice, kernel", [("aten", "sdpa"), ("matmul", "cpu_matmul_backward")])
def test_the_config_key_overrides_the_measurement(choice, kernel):
    write_timings(*((1.0, 5.0) if choice == "matmul" else (5.0, 1.0)))  # the table says the other one
    model = Transformer.build(tiny(attn_backward=choice))
    place_attention(model, model.args, BF16_COMPILED, batch=2, seqlen=16)
    assert model.kernel.name == kernel


@pytest.mark.parametrize("placement", [Placement("cpu", torch.float32, compiled=True),
                                       Placement("cpu", torch.bfloat16, compiled=False),
                                       Placement("cuda", torch.bfloat16, compiled=True)])
def test_nothing_is_timed_where_the_backwards_cannot_differ(placement, cache_dir):
    assert resolve_backward("auto", "auto", "causal", placement, SHAPE) == ("aten", "the kernel's own backward")
    assert not cache_dir.exists()


@pytest.mark.slow
def test_a_measurement_is_stored_then_reused(cache_dir):
    """A real timing of both backwards (compiled, bf16, tiny): stored under this machine's key, read back after."""
    backward, why = resolve_backward("auto", "sdpa", "block_causal", BF16_COMPILED, SHAPE)
    entry = json.loads(cache_path().read_text())[cache_key("Test CPU 9000", SHAPE, torch.bfloat16, compiled=True)]
    assert entry["batch"] == 2 and entry["aten"] > 0 and entry["matmul"] > 0
    assert backward == min(("aten", "matmul"), key=entry.get) and "(measured at batch 2 x seq 16" in why
    write_timings(9.0, 3.0)  # the next placement reads the file, it does not time again
    assert resolve_backward("auto", "sdpa", "block_causal", BF16_COMPILED, SHAPE)[0] == "matmul"


def test_a_placed_model_computes_what_the_unplaced_one_did():
    """fp32 eager on CPU: placement picks SDPA again, and the outputs are the same numbers."""
    model = Transformer.build(tiny())
    tokens, tok_idx = torch.randint(0, 64, (2, 16)), torch.cat([torch.arange(6), torch.arange(10)]).repeat(2, 1)
    with torch.no_grad():
        before = model(tokens, tok_idx=tok_idx)
        place_attention(model, model.args, Placement(), batch=2, seqlen=16)
        assert torch.equal(model(tokens, tok_idx=tok_idx), before) and model.kernel.name == "sdpa"


def test_old_configs_and_checkpoints_with_cpu_attn_backward_still_load(caplog):
    with caplog.at_level(logging.WARNING, logger="lingua"):
        args = load_config(TrainArgs, ["model.cpu_attn_backward=matmul"])
    assert args.model.attn_backward == "matmul"
    assert "'model.cpu_attn_backward' in command line is now 'model.attn_backward'" in caplog.text
    params = {"model": {"dim": 32, "n_heads": 4, "vocab_size": 64, "seed": 0, "cpu_attn_backward": "aten"}}
    assert spec_for_params(params, "params.json") is TRANSFORMER_SPEC  # an old checkpoint without model_spec
    assert model_args_from_params(params, TRANSFORMER_SPEC, "params.json").attn_backward == "aten"


@pytest.mark.parametrize("config", ["llama_1B", "llama_7B"])
def test_shipped_gpu_configs_train_with_flex_on_cuda(config):
    args = load_config(TrainArgs, [f"config=apps/main/configs/{config}.yaml"]).model
    assert args.mask == "block_causal" and select_kernel(args.attn_impl, args.mask, "cuda") == "flex"
