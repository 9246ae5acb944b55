"""The model: attention against a naive reference on every CPU kernel, packing, RoPE, init, counting, errors."""

import contextlib
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lingua.errors import ConfigError, LinguaError
from lingua.kernels.attention import KERNELS as LINGUA_KERNELS
from lingua.models.decoder import num_params
from lingua.models.layers import ffn_hidden_dim, linear_group
from lingua.models.transformer.model import (
    Transformer,
    TransformerArgs,
    apply_rope,
    flops_per_token,
    rope_frequencies,
)

# eager flex_attention is the CPU path under test; torch warns that it is unfused
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def tiny(**kw) -> TransformerArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seqlen=32, multiple_of=16)
    return TransformerArgs(**{**base, **kw})


def positions(doc_lens: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in doc_lens])


def allowed(doc_lens: list[int]) -> torch.Tensor:
    """(seqlen, seqlen) block-causal mask written out by hand: query i sees key j <= i of its own document."""
    doc_of = [d for d, n in enumerate(doc_lens) for _ in range(n)]
    s = len(doc_of)
    return torch.tensor([[j <= i and doc_of[i] == doc_of[j] for j in range(s)] for i in range(s)])


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v in float64. q: (bs, s, h, d); k, v: (bs, s, h_kv, d); mask: (bs, s, s)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # query head h reads kv head h // rep
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


