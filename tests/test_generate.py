"""Generation: the KV cache against re-running the full sequence, batches of unequal prompts, sampling controls."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from lingua.errors import ConfigError, LinguaError
from lingua.eval.generate import Generator, GeneratorArgs, sample_next
from lingua.models.kv_cache import KVCache
from lingua.models.transformer.model import Transformer, TransformerArgs
from tests.conftest import ROOT

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,:!?ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class CharTokenizer:
    """One token per character of ALPHABET after BOS (0) and EOS (1): lossless, so ids can be compared as text."""

    bos_id, eos_id, n_words = 0, 1, len(ALPHABET) + 2

    def encode(self, text, add_bos=True, add_eos=True):
        return [self.bos_id] * add_bos + [ALPHABET.index(c) + 2 for c in text] + [self.eos_id] * add_eos

    def decode(self, ids):
        return "".join(ALPHABET[i - 2] for i in ids if i >= 2)


TOK = CharTokenizer()
PROMPTS = ["the king", "O", "JULIET: my lord, the night is", "a b c"]


def tiny_model(n_kv_heads, vocab_size=TOK.n_words, **kw):
    # init_base_std above the default makes the logits peaked, so greedy choices are far from ties
    args = TransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab_size, max_seqlen=64,
                           multiple_of=16, init_base_std=0.2, **kw)
    return Transformer.build(args, seed=3).eval()


def greedy_by_rerunning(model, prompt: str, max_gen_len: int) -> str:
    """The reference: the plain training forward over the whole sequence, one prompt at a time, argmax each step."""
    ids = TOK.encode(prompt, add_eos=False)
    out = []
    with torch.no_grad():
        for _ in range(max_gen_len):
            logits = model(torch.tensor([ids + out]))[0, -1, : TOK.n_words]
            nxt = int(logits.argmax())
            if nxt == TOK.eos_id:
                break
            out.append(nxt)
    return TOK.decode(out)


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "unequal-batch"])
def test_cached_greedy_equals_rerunning_the_full_sequence(n_kv_heads, prompts):
    model = tiny_model(n_kv_heads)
    completions, stats = Generator(model, TOK, GeneratorArgs(max_gen_len=20, batch_size=4)).generate(prompts)
    assert completions == [greedy_by_rerunning(model, p, 20) for p in prompts]
    # one token per character, plus the EOS of a completion that stopped before max_gen_len
    assert stats.generated_tokens == sum(min(20, len(c) + 1) for c in completions) and stats.tok_per_s > 0


def test_no_cache_path_and_batch_size_do_not_change_greedy_output():
    model = tiny_model(2)
    cached, _ = Generator(model, TOK, GeneratorArgs(max_gen_len=12, batch_size=3)).generate(PROMPTS)
    rerun, _ = Generator(model, TOK, GeneratorArgs(max_gen_len=12, use_cache=False)).generate(PROMPTS)
    one_by_one, _ = Generator(model, TOK, GeneratorArgs(max_gen_len=12, batch_size=1)).generate(PROMPTS)
    assert cached == rerun == one_by_one


def test_cache_is_sized_for_kv_heads_not_query_heads():
    model = tiny_model(1)  # 4 query heads share one KV head
    cache = model.make_cache(bs=2, max_len=10, pad=[0, 3])
    assert isinstance(cache, KVCache)
    assert cache.k[0].shape == cache.v[0].shape == (2, 1, 10, 8)  # (bs, n_kv_heads, max_len, head_dim)
    assert len(cache.k) == model.args.n_layers
    logits = model(torch.randint(2, TOK.n_words, (2, 5)), cache=cache)
    assert logits.shape == (2, 5, TOK.n_words) and cache.len == 5 and torch.isfinite(logits).all()


def test_left_padded_prompt_gets_its_own_positions_and_ignores_padding():
    model = tiny_model(2)
    ids = torch.tensor([TOK.encode("the king", add_eos=False)])
    alone = model(ids)
    padded = torch.cat([torch.full((1, 3), 7), ids], dim=1)  # three padding slots of arbitrary tokens
    cached = model(padded, cache=model.make_cache(1, padded.shape[1], pad=[3]))
    torch.testing.assert_close(cached[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_same_seed_same_samples_different_seed_different():
    model = tiny_model(2)

    def sample(seed):
        args = GeneratorArgs(temperature=1.0, max_gen_len=24, seed=seed, batch_size=2)
        return Generator(model, TOK, args).generate(PROMPTS)[0]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = tiny_model(2)
    greedy, _ = Generator(model, TOK, GeneratorArgs(max_gen_len=16)).generate(PROMPTS)
    top_k, _ = Generator(model, TOK, GeneratorArgs(temperature=1.5, top_k=1, max_gen_len=16)).generate(PROMPTS)
    top_p, _ = Generator(model, TOK, GeneratorArgs(temperature=1.5, top_p=1e-6, max_gen_len=16)).generate(PROMPTS)
    assert top_k == greedy and top_p == greedy


def test_sampling_respects_top_k_and_top_p_supports():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    assert set(sample_next(logits, 1.0, 2, None, g).tolist()) == {0, 1}
    # probabilities ~ .64 .24 .09 .03 .01: a nucleus of 0.8 holds the first two tokens
    assert set(sample_next(logits, 1.0, None, 0.8, g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, None, None, g).tolist()) == {0, 1, 2, 3, 4}


def test_stop_strings_and_eos_end_a_completion():
    model = tiny_model(2)
    full, _ = Generator(model, TOK, GeneratorArgs(max_gen_len=20)).generate(PROMPTS[:2])
    stop = full[0][3:5]
    cut = full[0][: full[0].index(stop)]
    stopped, stats = Generator(model, TOK, GeneratorArgs(max_gen_len=20, stop=[stop, "never!"])).generate(PROMPTS[:2])
    assert stopped[0] == cut and len(stopped[0]) < len(full[0])
    # EOS: make the 5th greedy character the tokenizer's EOS; the completion ends before its first occurrence
    eos_char = full[0][4]
    eos_tok = CharTokenizer()
    eos_tok.eos_id = ALPHABET.index(eos_char) + 2
    ended, stats = Generator(model, eos_tok, GeneratorArgs(max_gen_len=20)).generate(PROMPTS[:1])
    assert ended[0] == full[0][: full[0].index(eos_char)]
    assert stats.generated_tokens == len(ended[0]) + 1  # the EOS counts as generated


def test_vocabulary_beyond_the_tokenizer_is_never_sampled():
    model = tiny_model(2, vocab_size=TOK.n_words + 16)
    with torch.no_grad():
        model.output.weight[TOK.n_words:] = 0
        model.output.weight[TOK.n_words:, 0] = 100.0  # padded ids would win every argmax
    completions, _ = Generator(model, TOK, GeneratorArgs(max_gen_len=8)).generate(["the"])
    assert all(c in ALPHABET for c in completions[0])


def test_bad_arguments_fail_in_one_line():
    model = tiny_model(2)
    with pytest.raises(ConfigError, match="top_p"):
        Generator(model, TOK, GeneratorArgs(top_p=1.5))
    with pytest.raises(LinguaError, match="max_gen_len=64 leaves no room"):
        Generator(model, TOK, GeneratorArgs(max_gen_len=64)).generate(["a"])
    long, _ = Generator(model, TOK, GeneratorArgs(max_gen_len=8, max_prompt_len=4)).generate(["abcdefghij" * 3])
    assert isinstance(long[0], str)


@pytest.fixture(scope="module")
def consolidated_dir(tmp_path_factory):
    """A consolidated checkpoint of a random byte-level model, as `lingua.checkpoint.manager consolidate` writes one."""
    folder = tmp_path_factory.mktemp("gen_ckpt")
    model = tiny_model(2, vocab_size=258)
    torch.save({"model": model.state_dict()}, folder / "consolidated.pth")
    params = {"model": dataclasses.asdict(model.args), "data": {"tokenizer": {"name": "bytes", "path": None}}}
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def test_generate_app_prints_completions_and_throughput(consolidated_dir, tmp_path, capsys):
    from apps.main.generate import cli
    from lingua.data.tokenizer import ByteTokenizer
    from lingua.eval.load import load_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("JULIET: O\n\nthe king\n")
    completions, stats = cli([f"ckpt_dir={consolidated_dir}", "prompt=ROMEO:", f"prompts_file={prompts}",
                              "max_gen_len=10", "batch_size=2"])
    out = capsys.readouterr().out
    model, _, _ = load_model(str(consolidated_dir))
    expected, _ = Generator(model, ByteTokenizer(), GeneratorArgs(max_gen_len=10)).generate(
        ["ROMEO:", "JULIET: O", "the king"])
    assert completions == expected
    assert "=== [1/3] 'ROMEO:'\nROMEO:" + expected[0] in out and "=== [3/3] 'the king'" in out
    assert f"{stats.generated_tokens} tokens for 3 prompt(s)" in out and "tok/s" in out
    # the real command line, in a fresh process
    proc = subprocess.run([sys.executable, "-m", "apps.main.generate", f"ckpt_dir={consolidated_dir}", "prompt=ROMEO:",
                           "max_gen_len=5", "temperature=0.7", "top_k=20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "=== [1/1] 'ROMEO:'" in proc.stdout and "tok/s (batch_size 8, cache on)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "apps.main.generate", f"ckpt_dir={consolidated_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: give prompt=")


@pytest.mark.parametrize("temperature, top_k, expected", [
    (1.0, None, [0.7, 0.2, 0.1]),
    (0.5, None, [0.49 / 0.54, 0.04 / 0.54, 0.01 / 0.54]),  # p ** (1 / T), normalised
    (2.0, None, [v / sum(x ** 0.5 for x in (0.7, 0.2, 0.1)) for v in (0.7 ** 0.5, 0.2 ** 0.5, 0.1 ** 0.5)]),
    (0.5, 2, [0.49 / 0.53, 0.04 / 0.53, 0.0]),
])
def test_samples_follow_the_tempered_distribution(temperature, top_k, expected):
    # 20,000 draws: each frequency's standard deviation is <= 0.0036, so 0.02 is more than 5 of them
    logits = torch.tensor([0.7, 0.2, 0.1]).log().expand(20_000, 3)
    ids = sample_next(logits, temperature, top_k, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).double() / len(ids)
    assert freq.tolist() == pytest.approx(expected, abs=0.02)
