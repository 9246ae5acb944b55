"""lingua/kernels/attention/cpu_matmul_backward.py: the matmul backward of CPU attention against float64 autograd,
compiled in place of aten's, and a compiled bf16 model training the same with either."""

import math

import pytest
import torch
from torch.profiler import profile

from lingua.kernels.attention import KERNELS
from lingua.kernels.attention.cpu_matmul_backward import CausalAttention
from lingua.kernels.attention.sdpa import dense_mask
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
    bool_mask = dense_mask(tok_idx, seqlen, "cpu")  # None for causal
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


def _attention_backward_ops(kernel_name: str, dtype: torch.dtype, seqlen: int = 32) -> tuple[set, torch.Tensor]:
    """Compile one attention call through lingua's kernel `kernel_name`, run forward+backward under the profiler,
    and return the aten attention ops that ran and dq."""
    g = torch.Generator().manual_seed(0)
    xq, xk, xv = (torch.randn(2, seqlen, 2, 16, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    fn = torch.compile(KERNELS[kernel_name](), fullgraph=True, dynamic=False)
    fn(xq, xk, xv, None).sum().backward()  # compile outside the profile
    xq.grad = None
    with profile() as prof:
        fn(xq, xk, xv, None).square().sum().backward()
    ops = {e.key for e in prof.key_averages() if "flash_attention" in e.key}
    return ops, xq.grad


def test_compiled_matmul_kernel_replaces_atens_backward_with_the_same_gradient():
    aten_bwd = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
    aten_ops, aten_dq = _attention_backward_ops("sdpa", torch.bfloat16)
    matmul_ops, matmul_dq = _attention_backward_ops("cpu_matmul_backward", torch.bfloat16)
    assert aten_bwd in aten_ops and aten_bwd not in matmul_ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in matmul_ops  # aten's fused forward stays
    torch.testing.assert_close(matmul_dq.float(), aten_dq.float(), atol=6e-2, rtol=3e-2)  # one gradient, to bf16


def test_a_compiled_bf16_model_trains_the_same_with_either_backward():
    """The whole model compiled under bf16 autocast (the default on a bf16 CPU): both backwards give one loss
    curve within bf16 rounding."""
    args = TransformerArgs(dim=64, n_layers=1, n_heads=4, vocab_size=128, max_seqlen=64, mask="block_causal")
    tokens = torch.randint(0, 128, (2, 65), generator=torch.Generator().manual_seed(3))
    tok_idx = torch.stack([doc_positions([20, 44]), doc_positions([64])])
    curves = {}
    for choice in ("matmul", "aten"):
        torch.manual_seed(0)
        model = Transformer.build(TransformerArgs(**{**args.__dict__, "attn_backward": choice}))
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
    # the two backwards round their bf16 gradients differently: measured at most 0.1% apart over these 6 steps
    torch.testing.assert_close(curves["matmul"], curves["aten"], atol=0, rtol=5e-3)