# (name, lingua kernel, SDPA backends allowed or None) for every attention kernel this CPU can run forward
KERNELS = [
    ("sdpa-math", "sdpa", [SDPBackend.MATH]),
    ("sdpa-flash-cpu", "sdpa", [SDPBackend.FLASH_ATTENTION]),
    ("flex", "flex", None),
]
# max |error| against the float64 reference on the same (rounded) inputs: fp32 kernels measure ~4e-7; bf16 rounds
# the output to 8 bits of mantissa (half a step is 4e-3 at |out| ~ 1-2), measured ~1e-2 at most
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("name, kernel_name, backends", KERNELS, ids=[k[0] for k in KERNELS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", ["causal", "block_causal"])
@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_attention_matches_naive_reference(name, kernel_name, backends, dtype, mask, n_heads, n_kv_heads):
    g = torch.Generator().manual_seed(0)
    bs, seqlen, head_dim = 2, 24, 16
    docs = [[5, 11, 8], [10, 14]] if mask == "block_causal" else [[seqlen], [seqlen]]
    xq = torch.randn(bs, seqlen, n_heads, head_dim, generator=g).to(dtype)
    xk, xv = (torch.randn(bs, seqlen, n_kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    tok_idx = torch.stack([positions(d) for d in docs]) if mask == "block_causal" else None
    ref_mask = torch.stack([allowed(d) for d in docs])

    kernel = LINGUA_KERNELS[kernel_name]()
    forced = sdpa_kernel(backends) if backends else contextlib.nullcontext()  # a forced SDPA backend must run
    with torch.no_grad(), forced:
        out = kernel(xq, xk, xv, kernel.mask(tok_idx, bs, seqlen, "cpu"))

    assert out.dtype == dtype and out.shape == (bs, seqlen, n_heads, head_dim)
    expected = naive_attention(xq, xk, xv, ref_mask)
    err = (out.double() - expected).abs().max().item()
    assert err < TOLERANCE[dtype], f"{name} {dtype} {mask}: max error {err}"
    if mask == "block_causal":  # the mask must matter: plain causal attention gives other outputs after document 1
        causal = naive_attention(xq, xk, xv, torch.stack([allowed([seqlen])] * bs))
        assert (causal - expected)[:, 5:].abs().max() > 0.1


def test_packed_documents_match_each_document_alone():
    docs = [5, 7, 4]
    model = Transformer.build(tiny(mask="block_causal"))
    tokens = torch.randint(0, 64, (1, sum(docs)), generator=torch.Generator().manual_seed(1))
    tok_idx = positions(docs)[None]
    with torch.no_grad():
        packed = model(tokens, tok_idx=tok_idx)  # (1, 16, vocab)
        start = 0
        for n in docs:
            alone = model(tokens[:, start : start + n])  # positions 0..n-1, causal
            torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
        # the same weights with a plain causal mask let documents 2 and 3 see document 1
        causal = Transformer.build(tiny(mask="causal"))
        leaky = causal(tokens, tok_idx=tok_idx)
    assert torch.equal(causal.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight)
    torch.testing.assert_close(leaky[:, :5], packed[:, :5], atol=1e-5, rtol=1e-5)
    assert (leaky[:, 5:] - packed[:, 5:]).abs().max() > 1e-3


def test_flex_attention_inference_matches_sdpa_and_training_on_cpu_fails_clearly():
    docs = [6, 10]
    tokens, tok_idx = torch.randint(0, 64, (1, 16)), positions(docs)[None]
    sdpa = Transformer.build(tiny(mask="block_causal"))
    flex = Transformer.build(tiny(mask="block_causal", attn_impl="flex_attention"))
    with torch.no_grad():
        torch.testing.assert_close(flex(tokens, tok_idx=tok_idx), sdpa(tokens, tok_idx=tok_idx), atol=1e-5, rtol=1e-5)
    with pytest.raises(LinguaError, match="flex_attention has no backward on CPU.*attn_impl=auto or sdpa"):
        flex(tokens, tokens, tok_idx=tok_idx)


def test_xformers_needs_cuda():
    model = Transformer.build(tiny(attn_impl="xformers"))
    with pytest.raises(LinguaError, match="xformers"):
        model(torch.randint(0, 64, (1, 8)))


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    cos, sin = rope_frequencies(head_dim, 64, 10000.0)
    # cos[p, i] = cos(p * theta^(-2i/head_dim)), by hand for p=3, i=1
    assert cos[3, 1].item() == pytest.approx(math.cos(3 * 10000.0 ** (-2 / 16)), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g), torch.randn(1, 1, 1, head_dim, generator=g)

    def score(m, n):  # q at position m . k at position n
        return (apply_rope(q, cos[m : m + 1], sin[m : m + 1]) * apply_rope(k, cos[n : n + 1], sin[n : n + 1])).sum()

    for m, n in [(10, 8), (40, 38), (63, 61)]:
        assert score(m, n).item() == pytest.approx(score(3, 1).item(), abs=1e-4)
    assert score(7, 7).item() == pytest.approx((q * k).sum().item(), abs=1e-4)  # same position: no net rotation
    assert abs(score(3, 1) - score(3, 0)) > 1e-3  # but the offset matters
    rotated = apply_rope(q, cos[5:6], sin[5:6])
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)  # a rotation


def test_one_optimizer_step_lowers_the_loss():
    model = Transformer.build(tiny(vocab_size=64))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (4, 32), generator=g), torch.randint(0, 64, (4, 32), generator=g)
    loss = model(x, y)
    # Near uniform at init: the logits have std ~1 (RMS-normed h, output std dim ** -0.5), so the expected loss is
    # about log(64) + 1/2 = 4.66; over init seeds it ranges 4.5-4.8.
    assert loss.ndim == 0 and abs(loss.item() - math.log(64)) < 1.0
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.step()
    with torch.no_grad():
        after = model(x, y)
    assert after.item() < loss.item() - 0.05


def test_num_params_and_flops_match_a_hand_count():
    args = TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32)
    # head_dim 16; wq, wo 64*64 each, wk, wv 64*32 each; ffn hidden int(2*4*64/3)=170 -> 192; w1,w2,w3 64*192 each
    per_layer = 2 * 4096 + 2 * 2048 + 3 * 64 * 192 + 2 * 64  # + two RMSNorms
    assert per_layer == 49280 and ffn_hidden_dim(64, 32, None) == 192
    with torch.device("meta"):
        model = Transformer(args)
    assert num_params(model) == 2 * 49280 + 64 + 2 * 6400 == 111424  # + final norm + embedding + output
    assert num_params(model, exclude_embedding=True) == 111424 - 6400
    # 6 * (non-embedding params incl. the output matmul) + 12 * n_layers * n_heads * head_dim * seq_len
    assert flops_per_token(args, 32) == 6 * 105024 + 12 * 2 * 4 * 16 * 32 == 679296
    assert flops_per_token(args, 32) == 6 * num_params(model, exclude_embedding=True) + 12 * 2 * 64 * 32
    # tying removes a parameter matrix but not the output matmul
    tied = TransformerArgs(**{**args.__dict__, "weight_tying": True})
    with torch.device("meta"):
        assert num_params(Transformer(tied)) == 111424 - 6400
    assert flops_per_token(tied, 32) == 679296
    # Llama-7B's FFN width and ffn_dim_multiplier rounding
    assert ffn_hidden_dim(4096, 256, None) == 11008 and ffn_hidden_dim(64, 32, 1.5) == 256


TRUNC = 0.98658  # std of a normal truncated at +-3 std, relative to the untruncated std


@pytest.mark.parametrize(
    "factor, wo_divisor",
    [("disabled", 1.0), ("current_depth", 2.0), ("global_depth", 6**0.5), ("dim_ratio", 256 / 4096)],
)
def test_init_after_meta_construction_has_the_configured_std(factor, wo_divisor):
    args = TransformerArgs(dim=256, n_layers=2, n_heads=4, vocab_size=512, multiple_of=64, init_std_factor=factor)
    model = Transformer.build(args)
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    layer = model.layers[1]  # depth 1: current_depth divides by sqrt(2 * 2)
    hidden = ffn_hidden_dim(256, 64, None)
    expected = {
        model.tok_embeddings.weight: 256**-0.5,
        model.output.weight: 256**-0.5,
        layer.attention.wq.weight: 256**-0.5,
        layer.attention.wk.weight: 256**-0.5,
        layer.attention.wo.weight: 256**-0.5 / wo_divisor,
        layer.feed_forward.w1.weight: 256**-0.5,
        layer.feed_forward.w2.weight: hidden**-0.5 / wo_divisor,
    }
    for w, std in expected.items():
        assert w.std().item() == pytest.approx(std * TRUNC, rel=0.03)
        assert w.abs().max().item() <= 3 * std + 1e-6
    assert torch.equal(layer.attention_norm.weight, torch.ones(256)) and torch.equal(model.norm.weight, torch.ones(256))
    cos, sin = rope_frequencies(64, args.max_seqlen, args.rope_theta)
    assert torch.equal(model.freq_cos, cos) and torch.equal(model.freq_sin, sin)
    assert "freq_cos" not in model.state_dict()  # derived, not checkpointed


def test_init_base_std_and_seed():
    model = Transformer.build(TransformerArgs(dim=256, n_layers=1, n_heads=4, vocab_size=64, init_base_std=0.02))
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02 * TRUNC, rel=0.03)
    again = Transformer.build(TransformerArgs(dim=256, n_layers=1, n_heads=4, vocab_size=64, init_base_std=0.02))
    other = Transformer.build(TransformerArgs(dim=256, n_layers=1, n_heads=4, vocab_size=64, init_base_std=0.02), seed=1)
    assert torch.equal(model.output.weight, again.output.weight)
    assert not torch.equal(model.output.weight, other.output.weight)


