"""Tokenizers: `build_tokenizer(name, path)` returns one of three with the same small interface.

- `bytes`: the 256 byte values plus BOS (256) and EOS (257); needs no file, so every test and debug run can use it.
- `sp`: a sentencepiece model file (train one with `setup/train_tokenizer.py`).
- `tiktoken`: a local `.tiktoken` BPE rank file (base64 token, rank per line), e.g. Llama 3's; optional extra.

Interface: `encode(text, add_bos=True, add_eos=True) -> list[int]`, `decode(ids) -> str` (BOS/EOS are skipped),
`n_words` (vocabulary size, specials included), `bos_id`, `eos_id`. For all three `decode(encode(x)) == x` for any
Unicode string `x`: the bytes tokenizer is lossless by construction, the sentencepiece models we train use identity
normalisation and byte fallback, and tiktoken is byte-level BPE.
"""

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from lingua.errors import LinguaError, require

TOKENIZERS = ("bytes", "sp", "tiktoken")


@dataclass
class TokenizerArgs:
    name: str = "bytes"  # bytes | sp | tiktoken
    path: Optional[str] = None  # the tokenizer model file (sp, tiktoken); bytes needs none


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are byte values, then BOS and EOS."""

    n_words = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids) -> str:
        # A slice of a valid stream can cut a multi-byte character: replace it rather than fail.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A sentencepiece model. Literal U+2581 ('▁', sentencepiece's space marker) is encoded as byte-fallback pieces,
    because the model would otherwise decode it as a space."""

    SPACE_MARK = "\u2581"

    def __init__(self, path: str):
        import sentencepiece as spm
        _check_file(path, "sentencepiece model")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise LinguaError(f"cannot load sentencepiece model {path}: {_one_line(e)}") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise LinguaError(f"sentencepiece model {path} has no BOS/EOS pieces (train it with bos_id/eos_id set)")
        mark_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in self.SPACE_MARK.encode("utf-8")]
        # Without byte fallback the pieces are missing (piece_to_id returns unk): leave '▁' to the model then.
        self._mark_ids = mark_bytes if self.sp.unk_id() not in mark_bytes else None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        if self._mark_ids is None or self.SPACE_MARK not in text:
            ids = self.sp.encode(text)
        else:
            ids = []
            for i, part in enumerate(text.split(self.SPACE_MARK)):
                if i:
                    ids += self._mark_ids
                ids += self.sp.encode(part)
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if i != self.bos_id and i != self.eos_id])


class TiktokenTokenizer:
    """A local tiktoken BPE rank file; BOS and EOS are appended after the ranks."""

    # Llama 3's pre-tokenisation pattern (also a good default for any byte-level BPE).
    PATTERN = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )

    def __init__(self, path: str):
        tiktoken = require("tiktoken", "tiktoken")
        from tiktoken.load import load_tiktoken_bpe

        _check_file(path, "tiktoken BPE file")
        try:
            ranks = load_tiktoken_bpe(path)
        except (OSError, ValueError) as e:
            raise LinguaError(f"cannot load tiktoken BPE file {path}: {_one_line(e)}") from None
        if not ranks:
            raise LinguaError(f"tiktoken BPE file {path} is empty")
        n = max(ranks.values()) + 1
        self.bos_id, self.eos_id, self.n_words = n, n + 1, n + 2
        self.enc = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=self.PATTERN,
            mergeable_ranks=ranks,
            special_tokens={"<|begin_of_text|>": self.bos_id, "<|end_of_text|>": self.eos_id},
        )

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        # encode_ordinary: special-token strings inside documents are plain text, never control tokens.
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if i != self.bos_id and i != self.eos_id])


ENCODE_PIECE_CHARS = 1 << 20  # long documents are encoded a piece of about this many characters at a time


def encode_array(tokenizer, text: str, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    """`tokenizer.encode(text)` as an int32 array, streaming long documents: a text over ENCODE_PIECE_CHARS is
    encoded in pieces that end at a newline, so memory grows with the tokens (4 bytes each), not with Python lists of
    them (~36 bytes each: a 50 MB document once took 2.5 GB). Pieces are tokenized on their own, so a token never
    spans the newline a piece ends at; every path that tokenizes a training document (the jsonl loader, validation,
    setup/tokenize_data.py) goes through here, so they agree."""
    if len(text) <= ENCODE_PIECE_CHARS:
        return np.asarray(tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos), dtype=np.int32)
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + ENCODE_PIECE_CHARS) + 1 or len(text)  # after the next newline, or the end
        pieces.append(np.asarray(tokenizer.encode(text[start:end], add_bos=add_bos and start == 0,
                                                  add_eos=add_eos and end == len(text)), dtype=np.int32))
        start = end
    return np.concatenate(pieces)


def build_tokenizer(name: str, path: Optional[str] = None):
    """The tokenizer called `name` ('bytes', 'sp' or 'tiktoken'); `sp` and `tiktoken` read their model from `path`."""
    if name == "bytes":
        return ByteTokenizer()
    if name not in TOKENIZERS:
        raise LinguaError(f"unknown tokenizer.name '{name}' (choose from: {', '.join(TOKENIZERS)})")
    if not path:
        raise LinguaError(f"tokenizer.name '{name}' needs tokenizer.path (a model file)")
    return SentencePieceTokenizer(path) if name == "sp" else TiktokenTokenizer(path)


def check_vocab_size(tokenizer, vocab_size: int) -> None:
    """Fail in one line when the tokenizer emits ids the model's embedding cannot hold."""
    if tokenizer.n_words > vocab_size:
        raise LinguaError(
            f"tokenizer has {tokenizer.n_words} tokens but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size >= {tokenizer.n_words}"
        )


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise LinguaError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise LinguaError(f"{what} is not readable: {path}")


def _one_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
