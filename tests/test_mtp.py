"""apps/mtp: multi-token prediction on the shared loop. One head is exactly the main transformer; several heads learn
through lingua.train.loop.train, resume bit-identically, run under 2-process FSDP, evaluate (bits per byte), generate, and
self-speculative decoding gives exactly the greedy output."""

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from apps.main.eval import EvalAppArgs
from apps.main.eval import main as mtp_eval
from apps.main.generate import GenerateAppArgs
from apps.main.generate import main as mtp_generate
from apps.mtp.model import MTP_SPEC, MTPArgs, MTPTransformer, flops_per_token
from apps.mtp.speculative import SpeculativeAppArgs, greedy_decode, speculative_decode
from apps.mtp.speculative import main as spec_main
from lingua.args import load_config
from lingua.checkpoint.manager import list_checkpoints
from lingua.errors import ConfigError, LinguaError
from lingua.eval.generate import Generator, GeneratorArgs
from lingua.eval.load import load_model
from lingua.models.transformer.model import Transformer, TransformerArgs
from lingua.models.transformer.model import flops_per_token as transformer_flops
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs, train, train_args_cls
from tests.conftest import (
    assert_bits_per_byte,
    final_weights,
    greedy_ids,
    losses,
    read_jsonl,
    tiny_overrides,
)

SMALL = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seqlen=32, mask="block_causal")


MTPTrainArgs = train_args_cls(MTP_SPEC)


def mtp_train(args):
    return train(args, MTP_SPEC)


def build(cls, args, seed=0):
    return cls.build(args, seed=seed)


def mtp_run(corpus, dump_dir, n_future_head=2, **extra):
    overrides = tiny_overrides(corpus, dump_dir, model__n_future_head=n_future_head,
                               data__n_views=n_future_head + 1, **extra)
    return mtp_train(load_config(MTPTrainArgs, overrides))






