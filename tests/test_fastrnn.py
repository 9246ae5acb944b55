"""apps/fastRNN: the scans against a plain loop, the step form against the parallel form (document resets and left
padding included), generation, FLOP counting, and each cell through the shared train loop, resume and eval app."""

import json

import pytest
import torch
import torch.nn.functional as F

from apps.fastRNN.model import (
    CELLS,
    FASTRNN_SPEC,
    FastRNN,
    FastRNNArgs,
    flops_per_token,
)
from apps.fastRNN.scan import conv_step, linear_scan, log_scan, step
from apps.main.eval import main as eval_main
from apps.main.generate import cli as generate_main
from lingua.models.layers import causal_conv
from lingua.train.loop import train_args_cls

FastRNNTrainArgs = train_args_cls(FASTRNN_SPEC)
from apps.main.eval import EvalAppArgs
from lingua.args import load_config
from lingua.checkpoint.manager import list_checkpoints
from lingua.data.tokenizer import ByteTokenizer
from lingua.errors import ConfigError
from lingua.eval.generate import Generator, GeneratorArgs
from lingua.eval.load import load_model
from lingua.train.loop import train
from tests.conftest import (
    ROOT,
    assert_bits_per_byte,
    assert_same_weights,
    cut_at,
    final_weights,
    greedy_ids,
    read_jsonl,
    tiny_overrides,
)
from tests.dist_helpers import torchrun

ATOL = 1e-5  # fp32: the parallel and step forms sum in different orders; measured differences are ~2e-6 on logits ~1


def tiny_model(cell: str, scan: str = "odd_even", seed: int = 0, **kw) -> FastRNN:
    args = FastRNNArgs(cell=cell, scan=scan, dim=32, n_layers=2, n_heads=2, multiple_of=16, vocab_size=258,
                       max_seqlen=128, **kw)
    with torch.device("meta"):
        model = FastRNN(args)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()