def test_weight_tying_ties_after_meta_init_and_training():
    model = Transformer.build(tiny(weight_tying=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert num_params(model) == num_params(Transformer.build(tiny())) - 64 * 32
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    opt.step()
    assert model.output.weight is model.tok_embeddings.weight
    assert model.tok_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_heads=3), "model.n_heads=3 does not divide model.dim=32"),
        (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads=3 does not divide model.n_heads=4"),
        (dict(attn_impl="flash"), "model.attn_impl='flash' is not one of auto, sdpa, flex_attention, xformers"),
        (dict(mask="document"), "model.mask='document' is not one of causal, block_causal"),
        (dict(init_std_factor="depth"), "model.init_std_factor='depth' is not one of"),
        (dict(vocab_size=-1), "model.vocab_size must be > 0"),
        (dict(n_heads=None, head_dim=5), "model.head_dim=5 does not divide model.dim=32"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        Transformer(tiny(**overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sequence_longer_than_max_seqlen_fails():
    with pytest.raises(LinguaError, match="exceeds model.max_seqlen=32"):
        Transformer.build(tiny())(torch.zeros(1, 33, dtype=torch.long))


def test_the_defaults_are_a_valid_model():
    """Neither n_heads nor head_dim set: heads of 64 dims. The defaults build (only vocab_size comes from a tokenizer)."""
    args = TransformerArgs(vocab_size=100)
    assert args.heads == (8, 8, 64)  # dim 512
    with torch.device("meta"):
        model = Transformer(args)
    assert model.layers[0].attention.wq.out_features == 512
    assert TransformerArgs(dim=32).heads == (1, 1, 32)  # narrower than one head: one head of dim


@pytest.mark.parametrize("dtype,compiled,softcap", [(torch.float32, False, None), (torch.bfloat16, False, None),
                                                    (torch.float32, True, None), (torch.float32, False, 3.0)])
def test_fused_loss_equals_the_loss_through_the_logits(dtype, compiled, softcap):
    """model.fused_loss: the chunked loss with its gradient computed in the forward gives the plain loss and the plain
    gradients (bf16: as nn.Linear under autocast would), also over several chunks and ignored targets; compiled, its
    gradient is one fused expression instead of the eager in-place one, with the same numbers. With a soft cap c,
    the plain loss is of c * tanh(logits / c) (the logits here reach ~3 c, where the tanh's slope matters)."""
    from lingua.kernels.loss import cross_entropy, linear_cross_entropy

    if compiled:
        linear_cross_entropy = torch.compile(linear_cross_entropy, fullgraph=True)

    torch.manual_seed(0)
    h = torch.randn(3, 50, 16, requires_grad=True)
    w = torch.randn(70, 16, requires_grad=True)
    target = torch.randint(0, 70, (3, 50))
    target[0, :5] = -1  # ignored, as evaluation pads
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        fused = linear_cross_entropy(h, w, target, chunk=32, softcap=softcap)
        logits = torch.nn.functional.linear(h, w)
        plain = cross_entropy(logits if softcap is None else softcap * torch.tanh(logits / softcap), target)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    for a, b in zip(torch.autograd.grad(3 * fused, (h, w)), torch.autograd.grad(3 * plain, (h, w))):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


def test_models_train_with_the_fused_loss_and_evaluate_through_the_logits():
    model = Transformer.build(tiny())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    fused = model(x, y)
    with torch.no_grad():
        assert torch.allclose(model(x, y), fused.detach(), atol=1e-6)  # no grad: the logits path, the same value
    model.args.fused_loss = False
    assert torch.allclose(model(x, y), fused, atol=1e-6)


def test_zero_init_std_factor_starts_every_block_as_the_identity():
    model = Transformer.build(tiny(init_std_factor="zero"))
    for block in model.layers:
        assert not block.attention.wo.weight.any() and not block.feed_forward.w2.weight.any()
        assert block.attention.wq.weight.std() > 0
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():  # blocks add nothing to the residual stream: embeddings -> norm -> output
        torch.testing.assert_close(model(x), model.output(model.norm(model.tok_embeddings(x))))


@pytest.mark.parametrize("switch", [dict(mlp="relu2"), dict(qk_norm=True), dict(logit_softcap=3.0),
                                    dict(init_std_factor="zero")])
def test_architecture_switches_train_and_agree_with_their_unfused_loss(switch):
    """Each model.* switch builds, its fused training loss equals the loss through the (soft-capped) logits, and a few
    AdamW steps on one batch bring the loss down."""
    model = Transformer.build(tiny(**switch))
    x, y = torch.randint(0, 64, (4, 24)), torch.randint(0, 64, (4, 24))
    with torch.no_grad():
        plain = model(x, y)  # no grad: through the logits
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        loss = model(x, y)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert abs(first - plain.item()) < 1e-5
    assert loss.item() < first - 0.5, (first, loss.item())


def test_relu2_and_qk_norm_shapes_and_softcap_bound():
    model = Transformer.build(tiny(mlp="relu2", qk_norm=True, logit_softcap=2.0))
    ff, attn = model.layers[0].feed_forward, model.layers[0].attention
    assert not hasattr(ff, "w3") and ff.w1.out_features == 4 * 32  # relu2: two matrices, 4 * dim wide
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (8,)  # one weight per head dimension
    with torch.no_grad():
        assert model(torch.randint(0, 64, (2, 16))).abs().max() < 2.0  # logits within the soft cap


def test_linear_group_is_the_separate_linears_forward_and_backward():
    """Attention's q/k/v and SwiGLU's w1/w3 run as one matmul of their concatenated weights: the same outputs and
    weight gradients as one call each (to fp32 rounding); a module with a bias takes the one-call-each path."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    mods = [torch.nn.Linear(16, n, bias=False) for n in (16, 8, 8)]
    fused = linear_group(x, *mods)
    assert [t.shape[-1] for t in fused] == [16, 8, 8]
    sum(t.square().sum() for t in fused).backward()
    got = [m.weight.grad.clone() for m in mods] + [x.grad.clone()]
    for m in mods:
        m.weight.grad = None
    x.grad = None
    ref = [m(x) for m in mods]
    sum(t.square().sum() for t in ref).backward()
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(got, [m.weight.grad for m in mods] + [x.grad]):
        torch.testing.assert_close(a, b)
    biased = torch.nn.Linear(16, 4)
    (out,) = linear_group(x, biased)
    torch.testing.assert_close(out, biased(x))
