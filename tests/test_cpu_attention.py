"""lingua/kernels/cpu_attention.py: the matmul backward of CPU attention against float64 autograd, and when auto takes it."""

import math

import pytest
import torch
from torch.profiler import profile

from lingua.distributed.precision import cpu_bf16_features
from lingua.kernels.attention import attend, attention_mask
from lingua.kernels.cpu_attention import CausalAttention, use_matmul_backward
from lingua.models.transformer.model import Transformer, TransformerArgs


def reference(q, k, v, allowed):
    """float64 softmax attention, q, k, v: (bs, heads, seqlen, head_dim); allowed: (bs, 1, seqlen, seqlen)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def doc_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])


# fp32 measured ~1e-6 against float64; bf16 rounds inputs, probabilities and gradients to 8 bits (~1e-2 here)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", ["causal", "block_causal"])
@pytest.mark.parametrize("seqlen", [24, 25])  # odd: the two query halves differ in length
def test_gradients_match_float64_autograd(dtype, mask, seqlen):
    g = torch.Generator().manual_seed(0)
    bs, heads, head_dim = 2, 3, 16
    q, k, v = (torch.randn(bs, heads, seqlen, head_dim, generator=g) for _ in range(3))
    grad_out = torch.randn(bs, heads, seqlen, head_dim, generator=g)
    docs = [[5, seqlen - 13, 8], [seqlen - 14, 14]] if mask == "block_causal" else None
    tok_idx = None if docs is None else torch.stack([doc_positions(d) for d in docs])
    bool_mask = attention_mask("sdpa", tok_idx, bs, seqlen, "cpu")  # None for causal
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril().expand(bs, 1, seqlen, seqlen)
    allowed = causal if bool_mask is None else bool_mask

    ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = CausalAttention.apply(*ins, bool_mask)
    grads = torch.autograd.grad(out, ins, grad_out.to(dtype))
    ref_ins = [t.detach().double().requires_grad_() for t in ins]  # the same rounded inputs
    ref_out = reference(*ref_ins, allowed)
    ref_grads = torch.autograd.grad(ref_out, ref_ins, grad_out.to(dtype).double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert got.dtype == dtype
        err = (got.double() - want).abs().max().item()
        assert err < TOLERANCE[dtype] * max(1.0, want.abs().max().item()), f"{name}: max error {err}"
    if mask == "block_causal":  # the documents must matter to the gradients too
        plain = torch.autograd.grad(reference(*ref_ins, causal), ref_ins, grad_out.to(dtype).double())
        assert (plain[0] - ref_grads[0]).abs().max() > 0.1


def _q(dtype=torch.bfloat16, seqlen=256, requires_grad=True):
    return torch.zeros(1, 1, seqlen, 8, dtype=dtype, requires_grad=requires_grad)


def test_auto_takes_the_matmul_backward_only_where_it_was_measured_faster():
    assert use_matmul_backward("matmul", _q(torch.float32), torch.float32)  # asked for: everywhere on CPU
    assert not use_matmul_backward("aten", _q(), torch.bfloat16)
    assert not use_matmul_backward("auto", _q(), torch.bfloat16)  # eager: not compiling
    assert not use_matmul_backward("matmul", _q(requires_grad=False), torch.bfloat16)  # nothing to differentiate
    with torch.no_grad():
        assert not use_matmul_backward("matmul", _q(), torch.bfloat16)


def _attention_backward_ops(choice: str, dtype: torch.dtype, seqlen: int = 32) -> tuple[set, torch.Tensor]:
    """Compile one attention call with model.cpu_attn_backward=choice, run forward+backward under the profiler,
    and return the aten attention ops that ran and dq."""
    g = torch.Generator().manual_seed(0)
    xq, xk, xv = (torch.randn(2, seqlen, 2, 16, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: attend(q, k, v, None, "sdpa", choice), fullgraph=True, dynamic=False)
    fn(xq, xk, xv).sum().backward()  # compile outside the profile
    xq.grad = None
    with profile() as prof:
        fn(xq, xk, xv).square().sum().backward()
    ops = {e.key for e in prof.key_averages() if "flash_attention" in e.key}
    return ops, xq.grad


AMX = "AMX-BF16" in cpu_bf16_features()  # where auto was measured faster


def test_compiled_auto_runs_the_matmul_backward_in_bf16_on_amx_and_aten_in_fp32():
    aten_bwd = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
    auto_ops, auto_dq = _attention_backward_ops("auto", torch.bfloat16)
    aten_ops, aten_dq = _attention_backward_ops("aten", torch.bfloat16)
    matmul_ops, _ = _attention_backward_ops("matmul", torch.bfloat16)
    assert aten_bwd in aten_ops and aten_bwd not in matmul_ops
    assert (aten_bwd not in auto_ops) == AMX
    torch.testing.assert_close(auto_dq.float(), aten_dq.float(), atol=6e-2, rtol=3e-2)  # one gradient, to bf16
    assert aten_bwd in _attention_backward_ops("auto", torch.float32)[0]  # no faster in fp32: aten's
    assert aten_bwd in _attention_backward_ops("auto", torch.bfloat16, seqlen=1100)[0]  # beyond MAX_AUTO_SEQLEN


def test_a_compiled_bf16_model_trains_the_same_with_either_backward():
    """The whole model compiled under bf16 autocast (the default on a bf16 CPU): both backwards give one loss
    curve within bf16 rounding."""
    args = TransformerArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, max_seqlen=64, mask="block_causal")
    tokens = torch.randint(0, 128, (2, 65), generator=torch.Generator().manual_seed(3))
    tok_idx = torch.stack([doc_positions([20, 44]), doc_positions([64])])
    curves = {}
    for choice in ("matmul", "aten"):
        torch.manual_seed(0)
        model = Transformer.build(TransformerArgs(**{**args.__dict__, "cpu_attn_backward": choice}))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        step = torch.compile(lambda: model(tokens[:, :-1], tokens[:, 1:], tok_idx=tok_idx), dynamic=False)
        curves[choice] = []
        for _ in range(6):
            with torch.autocast("cpu", torch.bfloat16):
                loss = step()
            loss.backward()
            opt.step()
            opt.zero_grad()
            curves[choice].append(loss.item())
    assert curves["matmul"][-1] < curves["matmul"][0] - 0.5  # it learns
    torch.testing.assert_close(curves["matmul"], curves["aten"], atol=0.05, rtol=0.02)