def packed_batch(seqlen=24, seed=1):
    """Three rows of tokens and their tok_idx: one document; documents from 7; from 3, 10 and 11 (a 1-token one)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (3, seqlen), generator=gen)
    tok_idx = torch.arange(seqlen).repeat(3, 1)
    for row, start in ((1, 7), (2, 3), (2, 10), (2, 11)):
        tok_idx[row, start:] = torch.arange(seqlen - start)
    return tokens, tok_idx


def loop_reference(a, b, reset, valid=None, h0=None):
    """h_t = a_t h_{t-1} + b_t one step at a time, in float64."""
    a, b = a.double(), b.double()
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.double()
    out = []
    for t in range(a.shape[1]):
        keep = (~reset[:, t, None]).double()
        bt = b[:, t] if valid is None else b[:, t] * valid[:, t, None]
        h = keep * a[:, t] * h + bt
        out.append(h)
    return torch.stack(out, dim=1)


def scan_inputs(seqlen=37, hidden=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    log_a = -F.softplus(torch.randn(2, seqlen, hidden, generator=gen))
    log_b = torch.randn(2, seqlen, hidden, generator=gen)
    reset = torch.zeros(2, seqlen, dtype=torch.bool)
    reset[:, 0] = True
    reset[0, [5, 6, 11]] = True
    reset[1, 9] = True
    return log_a, log_b, reset


# ---------------------------------------------------------------- the scans


@pytest.mark.parametrize("impl", ["odd_even", "heinsen"])
def test_log_scan_matches_a_loop_with_resets_padding_and_a_carried_state(impl):
    log_a, log_b, reset = scan_inputs()  # an odd length exercises the odd-even recursion's leftover item
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, :4] = False  # left padding: b = 0 there
    h0 = torch.rand(2, 5)
    reset[1, 0] = False  # row 1 continues from h0 (through its padding), row 0 drops it
    got = log_scan(log_a, log_b, reset, valid, h0, impl=impl)
    ref = loop_reference(log_a.exp(), log_b.exp(), reset, valid, h0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_linear_scan_matches_a_loop_for_any_sign():
    log_a, _, reset = scan_inputs()
    b = torch.randn(2, 37, 5)
    h0 = torch.randn(2, 5)
    reset[1, 0] = False
    ref = loop_reference(log_a.exp(), b, reset, h0=h0)
    torch.testing.assert_close(linear_scan(log_a.exp(), b, reset, h0=h0).double(), ref, rtol=1e-5, atol=1e-6)


def test_scan_gradients_match_autograd_through_the_loop():
    """The hand-written backward (a reverse scan) against float64 autograd through `loop_reference`."""
    log_a, log_b, reset = scan_inputs(seqlen=19, hidden=3)
    for space in ("log", "linear"):
        la, lb = log_a.clone().requires_grad_(), log_b.clone().requires_grad_()
        weight = torch.randn(2, 19, 3)
        if space == "log":
            got = log_scan(la, lb, reset)
        else:
            got = linear_scan(la.exp(), lb, reset)
        (got * weight).sum().backward()
        la64, lb64 = log_a.double().requires_grad_(), log_b.double().requires_grad_()
        ref = loop_reference(la64.exp(), lb64.exp() if space == "log" else lb64, reset)
        (ref * weight.double()).sum().backward()
        torch.testing.assert_close(la.grad.double(), la64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lb.grad.double(), lb64.grad, rtol=1e-4, atol=1e-5)


def test_step_is_one_token_of_the_scan():
    log_a, log_b, reset = scan_inputs(seqlen=12)
    h = torch.zeros(2, 5)
    for t in range(12):
        h = step(log_a[:, t].exp(), log_b[:, t].exp(), reset[:, t], None, h)
        torch.testing.assert_close(h, log_scan(log_a, log_b, reset)[:, t])


def test_causal_conv_is_conv1d_within_documents_and_steps_agree():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 15, 6, generator=gen), torch.randn(6, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
    plain = torch.arange(15).repeat(2, 1)
    out, _ = causal_conv(x, weight, bias, plain)
    ref = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=3, groups=6)[..., :15].transpose(1, 2)
    torch.testing.assert_close(out, ref)
    tok_idx = plain.clone()
    tok_idx[0, 6:] = torch.arange(9)  # a document starts at 6: its first outputs see none of x[:, :6]
    out, history = causal_conv(x, weight, bias, tok_idx)
    alone, _ = causal_conv(x[:1, 6:], weight, bias, plain[:1, :9])
    torch.testing.assert_close(out[:1, 6:], alone)
    buf = torch.zeros(2, 3, 6)
    for t in range(15):
        y, buf = conv_step(x[:, t], weight, bias, tok_idx[:, t] == 0, buf)
        torch.testing.assert_close(y, out[:, t])
    torch.testing.assert_close(buf, history)


# ---------------------------------------------------------------- the model: parallel form == step form


@pytest.mark.parametrize("cell, scan", [("mingru", "odd_even"), ("mingru", "heinsen"), ("minlstm", "odd_even"),
                                        ("minlstm", "heinsen"), ("hawk", "odd_even")])
def test_step_form_equals_parallel_form_on_packed_documents(cell, scan):
    model = tiny_model(cell, scan)
    tokens, tok_idx = packed_batch()
    with torch.no_grad():
        parallel = model(tokens, tok_idx=tok_idx)  # (3, 24, vocab)
        cache = model.make_cache(3, 24, [0, 0, 0], "cpu", torch.float32)
        steps = torch.cat([model(tokens[:, t:t + 1], tok_idx=tok_idx[:, t:t + 1], cache=cache) for t in range(24)], 1)
        cache = model.make_cache(3, 24, [0, 0, 0], "cpu", torch.float32)  # prefill 9 in parallel, then 15 in steps
        mixed = [model(tokens[:, :9], tok_idx=tok_idx[:, :9], cache=cache)]
        mixed += [model(tokens[:, t:t + 1], tok_idx=tok_idx[:, t:t + 1], cache=cache) for t in range(9, 24)]
    assert cache.len == 24
    torch.testing.assert_close(steps, parallel, rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.cat(mixed, 1), parallel, rtol=0, atol=ATOL)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_documents_do_not_see_each_other(cell):
    model = tiny_model(cell)
    tokens, tok_idx = packed_batch()
    with torch.no_grad():
        packed = model(tokens, tok_idx=tok_idx)
        for row, start, end in ((1, 7, 24), (2, 3, 10), (2, 11, 24)):
            alone = model(tokens[row:row + 1, start:end])  # tok_idx None: one document from position 0
            torch.testing.assert_close(packed[row:row + 1, start:end], alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("cell", CELLS)
def test_left_padding_keeps_the_state_at_zero(cell):
    model = tiny_model(cell)
    tokens, _ = packed_batch()
    prompt_a, prompt_b = tokens[0, :6], tokens[1, :2]
    batch = torch.stack([prompt_a, torch.cat([torch.zeros(4, dtype=torch.long), prompt_b])])  # row 1: 4 pads
    with torch.no_grad():
        cache = model.make_cache(2, 10, [0, 4], "cpu", torch.float32)
        model(batch[:, :4], cache=cache)  # row 1 has seen only padding
        for state in cache.layers:
            assert not state.h[1].any() and (state.conv is None or not state.conv[1].any())
        logits = model(batch[:, 4:], cache=cache)  # (2, 2, vocab)
        torch.testing.assert_close(logits[1], model(prompt_b[None])[0], rtol=0, atol=ATOL)
        torch.testing.assert_close(logits[0], model(prompt_a[None])[0, 4:], rtol=0, atol=ATOL)


class IdTokenizer(ByteTokenizer):
    """Bytes in, ids out: completions compare token for token (a random model emits bytes that are no valid UTF-8)."""

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


@pytest.mark.parametrize("cell", CELLS)
def test_batched_generation_equals_each_prompt_alone(cell):
    model = tiny_model(cell)
    prompts = ["ROMEO: hath", "a", "JULIET: thou art my lord and"]

    def gen(batch_size, use_cache=True, subset=prompts):
        args = GeneratorArgs(max_gen_len=10, batch_size=batch_size, use_cache=use_cache)
        return Generator(model, IdTokenizer(), args).generate(subset)[0]

    together = gen(3)
    assert together == [gen(1, subset=[p])[0] for p in prompts]
    assert together == gen(3, use_cache=False)  # the whole sequence re-run each step, prefilled in parallel
    assert all(len(c.split()) >= 1 for c in together)


# ---------------------------------------------------------------- counting and config


def test_flops_per_token_is_six_times_the_matmul_parameters():
    for cell in CELLS:
        for tied in (True, False):
            model = tiny_model(cell, weight_tying=tied)
            args = model.args
            n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied: counted once
            n -= args.vocab_size * args.dim  # the embedding table is a lookup...
            if tied:
                n += args.vocab_size * args.dim  # ...but the output projection is a matmul either way
            assert flops_per_token(args, 32) == flops_per_token(args, 4096) == 6 * n


@pytest.mark.parametrize("override, message", [
    ("model.cell=gru", "model.cell='gru' is not one of mingru, minlstm, hawk"),
    ("model.scan=cumsum", "model.scan='cumsum' is not one of odd_even, heinsen"),
    ("model.cell=hawk model.scan=heinsen", "model.scan=heinsen works in log space"),
    ("model.cell=hawk model.n_heads=5", "model.n_heads=5 does not divide the recurrent width 256"),
])
def test_bad_model_config_is_a_one_line_error(override, message):
    """The model's args check themselves: the config does not load."""
    with pytest.raises(ConfigError) as e:
        load_config(FastRNNTrainArgs, ["config=apps/fastRNN/configs/debug.yaml", *override.split()])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cell", CELLS)
