"""Tokenizers (lingua/data/tokenizer.py) and setup/train_tokenizer.py on a small corpus written by the test."""

import base64
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from lingua.data.tokenizer import build_tokenizer, check_vocab_size
from lingua.errors import LinguaError

ROOT = Path(__file__).resolve().parents[1]

WEIRD = [
    "",
    "plain ascii",
    "  two leading spaces,   three inside, trailing  ",
    "\n\nnewlines\n\n\nand\ttabs\r\nand CRLF\r",
    "日本語のテキスト, Ελληνικά, русский, עברית, العربية",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧 family",
    "combining e\u0301 vs precomposed \u00e9; ligature ﬁ; full-width ＡＢＣ; NBSP\u00a0here",
    "sentencepiece's own marker ▁ and ▁▁ twice",
    "control \x00\x01\x7f and line separator \u2028 and BOM \ufeff",
    "<|begin_of_text|> <s> </s> looks like a special token",
    "digits 1234567890 3.14159",
]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "setup" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 400-piece sentencepiece model trained by setup/train_tokenizer.py on a small prepared source."""
    root = tmp_path_factory.mktemp("tok")
    (root / "data" / "toy").mkdir(parents=True)
    line = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\n"
    docs = [f"{line * (1 + k % 5)}Scene {k}. Enter the king.\n  Exeunt {k * 7}." for k in range(300)]
    for name, part in (("toy.chunk.0.jsonl", docs[:150]), ("toy.chunk.1.jsonl", docs[150:280]),
                       ("toy.val.jsonl", docs[280:])):
        (root / "data" / "toy" / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    out = root / "tok" / "toy.model"
    meta = load_script("train_tokenizer").main(["--data_dir", str(root / "data"), "--source", "toy",
                                                "--vocab_size", "400", "--out", str(out)])
    return out, meta


def test_bytes_round_trip_and_ids():
    tok = build_tokenizer("bytes")
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (258, 256, 257)
    for text in WEIRD:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.n_words
        assert tok.decode(ids) == text
        assert tok.encode(text, add_bos=False, add_eos=False) == list(text.encode("utf-8"))
    assert tok.decode([0xE2, 0x96]) == "\ufffd"  # a cut multi-byte character is replaced, not an error


def test_sentencepiece_round_trip(sp_model):
    path, meta = sp_model
    tok = build_tokenizer("sp", str(path))
    assert tok.n_words == 400 and meta["n_words"] == 400 and meta["val_bytes_per_token"] > 1.5
    for text in WEIRD:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.n_words
        assert tok.decode(ids) == text, repr(text)
    # the vocabulary learned newline-bearing pieces: a line break is not one byte token each time
    text = "To be, or not to be, that is the question:\n"
    assert len(tok.encode(text, False, False)) < len(text) / 2


def test_train_tokenizer_is_idempotent(sp_model, capsys):
    path, meta = sp_model
    mtime = path.stat().st_mtime_ns
    data_dir = Path(json.loads(path.with_suffix(".json").read_text())["settings"]["data_dir"])
    again = load_script("train_tokenizer").main(["--data_dir", str(data_dir), "--source", "toy", "--vocab_size", "400",
                                                 "--out", str(path)])
    assert again == meta and path.stat().st_mtime_ns == mtime
    assert "exists with the same settings" in capsys.readouterr().out
    assert path.with_suffix(".vocab").is_file()


def write_tiktoken(path: Path) -> None:
    """A tiny byte-level BPE rank table: the 256 bytes, then a few merges."""
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" t", b" the", b"  ", b"in", b"ing"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


def test_tiktoken_round_trip(tmp_path):
    pytest.importorskip("tiktoken")
    write_tiktoken(tmp_path / "tiny.tiktoken")
    tok = build_tokenizer("tiktoken", str(tmp_path / "tiny.tiktoken"))
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (265, 263, 264)
    for text in WEIRD:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.n_words
        assert tok.decode(ids) == text
    assert len(tok.encode("the the the", False, False)) == 3  # merges are used: 'the', ' the', ' the'


def test_tokenizer_errors_are_one_line(tmp_path):
    (tmp_path / "garbage.model").write_bytes(b"\x00not a model\xff" * 10)
    (tmp_path / "garbage.tiktoken").write_text("not base64 at all\n")
    cases = [
        (("sp", str(tmp_path / "missing.model")), "sentencepiece model not found: .*missing.model"),
        (("sp", str(tmp_path / "garbage.model")), "cannot load sentencepiece model .*garbage.model"),
        (("sp", None), "tokenizer.name 'sp' needs tokenizer.path"),
        (("gpt2", None), "unknown tokenizer.name 'gpt2'"),
    ]
    if importlib.util.find_spec("tiktoken"):
        cases += [
            (("tiktoken", str(tmp_path / "missing.tiktoken")), "tiktoken BPE file not found"),
            (("tiktoken", str(tmp_path / "garbage.tiktoken")), "cannot load tiktoken BPE file .*garbage.tiktoken"),
        ]
    for (name, path), message in cases:
        with pytest.raises(LinguaError, match=message) as e:
            build_tokenizer(name, path)
        assert "\n" not in str(e.value)


def test_vocab_larger_than_model():
    tok = build_tokenizer("bytes")
    check_vocab_size(tok, 258)
    with pytest.raises(LinguaError, match="tokenizer has 258 tokens but model.vocab_size is 256"):
        check_vocab_size(tok, 256)


def test_a_long_document_is_encoded_in_pieces_with_memory_bounded_by_its_tokens(tmp_path):
    """encode_array streams a text over ENCODE_PIECE_CHARS (pieces end at newlines): the same tokens as one encode for
    the bytes tokenizer, BOS/EOS once, and a 12 MB document no longer costs Python lists of every token id."""
    import subprocess
    import sys

    from lingua.data.tokenizer import ENCODE_PIECE_CHARS, ByteTokenizer, encode_array

    text = ("naïve line of text\n" * (ENCODE_PIECE_CHARS // 10))
    tok = ByteTokenizer()
    ids = encode_array(tok, text)
    assert ids.dtype == np.int32 and ids.tolist() == tok.encode(text)
    assert (ids == tok.bos_id).sum() == 1 and (ids == tok.eos_id).sum() == 1
    code = ("import resource, sys; from lingua.data.tokenizer import ByteTokenizer, encode_array; t = 'x' * 99 + '\\n'; "
            "text = t * 120_000; r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "ids = encode_array(ByteTokenizer(), text); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024, len(ids))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    growth_mb, n = out.stdout.split()
    assert int(n) == 12_000_002 and float(growth_mb) < 200  # 12M tokens: 48 MB as int32 (Python lists: ~430 MB)
