"""apps/mamba: the SSD scan (chunked == recurrent), document resets, the recurrent cache and left padding, the optional
mamba_ssm kernels against the PyTorch reference, and the app on the shared train loop (train, resume, FSDP, eval).

Tolerances: the chunked scan and the one-step recurrence compute the same sums in a different order (fp32); over the
short tiny sequences here they agree to ~1e-6, so 1e-4 (scan outputs of size ~1) and 1e-4 on logits leave ample
headroom while any leak across a document boundary or off-by-one in the decays moves outputs by >1e-2.
"""

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from apps.mamba.model import (
    MAMBA_SPEC,
    Mamba,
    MambaArgs,
    MambaCache,
    _kernels,
    flops_per_token,
)
from apps.mamba.ssd import segsum, ssd_chunked, ssd_sequential
from lingua.models.decoder import non_embedding_params
from lingua.models.layers import causal_conv
from lingua.train.loop import train_args_cls

MambaTrainArgs = train_args_cls(MAMBA_SPEC)
from lingua.args import load_config
from lingua.errors import ConfigError
from lingua.eval.generate import Generator, GeneratorArgs
from lingua.eval.load import load_model
from lingua.train.loop import train
from tests.conftest import ROOT, assert_bits_per_byte, final_weights, greedy_ids, read_jsonl, tiny_overrides
from tests.dist_helpers import torchrun

ATOL = 1e-4

TINY = dict(dim=32, n_layers=2, d_state=8, head_dim=16, chunk_size=8, d_conv=4, max_seqlen=64)


def tiny_model(**kw) -> Mamba:
    return Mamba.build(MambaArgs(**{**TINY, "vocab_size": 40, **kw})).eval()


def random_ssm_inputs(bs=2, seqlen=37, n_heads=4, head_dim=8, d_state=6, n_groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bs, seqlen, n_heads, head_dim, generator=g)
    dt = F.softplus(torch.randn(bs, seqlen, n_heads, generator=g) - 1)
    A = -(torch.rand(n_heads, generator=g) * 3 + 0.5)
    B = torch.randn(bs, seqlen, n_groups, d_state, generator=g)
    C = torch.randn(bs, seqlen, n_groups, d_state, generator=g)
    return x, dt, A, B, C


def packed_tok_idx(bs: int, seqlen: int, starts: list[list[int]]) -> torch.Tensor:
    """Positions inside documents, restarting at each start of each row (row b's first document starts at 0)."""
    tok_idx = torch.zeros(bs, seqlen, dtype=torch.long)
    for b, row in enumerate(starts):
        bounds = sorted(set([0] + row)) + [seqlen]
        for lo, hi in zip(bounds, bounds[1:]):
            tok_idx[b, lo:hi] = torch.arange(hi - lo)
    return tok_idx


# ---------------------------------------------------------------- the scan


def test_segsum_is_the_log_decay_between_positions():
    x = torch.tensor([0.5, -1.0, float("-inf"), -2.0])
    s = segsum(x)
    assert s[3, 1] == -1.0 + float("-inf") and s[1, 0] == -1.0 and s[3, 3] == 0 and s[0, 1] == float("-inf")
    assert s[3, 2] == -2.0  # the reset at 2 blocks everything before it, not what follows


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64], ids=lambda q: f"Q{q}")
@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_chunked_scan_equals_the_recurrence(chunk_size, packed):
    x, dt, A, B, C = random_ssm_inputs()  # seqlen 37: never a multiple of the chunk size (but Q=1)
    reset = packed_tok_idx(2, 37, [[5, 17, 18], [30]]) == 0 if packed else None
    state0 = torch.randn(2, 4, 8, 6)
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size, reset, initial_state=state0)
    y_ref, final_ref = ssd_sequential(x, dt, A, B, C, reset, initial_state=state0)
    assert y.shape == y_ref.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(final, final_ref, atol=ATOL, rtol=0)


def test_chunked_scan_gradients_equal_the_recurrence_and_stay_finite_across_resets():
    inputs = random_ssm_inputs(seqlen=21)
    reset = packed_tok_idx(2, 21, [[4, 9], [13]]) == 0
    grads = []
    for scan in (lambda *a: ssd_chunked(*a, 8, reset)[0], lambda *a: ssd_sequential(*a, reset)[0]):
        leaves = [t.clone().requires_grad_() for t in inputs]
        scan(*leaves).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for g, g_ref in zip(*grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, atol=1e-3, rtol=1e-4)


def test_a_reset_forgets_everything_before_it():
    x, dt, A, B, C = random_ssm_inputs(bs=1, seqlen=20)
    reset = packed_tok_idx(1, 20, [[12]]) == 0
    y, _ = ssd_chunked(x, dt, A, B, C, 8, reset)
    alone, _ = ssd_chunked(x[:, 12:], dt[:, 12:], A, B[:, 12:], C[:, 12:], 8)
    torch.testing.assert_close(y[:, 12:], alone, atol=ATOL, rtol=0)