def test_debug_config_loads_for_every_cell(cell):
    args = load_config(FastRNNTrainArgs, [f"config={ROOT}/apps/fastRNN/configs/debug.yaml", f"model.cell={cell}"])
    assert args.model.cell == cell and args.data.tokenizer.path == "tokenizers/shakespeare_sp4096.model"
    with torch.device("meta"):
        FastRNN(args.model)


# ---------------------------------------------------------------- the shared loop: train, resume, evaluate, generate


def overrides(corpus, dump_dir, cell, **extra) -> list[str]:
    """conftest's tiny run with a recurrent model (dim 32, 2 layers, bytes); block_causal is a transformer key."""
    return [o for o in tiny_overrides(corpus, dump_dir, model__cell=cell, **extra) if not o.startswith("model.mask=")]








def eval_row(tmp_path, ckpt, *extra) -> dict:
    """The eval app's alpha results as an eval row ({"alpha/bpb": ...}), checked against results.json."""
    args = load_config(EvalAppArgs, [f"ckpt_dir={ckpt}", f"dump_dir={tmp_path / 'eval'}", "validation.max_docs=4",
                                     *extra])
    results = eval_main(args)
    on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert on_disk["validation"] == results["validation"]
    return {f"alpha/{k}": v for k, v in results["validation"]["alpha"].items()}