@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A 2-head run of 40 steps on the tiny corpus (long enough for the extra head to guess right sometimes)."""
    d = tmp_path_factory.mktemp("mtp") / "run"
    result = mtp_run(tiny_corpus, d, steps=40, optim__lr=1e-2, checkpoint__dump__every=20)
    return d, result


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("tied", [False, True])
def test_one_head_is_the_main_transformer_with_one_more_layer(tied):
    mtp = build(MTPTransformer, MTPArgs(**SMALL, n_future_head=1, weight_tying=tied))
    main = build(Transformer, TransformerArgs(**{**SMALL, "n_layers": SMALL["n_layers"] + 1}, weight_tying=tied),
                 seed=1)
    # the state dicts have the same names: trunk blocks then the head block are layers.0 .. layers.n_layers
    assert mtp.state_dict().keys() == main.state_dict().keys()
    main.load_state_dict(mtp.state_dict())
    x = torch.randint(0, 64, (2, 24))
    y = torch.randint(0, 64, (2, 24))
    tok_idx = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    assert torch.equal(mtp(x), main(x))
    assert torch.equal(mtp(x, tok_idx=tok_idx), main(x, tok_idx=tok_idx))
    loss_mtp, loss_main = mtp(x, y, tok_idx=tok_idx), main(x, y, tok_idx=tok_idx)
    assert torch.equal(loss_mtp, loss_main)  # exact in fp32, not just close
    loss_mtp.backward()
    loss_main.backward()
    grads = dict(main.named_parameters())
    for name, p in mtp.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    # and the same init from the same seed: a 1-head run is a main run with n_layers + 1
    fresh = build(Transformer, TransformerArgs(**{**SMALL, "n_layers": SMALL["n_layers"] + 1}, weight_tying=tied))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in mtp.state_dict().items())


def test_one_head_trains_exactly_like_main_through_the_loop(tiny_corpus, tmp_path):
    mtp_run(tiny_corpus, tmp_path / "mtp", n_future_head=1, steps=3, model__n_layers=1, eval__at_end=False)
    train(load_config(TrainArgs, tiny_overrides(tiny_corpus, tmp_path / "main", steps=3, eval__at_end=False)),
          TRANSFORMER_SPEC)  # n_layers=2 by default: the 1-block trunk + 1 head
    assert losses(tmp_path / "mtp") == losses(tmp_path / "main")


def test_loss_is_the_sum_of_each_heads_cross_entropy_on_its_target_view():
    args = MTPArgs(**SMALL, n_future_head=3)
    model = build(MTPTransformer, args)
    assert len(model.layers) == args.n_layers + 3
    seq = torch.randint(0, 64, (2, 20 + 3))
    x, target = seq[:, :20], torch.stack([seq[:, k: k + 20] for k in (1, 2, 3)], -1)  # as lingua.data.loader's n_views=4
    h = model.tok_embeddings(x)
    cos, sin = model.freq_cos[:20], model.freq_sin[:20]
    for block in model.layers[:args.n_layers]:
        h = block(h, cos, sin, None)
    want = sum(F.cross_entropy(model.output(model.norm(model.layers[args.n_layers + k](h, cos, sin, None)))
                               .flatten(0, 1), seq[:, k + 1: k + 21].flatten()) for k in range(3))
    assert torch.allclose(model(x, target), want, rtol=1e-6)
    assert torch.equal(model(x), model.output(model.norm(model.layers[args.n_layers](h, cos, sin, None))))
    with pytest.raises(LinguaError, match="needs data.n_views >= 4"):
        model(x, target[..., :2])


def test_flops_count_every_block_and_every_unembedding():
    one = MTPArgs(**SMALL, n_future_head=1)
    assert flops_per_token(one, 32) == transformer_flops(TransformerArgs(**{**SMALL, "n_layers": 3}), 32)
    three = dataclasses.replace(one, n_future_head=3)
    per_block = transformer_flops(TransformerArgs(**{**SMALL, "n_layers": 2}), 32) - \
        transformer_flops(TransformerArgs(**{**SMALL, "n_layers": 1}), 32)
    assert flops_per_token(three, 32) - flops_per_token(one, 32) == 2 * per_block + 2 * 6 * (64 * 32 + 32)


def test_cached_forward_matches_the_full_forward():
    model = build(MTPTransformer, MTPArgs(**SMALL, n_future_head=2)).eval()
    x = torch.randint(0, 64, (2, 12))
    cache = model.make_cache(2, 12, [0, 0], heads=2)
    with torch.no_grad():
        first = model.forward_heads(x[:, :7], cache)
        rest = model.forward_heads(x[:, 7:], cache)
        full = model(x)
        inputs = model.block_inputs(x, None, None)  # RoPE tables and mask
        h = model.trunk(x, inputs)
        head1 = model.norm(model.layers[model.n_trunk + 1](h, *inputs))
    assert cache.len == 12
    assert torch.allclose(model.output(torch.cat([first[0], rest[0]], 1)), full, atol=1e-5)
    assert torch.allclose(torch.cat([first[1], rest[1]], 1), head1, atol=1e-5)


# ---------------------------------------------------------------- the app on the shared loop


def test_loss_decreases_with_two_heads(trained, tiny_corpus):
    run_dir, result = trained
    assert result["status"] == "done" and result["step"] == 40
    rows = read_jsonl(run_dir / "metrics.jsonl")
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert 2 * 5.0 < first < 2 * 6.5  # two heads, each about ln(258) = 5.55 at init
    assert last < first - 2.0, (first, last)
    # per-head losses (MTP_SPEC.step_metrics): one row per step here, so they sum to the step's loss
    for r in rows:
        assert abs(r["loss/head_0"] + r["loss/head_1"] - r["loss"]) < 1e-5, r
    assert rows[-1]["loss/head_0"] < rows[-1]["loss/head_1"]  # the next token is easier than the one after
    evals = read_jsonl(run_dir / "metrics.eval.jsonl")
    assert_bits_per_byte(evals[-1], tiny_corpus, "alpha", max_docs=4)  # the in-loop eval: the next-token head
    assert evals[-1]["alpha/bpb"] < 8  # trained: below a uniform byte distribution


def test_n_views_must_match_the_heads(tiny_corpus, tmp_path):
    args = load_config(MTPTrainArgs, tiny_overrides(tiny_corpus, tmp_path, model__n_future_head=2))
    with pytest.raises(ConfigError, match=r"data.n_views=2 must be model.n_future_head \+ 1 = 3"):
        mtp_train(args)
    with pytest.raises(ConfigError, match="n_future_head must be >= 1"):
        MTPTransformer(MTPArgs(**SMALL, n_future_head=0))


def test_resume_is_bit_identical(tiny_corpus, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    mtp_run(tiny_corpus, full, eval__at_end=False)
    mtp_run(tiny_corpus, cut, eval__at_end=False)
    # "Interrupt" after step 4: drop the final checkpoint and the logs past step 4, then run the same command.
    shutil.rmtree(cut / "checkpoints" / "0000000008")
    rows = [r for r in read_jsonl(cut / "metrics.jsonl") if r["step"] <= 4]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mtp_run(tiny_corpus, cut, eval__at_end=False)
    a, b = losses(full), losses(cut)
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]
    wa, wb = final_weights(full), final_weights(cut)
    assert wa.keys() == wb.keys() and "layers.3.attention.wq.weight" in wa  # 2 trunk blocks + 2 heads
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_two_process_fsdp_trains_checkpoints_and_resumes(tiny_corpus, tmp_path):
    from tests.dist_helpers import torchrun

    overrides = tiny_overrides(tiny_corpus, tmp_path / "fsdp", model__n_future_head=2, data__n_views=3, steps=6,
                               checkpoint__dump__every=3, distributed__dp_shard=2, eval__at_end=True,
                               model__weight_tying=True, data__batch_size=2)
    out = torchrun(2, overrides, module="apps.mtp.train", timeout=600)
    rows = read_jsonl(tmp_path / "fsdp" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["loss"] == r["loss"] for r in rows)
    # per-head losses averaged over both ranks add up to the (rank-averaged) loss
    assert all(abs(r["loss/head_0"] + r["loss/head_1"] - r["loss"]) < 1e-5 for r in rows), rows
    assert_bits_per_byte(read_jsonl(tmp_path / "fsdp" / "metrics.eval.jsonl")[-1], tiny_corpus, "alpha", max_docs=4)
    assert [p.name for p in list_checkpoints(tmp_path / "fsdp" / "checkpoints")] == ["0000000003", "0000000006"]
    # resume under FSDP from step 3: the same losses for steps 4..6
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "fsdp", cut)
    shutil.rmtree(cut / "checkpoints" / "0000000006")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 3))
    torchrun(2, [o.replace(str(tmp_path / "fsdp"), str(cut)) for o in overrides], module="apps.mtp.train",
             timeout=600)
    assert losses(cut) == losses(tmp_path / "fsdp"), out.stdout[-2000:]


# ---------------------------------------------------------------- evaluation, generation, speculative decoding


def test_eval_app_gives_bits_per_byte(trained, tiny_corpus, tmp_path, capsys):
    run_dir, _ = trained
    args = load_config(EvalAppArgs, [f"ckpt_dir={run_dir}", f"dump_dir={tmp_path}", "validation.max_docs=4"])
    results = mtp_eval(args)
    bpb = results["validation"]["alpha"]["bpb"]
    assert_bits_per_byte({f"alpha/{k}": v for k, v in results["validation"]["alpha"].items()}, tiny_corpus, "alpha",
                         max_docs=4)
    assert json.loads((tmp_path / "results.json").read_text())["validation"]["alpha"]["bpb"] == bpb
    assert "bits/byte" in capsys.readouterr().out
    # the next-token head's bits per byte, which the loop's last eval also reported (same docs, same model)
    assert read_jsonl(run_dir / "metrics.eval.jsonl")[-1]["alpha/bpb"] == pytest.approx(bpb, rel=1e-5)


def test_generate_app_uses_the_next_token_head_with_a_cache(trained, capsys):
    run_dir, _ = trained
    completions, stats = mtp_generate(GenerateAppArgs(ckpt_dir=str(run_dir), max_gen_len=20, device="cpu"),
                                      prompt="ROMEO:")
    assert "ROMEO:" in capsys.readouterr().out
    model, _, tok = load_model(str(run_dir))
    ids = greedy_ids(model, tok, "ROMEO:", 20)  # the next-token head, re-run over the whole sequence
    assert stats.generated_tokens == len(ids) and completions[0] == tok.decode([i for i in ids if i != tok.eos_id])
    cached, _ = Generator(model, tok, GeneratorArgs(max_gen_len=20)).generate(["ROMEO:", "the king"])
    uncached, _ = Generator(model, tok, GeneratorArgs(max_gen_len=20, use_cache=False)).generate(["ROMEO:", "the king"])
    assert cached == uncached and cached[0] == completions[0]


PROMPTS = ["ROMEO: the", "JULIET: O my lord", "KING:", "the queen hath", "Q", "love death and"]


def test_speculative_decoding_is_exactly_greedy(trained):
    run_dir, _ = trained
    model, _, tok = load_model(str(run_dir))
    prompts = [tok.encode(p, add_bos=True, add_eos=False) for p in PROMPTS]
    ref_texts, _ = Generator(model, tok, GeneratorArgs(max_gen_len=24, batch_size=1)).generate(PROMPTS)
    greedy, g_stats = greedy_decode(model, prompts, 24, tok.eos_id, tok.n_words)
    assert [tok.decode(ids) for ids in greedy] == ref_texts  # our baseline is lingua's greedy generator
    for bs in (1, 3):
        spec, forwards, greedy_forwards = [], 0, 0
        for i in range(0, len(prompts), bs):
            rows, s = speculative_decode(model, prompts[i: i + bs], 24, tok.eos_id, tok.n_words)
            spec += rows
            forwards += s.forwards
            greedy_forwards += greedy_decode(model, prompts[i: i + bs], 24, tok.eos_id, tok.n_words)[1].forwards
        assert spec == greedy, bs
        # the drafts were right often enough to save forwards (each forward emits 1 or 2 tokens)
        assert forwards < greedy_forwards, (bs, forwards, greedy_forwards)
    rows, s = speculative_decode(model, prompts, 24, tok.eos_id, tok.n_words, n_draft=0)  # no drafts: plain greedy
    assert rows == greedy


def test_speculative_with_two_drafts_and_at_the_end_of_the_positions():
    """A 3-head model (2 drafts per forward), batched with left padding; generating up to max_seqlen makes the last
    forwards draft fewer tokens."""
    model = build(MTPTransformer, MTPArgs(**SMALL, n_future_head=3)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    greedy, _ = greedy_decode(model, prompts, 32 - 5)
    spec, _ = speculative_decode(model, prompts, 32 - 5)
    assert spec == greedy
    for i, p in enumerate(prompts):
        eos = greedy[i][3]
        one, _ = speculative_decode(model, [p], 20, eos_id=eos)
        assert one == [greedy[i][:greedy[i].index(eos)]]  # cut before EOS, as greedy does
    with pytest.raises(LinguaError, match="exceed model.max_seqlen"):
        speculative_decode(model, prompts, 32)
    with pytest.raises(LinguaError, match="2 extra head"):
        speculative_decode(model, prompts, 4, n_draft=3)


def test_speculative_app_reports_the_speedup(trained, capsys):
    run_dir, _ = trained
    r = spec_main(SpeculativeAppArgs(ckpt_dir=str(run_dir), prompts=PROMPTS[:2], max_gen_len=24, repeats=1))
    assert r["identical"] and r["tokens_per_forward"] > 1.0
    out = capsys.readouterr().out
    assert "self-speculative" in out and "outputs identical: True" in out


def test_speculative_accepts_every_right_draft_and_rejects_wrong_ones():
    """A model whose state is the same vector at every position (one embedding row for all tokens, blocks that add
    nothing) predicts one token forever: both drafts are always right, 3 tokens per forward. A third head with
    random weights still outputs a constant, but another token: only the first draft is kept, 2 tokens per forward."""
    model = build(MTPTransformer, MTPArgs(**SMALL, n_future_head=3)).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(model.tok_embeddings.weight[0].expand_as(model.tok_embeddings.weight))
        for block in model.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
    prompts, n = [[1, 2, 3], [4]], 25
    greedy, _ = greedy_decode(model, prompts, n)
    spec, stats = speculative_decode(model, prompts, n)
    assert spec == greedy and len(set(greedy[0])) == 1
    assert stats.forwards == 1 + -(-(n - 1) // 3)  # the prefill, then 3 tokens per forward
    torch.manual_seed(5)
    model.layers[model.n_trunk + 2].init_weights(None, 1.0)
    wrong = model.output(model.forward_heads(torch.tensor([[1]]), model.make_cache(1, 1, heads=3))[2]).argmax()
    assert wrong.item() != greedy[0][0]
    spec, stats = speculative_decode(model, prompts, n)
    assert spec == greedy and stats.forwards == 1 + -(-(n - 1) // 2)