def test_causal_conv_matches_conv1d_and_masks_documents():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 19, 6, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    ref = F.conv1d(x.transpose(1, 2), w[:, None], b, padding=3, groups=6)[..., :19].transpose(1, 2)
    out, state = causal_conv(x, w, b)
    torch.testing.assert_close(out, ref)
    assert torch.equal(state, x[:, -3:])
    tok_idx = packed_tok_idx(2, 19, [[7, 9], [2]])
    out, _ = causal_conv(x, w, b, tok_idx)
    torch.testing.assert_close(out[0, 9:], causal_conv(x[:1, 9:], w, b)[0][0])  # a document sees only itself
    torch.testing.assert_close(out[0, 7:9], causal_conv(x[:1, 7:9], w, b)[0][0])
    # the recurrent form: one input at a time through the conv buffer
    state, steps = None, []
    for t in range(19):
        o, state = causal_conv(x[:, t: t + 1], w, b, history=state)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 1), ref)


# ---------------------------------------------------------------- the model: parallel vs recurrent, packing, padding


def step_by_step(model: Mamba, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a fresh recurrent pass, one token per forward through the cache (the decode path)."""
    cache = model.make_cache(tokens.shape[0], tokens.shape[1])
    return torch.cat([model(tokens[:, t: t + 1], cache=cache) for t in range(tokens.shape[1])], dim=1)


@pytest.mark.parametrize("kw", [{}, dict(mlp=True, multiple_of=16, n_groups=2, weight_tying=True)],
                         ids=["mixer-only", "mlp-groups-tied"])
@torch.no_grad()
def test_recurrent_steps_equal_the_parallel_scan_with_packed_documents(kw):
    model = tiny_model(**kw)
    seqlen = 21  # not a multiple of chunk_size=8
    tokens = torch.randint(2, 40, (2, seqlen), generator=torch.Generator().manual_seed(1))
    starts = [[6, 13], [9]]
    tok_idx = packed_tok_idx(2, seqlen, starts)
    parallel = model(tokens, tok_idx=tok_idx)  # (2, 21, vocab)
    for b, row in enumerate(starts):
        bounds = [0] + row + [seqlen]
        for lo, hi in zip(bounds, bounds[1:]):  # every document alone, recurrently, from a zero state
            torch.testing.assert_close(parallel[b: b + 1, lo:hi], step_by_step(model, tokens[b: b + 1, lo:hi]),
                                       atol=ATOL, rtol=0)
    # and tok_idx=None is one document per row
    torch.testing.assert_close(model(tokens), step_by_step(model, tokens), atol=ATOL, rtol=0)


@torch.no_grad()
def test_prefill_then_decode_equals_the_full_forward():
    model = tiny_model()
    tokens = torch.randint(2, 40, (3, 19), generator=torch.Generator().manual_seed(2))
    cache = model.make_cache(3, 19)
    prefill = model(tokens[:, :11], cache=cache)  # the chunked scan, leaving state + conv buffer in the cache
    rest = [model(tokens[:, t: t + 1], cache=cache) for t in range(11, 19)]
    assert cache.len == 19
    torch.testing.assert_close(torch.cat([prefill, *rest], 1), model(tokens), atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padding_keeps_the_state_at_zero():
    model = tiny_model()
    cache = model.make_cache(2, 10, pad=[0, 4])
    tokens = torch.randint(2, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    model(tokens[:, :3], cache=cache)  # row 1 has seen padding only
    for i in range(model.args.n_layers):
        assert cache.ssm[i][1].abs().max() == 0 and cache.conv[i][1].abs().max() == 0
        assert cache.ssm[i][0].abs().max() > 0
    padded = torch.cat([model(tokens[:, 3:4], cache=cache), model(tokens[:, 4:6], cache=cache)], 1)
    alone = model(tokens[1:, 4:6])  # row 1's real tokens start at slot 4
    torch.testing.assert_close(padded[1:, 1:], alone, atol=ATOL, rtol=0)


class ByteTokenizer:
    bos_id, eos_id, n_words = 1, 2, 40

    def encode(self, text, add_bos=True, add_eos=True):
        return [self.bos_id] * add_bos + [3 + ord(c) % 37 for c in text] + [self.eos_id] * add_eos

    def decode(self, ids):
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if i >= 3)


def test_unequal_prompts_in_a_batch_give_the_same_greedy_continuation_as_alone():
    model = tiny_model(init_base_std=0.3)  # peaked logits: greedy choices far from ties
    tok = ByteTokenizer()
    prompts = ["the king", "O", "JULIET: my lord, the night is", "a b c"]
    batched, _ = Generator(model, tok, GeneratorArgs(max_gen_len=16, batch_size=4)).generate(prompts)
    alone = [Generator(model, tok, GeneratorArgs(max_gen_len=16, batch_size=1)).generate([p])[0][0] for p in prompts]
    rerun, _ = Generator(model, tok, GeneratorArgs(max_gen_len=16, use_cache=False)).generate(prompts)
    assert batched == alone == rerun
    assert any(len(c) > 3 for c in batched)


def test_cache_and_args_errors_are_one_line():
    with pytest.raises(ConfigError, match="head_dim"):
        Mamba(MambaArgs(**{**TINY, "head_dim": 24, "vocab_size": 40}))
    with pytest.raises(ConfigError, match="ssm_impl"):
        Mamba(MambaArgs(**{**TINY, "ssm_impl": "cuda", "vocab_size": 40}))
    with pytest.raises(Exception, match="max_seqlen"):
        MambaCache(tiny_model().args, 1, 65)


# ---------------------------------------------------------------- the fused kernels (GPU + the `mamba` extra only)


def _kernels_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU (the mamba_ssm kernels are Triton/CUDA only)"
    if _kernels() is None:
        return False, "needs mamba_ssm (pip install -e '.[mamba]')"
    return True, ""


@pytest.mark.skipif(not _kernels_available()[0], reason=_kernels_available()[1])
@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_mamba_ssm_kernels_match_the_pytorch_reference(packed):
    torch.manual_seed(0)
    args = MambaArgs(dim=128, n_layers=2, d_state=32, head_dim=32, chunk_size=64, vocab_size=256, max_seqlen=512)
    ref = Mamba(dataclasses.replace(args, ssm_impl="torch"))
    with torch.no_grad():
        ref.init_weights()
    fused = Mamba(dataclasses.replace(args, ssm_impl="mamba_ssm"))
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.cuda(), fused.cuda()
    tokens = torch.randint(0, 256, (2, 300), device="cuda")  # 300: not a multiple of the chunk size
    tok_idx = packed_tok_idx(2, 300, [[70, 71, 200], [150]]).cuda() if packed else None
    target = torch.randint(0, 256, (2, 300), device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens, tok_idx=tok_idx), ref(tokens, tok_idx=tok_idx), atol=2e-3, rtol=2e-3)
    for model in (ref, fused):
        model(tokens, target, tok_idx=tok_idx).backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        scale = p.grad.abs().max().clamp(min=1e-6)
        assert (p.grad - q.grad).abs().max() / scale < 1e-2, name


# ---------------------------------------------------------------- the app on the shared train loop


def mamba_overrides(corpus, dump_dir, **extra) -> list[str]:
    """conftest's tiny run (bytes tokenizer, 2-source corpus) with its transformer keys swapped for a tiny Mamba."""
    base = dict(o.split("=", 1) for o in tiny_overrides(corpus, dump_dir) if not o.startswith("model."))
    base.update({"model.dim": 32, "model.n_layers": 2, "model.d_state": 8, "model.head_dim": 16,
                 "model.chunk_size": 8, "model.vocab_size": 258, "model.max_seqlen": 64})
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def run(corpus, dump_dir, **extra):
    return train(load_config(MambaTrainArgs, mamba_overrides(corpus, dump_dir, **extra)), MAMBA_SPEC)




def test_trains_through_the_shared_loop_and_evaluates(tiny_corpus, tmp_path):
    extra = dict(steps=30, optim__lr=1e-2, checkpoint__dump__every=0)
    result = run(tiny_corpus, tmp_path, **extra)
    assert result["status"] == "done" and result["step"] == 30
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, (rows[0]["loss"], rows[-1]["loss"])
    # MFU: the model's FLOPs per token x tokens/s over the peak the run was given (logging.peak_flops, one process)
    args = load_config(MambaTrainArgs, mamba_overrides(tiny_corpus, tmp_path, **extra))
    for r in rows:
        want = flops_per_token(args.model, args.data.seq_len) * r["tok_per_s"] / args.logging.peak_flops
        assert r["mfu"] == pytest.approx(want, rel=1e-12)  # the same product, in another order
    evals = read_jsonl(tmp_path / "metrics.eval.jsonl")
    assert_bits_per_byte(evals[-1], tiny_corpus, "alpha", max_docs=4)
    assert evals[-1]["alpha/bpb"] < 8  # trained: below a uniform byte distribution

    # the eval app scores the checkpoint with the same bits per byte as the loop's final eval
    from apps.main.eval import EvalAppArgs
    from apps.main.eval import main as eval_main

    cfg = load_config(EvalAppArgs, [f"ckpt_dir={tmp_path}", f"dump_dir={tmp_path / 'eval'}", "device=cpu",
                                    "validation.max_docs=4"])
    results = eval_main(cfg)
    # the same weights, documents and float32 math; 1e-6 leaves room for the eval app's own batching only
    assert results["validation"]["alpha"]["bpb"] == pytest.approx(evals[-1]["alpha/bpb"], rel=1e-6)
    assert_bits_per_byte({f"alpha/{k}": v for k, v in results["validation"]["alpha"].items()}, tiny_corpus, "alpha",
                         max_docs=4)
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["validation"] == results["validation"]


def test_resume_is_bit_identical(tiny_corpus, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(tiny_corpus, full)
    run(tiny_corpus, cut)
    shutil.rmtree(cut / "checkpoints" / "0000000008")  # "interrupted" after the step-4 checkpoint
    rows = [r for r in read_jsonl(cut / "metrics.jsonl") if r["step"] <= 4]
    (cut / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    run(tiny_corpus, cut)
    loss = lambda d: {r["step"]: r["loss"] for r in read_jsonl(d / "metrics.jsonl")}
    assert [loss(full)[s] for s in range(5, 9)] == [loss(cut)[s] for s in range(5, 9)]
    wa, wb = final_weights(full), final_weights(cut)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_generate_app_decodes_a_checkpoint(tiny_corpus, tmp_path, capsys):
    run(tiny_corpus, tmp_path, steps=2, eval__at_end=False)
    from apps.main.generate import cli

    completions, stats = cli([f"ckpt_dir={tmp_path}", "prompt=ROMEO:", "max_gen_len=8", "device=cpu"])
    assert "ROMEO:" in capsys.readouterr().out
    model, _, tok = load_model(str(tmp_path))
    ids = greedy_ids(model, tok, "ROMEO:", 8)  # the plain forward (no state carried) over the whole sequence
    assert stats.generated_tokens == len(ids) and completions == [tok.decode([i for i in ids if i != tok.eos_id])]


def test_tensor_parallel_is_refused_with_a_clear_message():
    from lingua.distributed.mesh import DistributedArgs
    from lingua.distributed.parallelize import parallelize_decoder

    assert MAMBA_SPEC.parallelize is parallelize_decoder  # the generic one: no tensor-parallel plan
    with torch.device("meta"):
        model = MAMBA_SPEC.build(MAMBA_SPEC.args_cls(dim=32, n_layers=1, d_state=8, head_dim=16, vocab_size=64))
    with pytest.raises(ConfigError, match="^Mamba has no tensor-parallel plan: set distributed.tp_size=1"):
        MAMBA_SPEC.parallelize(model, {"tp": _Size(2), "cp": _Size(1)}, DistributedArgs(tp_size=2))


class _Size:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


@pytest.mark.skipif(not (ROOT / "data" / "shakespeare").is_dir() or not (ROOT / "tokenizers").is_dir(),
                    reason="needs data/ and tokenizers/ from setup/prepare_data.py and setup/train_tokenizer.py")
def test_debug_config_builds():
    args = load_config(MambaTrainArgs, ["config=apps/mamba/configs/debug.yaml"])
    with torch.device("meta"):
        model = Mamba(args.model)
    assert 0.5e6 < non_embedding_params(model) < 5e6
    assert flops_per_token(args.model, args.data.seq_len) > 6 * non_embedding_params(model)


@pytest.mark.slow
def test_two_process_fsdp_trains_resumes_and_evaluates(tiny_corpus, tmp_path):
    overrides = mamba_overrides(tiny_corpus, tmp_path, steps=4, distributed__dp_shard=2, checkpoint__dump__every=2,
                                data__batch_size=2)
    torchrun(2, overrides, module="apps.mamba.train")
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] < 6.5 for r in rows)
    assert_bits_per_byte(read_jsonl(tmp_path / "metrics.eval.jsonl")[-1], tiny_corpus, "alpha", max_docs=4)
    # resume the 2-process run from its step-2 checkpoint: the same steps 3-4
    shutil.rmtree(tmp_path / "checkpoints" / "0000000004")
    first = {r["step"]: r["loss"] for r in rows}
    (tmp_path / "metrics.jsonl").write_text("")
    torchrun(2, overrides, module="apps.mamba.train")
    again = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert [again[s] for s in (3, 4)] == [first[s] for s in (3, 4)]


def test_arch_compare_matches_parameter_counts():
    """benchmarks/arch_compare.py picks each architecture's depth for a matched non-embedding parameter count."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("arch_compare", ROOT / "benchmarks" / "arch_compare.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(params=1.5e6, batch_size=8, seq_len=128, lr=3e-3, eval_docs=10)
    counts = {}
    for name in ("transformer", "mamba"):
        model_spec, args_cls = bench.load_app(bench.ARCHS[name][0])
        n_layers, counts[name] = bench.match_depth(args, name, model_spec, args_cls)
        assert n_layers >= 1
    assert all(abs(c - 1.5e6) < 0.1 * 1.5e6 for c in counts.values()), counts
