"""The attention report tells the truth: the backend it names is the aten op the profiler sees run."""

import contextlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from lingua.distributed.precision import cpu_name
from lingua.kernels.attention.measure import AttentionShape, cache_key, cache_path
from lingua.kernels.attention.sdpa import sdpa_inputs
from lingua.models.transformer.model import Transformer, TransformerArgs
from lingua.tools.attention_report import (
    _why_not,
    format_report,
    main,
    report_attention,
)

# what torch's CPU SDPA can dispatch to, by profiler op name (written out here, independently of the module's table)
CPU_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_attention_math": "MATH",
}


def tiny(**kw) -> TransformerArgs:
    return TransformerArgs(**{**dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seqlen=32), **kw})


def ops_that_ran(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key in CPU_OPS}


@pytest.mark.parametrize("allowed", [None, [SDPBackend.MATH]], ids=["default", "math-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", ["causal", "block_causal"])
def test_reported_backend_is_what_runs(mask, dtype, allowed):
    args = tiny(mask=mask)
    model = Transformer.build(args).to(dtype)
    tokens = torch.randint(0, 64, (2, 32))
    tok_idx = torch.cat([torch.arange(12), torch.arange(20)]).repeat(2, 1)
    with sdpa_kernel(allowed) if allowed else contextlib.nullcontext():
        rows = {r["phase"]: r for r in report_attention(args, "cpu", dtype)}
        train_ops = ops_that_ran(lambda: model(tokens, tokens, tok_idx=tok_idx).backward())
        with torch.no_grad():
            prefill_ops = ops_that_ran(lambda: model(tokens))
            xq, xk, xv = torch.randn(1, 1, 4, 8, dtype=dtype), *torch.randn(2, 1, 32, 2, 8, dtype=dtype)
            q, k, v, _, _ = sdpa_inputs(xq, xk, xv, None)  # one new token against a 32-entry KV cache
            decode_ops = ops_that_ran(lambda: F.scaled_dot_product_attention(q, k, v))

    assert rows["train"]["mask"] == mask and rows["train"]["q_shape"] == (1, 4, 32, 8)
    assert rows["decode"]["q_shape"] == (1, 4, 1, 8) and rows["decode"]["kv_shape"] == (1, 4, 32, 8)
    for phase, ran in (("train", train_ops), ("prefill", prefill_ops), ("decode", decode_ops)):
        assert ran == {rows[phase]["op"]}, f"{phase}: report says {rows[phase]['op']}, profiler saw {ran}"
        assert rows[phase]["backend"] == CPU_OPS[rows[phase]["op"]]
    # on this CPU the fused kernel takes causal and boolean block masks, fp32 and bf16 alike, unless disabled
    expected = "MATH" if allowed else "FLASH_ATTENTION"
    assert {r["backend"] for r in rows.values()} == {expected}
    if allowed:
        assert rows["train"]["rejected"] == [("FLASH_ATTENTION", rows["train"]["rejected"][0][1])]
        assert "disabled" in rows["train"]["rejected"][0][1]
    else:
        assert all(r["rejected"] == [] for r in rows.values())


def test_rejection_reasons_come_from_torch():
    q = torch.randn(1, 4, 16, 8)
    v = torch.randn(1, 4, 16, 16)  # value head dim differs from query/key: torch's CPU flash kernel refuses
    why = _why_not(SDPBackend.FLASH_ATTENTION, q, q, v, None, True)
    assert "same last dimension" in why and "Triggered internally" not in why
    assert _why_not(SDPBackend.FLASH_ATTENTION, q, q, q, None, True) == ""
    assert torch.backends.cuda.flash_sdp_enabled()  # the probe restored the global switches


def test_non_sdpa_impls_are_reported_as_such():
    rows = report_attention(tiny(attn_impl="flex_attention"), "cpu", torch.float32)
    assert [r["lingua"] for r in rows] == ["flex", "sdpa", "sdpa"]  # the KV cache always calls SDPA
    assert rows[0]["backend"] == "flex" and "training raises" in rows[0]["kernel"]


@pytest.mark.parametrize("mask, train_kernel", [("block_causal", "flex"), ("causal", "sdpa")])
def test_cuda_rows_name_what_would_run_there(mask, train_kernel, capsys):
    """On a machine without a GPU the report still names lingua's kernel for CUDA: flex for the block-causal mask."""
    rows = report_attention(tiny(mask=mask), "cuda", "bf16")
    assert [(r["phase"], r["lingua"], r["device"]) for r in rows] == [
        ("train", train_kernel, "cuda"), ("prefill", "sdpa", "cuda"), ("decode", "sdpa", "cuda")]
    assert rows[0]["q_shape"] == (1, 4, 32, 8) and "backward" not in rows[0]
    if not torch.cuda.is_available():
        assert main([f"model.mask={mask}", "n_heads=4", "device=cuda", "dtype=bf16"]) == 0
        out = capsys.readouterr().out
        assert "cuda (no GPU here: what would run)" in out and out.splitlines()[2].split()[5] == train_kernel


def test_the_train_row_follows_the_measured_backward(tmp_path, monkeypatch):
    """The report reads the timing cache place_attention writes: the kernel it names is the one training gets."""
    monkeypatch.setenv("LINGUA_CACHE_DIR", str(tmp_path))
    args = tiny(mask="block_causal")
    key = cache_key(cpu_name(), AttentionShape(8, 32, 4, 2, 8, "block_causal"), torch.bfloat16, compiled=True)
    cache_path().write_text(json.dumps({key: {"aten": 4.0, "matmul": 2.0, "batch": 8}}))
    row = report_attention(args, "cpu", "bf16")[0]
    assert row["lingua"] == "cpu_matmul_backward" and row["op"] == "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert row["backward"].startswith("under torch.compile: matmul backward, 2.0 ms vs aten 4.0 ms (cached")


def test_format_report_is_a_table():
    with sdpa_kernel([SDPBackend.MATH]):
        rows = report_attention(tiny(), "cpu", "bf16", seq_len=16)
    text = format_report(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["phase", "dtype", "mask"]
    assert lines[1].split()[:4] == ["train", "bfloat16", "causal", "(1,4,16,8)"]
    assert lines[2].strip().startswith("FLASH_ATTENTION rejected: disabled")
    # bf16 on CPU: compiled training times the two backwards (nothing measured yet in this test's cache)
    assert lines[3].strip() == ("backward: under torch.compile: measured when a compiled bf16 CPU run starts "
                                "(model.attn_backward=auto)")
    assert len(lines) == 1 + 3 * 2 + 1
    fp32 = format_report(report_attention(tiny(attn_backward="matmul"), "cpu", "fp32", seq_len=16))
    assert "backward: model.attn_backward=matmul" in fp32 and "cpu_matmul_backward" in fp32
    assert "backward:" not in format_report(report_attention(tiny(), "cpu", "fp32", seq_len=16))


def test_cli_reads_the_model_section_of_a_train_config(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("name: x\nsteps: 10\nmodel:\n  dim: 48\n  n_heads: 4\n  n_kv_heads: 2\n  max_seqlen: 64\n")
    assert main([f"config={cfg}", "model.n_heads=6", "dtype=fp32", "seq_len=16"]) == 0
    out = capsys.readouterr().out
    assert "n_heads=6, n_kv_heads=2" in out and "head_dim=8" in out
    assert "(1,6,16,8)" in out and "bfloat16" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dimm=64"], "unknown key 'model.dimm' (did you mean 'model.dim'?)"),
        (["n_heads=x"], "model.n_heads"),
        (["config=/nonexistent/train.yaml"], "config file not found: /nonexistent/train.yaml"),
        (["dim=64", "n_heads=3"], "model.n_heads=3 does not divide model.dim=64"),
        (["n_heads=4", "dtype=int8"], "dtype='int8'"),
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_module_entry_point():
    cmd = [sys.executable, "-m", "lingua.tools.attention_report", "dim=64", "n_layers=2", "n_heads=4", "vocab_size=100"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("lingua attention report: torch") and "head_dim=16" in lines[0]
    rows = [line.split()[0] for line in lines[2:]]
    assert rows == ["train", "prefill", "decode", "train", "backward:", "prefill", "decode"]


def test_module_entry_point_without_arguments_reports_the_default_model():
    out = subprocess.run([sys.executable, "-m", "lingua.tools.attention_report"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "n_heads=8" in out.stdout and "head_dim=64" in out.stdout