def bpb_of(tmp_path, ckpt, *extra) -> float:
    return eval_row(tmp_path, ckpt, *extra)["alpha/bpb"]


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_trains_resumes_bit_identically_and_evaluates(cell, tiny_corpus, tmp_path, capsys):
    full = tmp_path / "full"
    result = train(load_config(FastRNNTrainArgs, overrides(tiny_corpus, full, cell, steps=8, optim__lr=1e-2)),
                   FASTRNN_SPEC)
    assert result == {"step": 8, "status": "done", "loss": result["loss"]}
    rows = read_jsonl(full / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, (rows[0]["loss"], rows[-1]["loss"])  # from ln(258) = 5.55
    assert [p.name for p in list_checkpoints(full / "checkpoints")] == ["0000000004", "0000000008"]

    cut = cut_at(full, tmp_path / "cut", 4)  # "interrupted" after step 4: the same command resumes it
    train(load_config(FastRNNTrainArgs, overrides(tiny_corpus, cut, cell, steps=8, optim__lr=1e-2)), FASTRNN_SPEC)
    assert [r["loss"] for r in read_jsonl(cut / "metrics.jsonl")] == [r["loss"] for r in rows]
    assert_same_weights(final_weights(full), final_weights(cut))

    row = read_jsonl(full / "metrics.eval.jsonl")[-1]
    assert bpb_of(tmp_path, full / "checkpoints" / "0000000008") == pytest.approx(row["alpha/bpb"], rel=1e-6)
    assert_bits_per_byte(row, tiny_corpus, "alpha", max_docs=4)

    capsys.readouterr()
    completions, stats = generate_main([f"ckpt_dir={full}", "prompt=ROMEO:", "max_gen_len=8", "batch_size=2"])
    assert "ROMEO:" in capsys.readouterr().out
    model, _, tok = load_model(str(full))
    ids = greedy_ids(model, tok, "ROMEO:", 8)  # the plain forward (the scan, no state carried) over the sequence
    assert stats.generated_tokens == len(ids) and completions == [tok.decode([i for i in ids if i != tok.eos_id])]


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["hawk"])
def test_fsdp_two_processes_train_resume_and_evaluate(cell, tiny_corpus, tmp_path):
    """2-process FSDP (gloo) through the same loop; a resumed run ends with bit-identical weights."""
    common = dict(steps=6, checkpoint__dump__every=3, distributed__dp_shard=2, data__batch_size=2, eval__at_end=False)
    full = tmp_path / "full"
    torchrun(2, overrides(tiny_corpus, full, cell, **common), module="apps.fastRNN.train")
    rows = read_jsonl(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["loss"] < rows[0]["loss"]
    cut = cut_at(full, tmp_path / "cut", 3)
    torchrun(2, overrides(tiny_corpus, cut, cell, **common), module="apps.fastRNN.train")
    assert [r["loss"] for r in read_jsonl(cut / "metrics.jsonl")] == [r["loss"] for r in rows]
    assert_same_weights(final_weights(full), final_weights(cut))
    assert_bits_per_byte(eval_row(tmp_path, full / "checkpoints" / "0000000006"), tiny_corpus, "alpha", max_docs=4)
