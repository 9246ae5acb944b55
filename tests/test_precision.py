import pytest
import torch

from lingua.distributed import precision
from lingua.distributed.precision import autocast_context, resolve_model_dtype
from lingua.errors import ConfigError


def _torch_reports_native_cpu_bf16() -> bool:
    """What torch says about this CPU, read independently of lingua.distributed.precision."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        c = caps()
        native = c.get("amx_bf16", False) or c.get("amx_tile", False) or c.get("avx512_bf16", False)
    else:
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return bool(native) and torch.backends.mkldnn.is_available()


def test_auto_on_this_cpu_follows_what_torch_reports():
    dtype, reason = resolve_model_dtype("auto", torch.device("cpu"))
    if _torch_reports_native_cpu_bf16():  # AMX / AVX512-BF16 machines
        assert dtype == torch.bfloat16
        assert reason.startswith("bf16") and ("AMX" in reason or "AVX512-BF16" in reason)
    else:  # this AVX2-only machine
        assert dtype == torch.float32
        assert reason.startswith("fp32")
        assert torch.backends.cpu.get_cpu_capability() in reason
        assert "emulated" in reason


def test_auto_picks_bf16_when_cpu_has_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AMX-BF16"])
    assert resolve_model_dtype("auto", torch.device("cpu")) == (torch.bfloat16, "bf16 (auto): CPU has AMX-BF16")
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    assert resolve_model_dtype("auto", torch.device("cpu"))[0] == torch.float32


def test_auto_without_cuda_is_fp32():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    dtype, reason = resolve_model_dtype("auto", torch.device("cuda"))
    assert dtype == torch.float32 and "not available" in reason


def test_forced_values():
    dtype, reason = resolve_model_dtype("bf16", torch.device("cpu"))
    assert dtype == torch.bfloat16 and reason.startswith("bf16: set by distributed.model_dtype")
    assert resolve_model_dtype("fp32", "cpu")[0] == torch.float32
    assert resolve_model_dtype("BF16", "cpu")[0] == torch.bfloat16


@pytest.mark.parametrize("bad", ["fp16", "float32", ""])
def test_bad_value_names_the_key(bad):
    with pytest.raises(ConfigError, match=r"distributed\.model_dtype"):
        resolve_model_dtype(bad, torch.device("cpu"))


def test_autocast_context():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        out = a @ b
    assert out.dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), torch.float32):
        out = a @ b
    assert out.dtype == torch.float32
    assert torch.equal(out, a @ b)


def test_generation_dtype_auto_is_bf16_only_on_a_cuda_gpu_with_native_bf16():
    from lingua.distributed.precision import inference_dtype
    from lingua.eval.generate import GeneratorArgs

    assert GeneratorArgs().dtype == "auto"
    assert inference_dtype("auto", torch.device("cpu")) == torch.float32  # CPU decoding keeps fp32 numerics
    assert inference_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 else torch.float32
    assert inference_dtype("auto", torch.device("cuda")) == expected
