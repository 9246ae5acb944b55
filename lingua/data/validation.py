"""Validation batches for bits per byte: a source's `<source>.val.jsonl` (or the `val` split of its token shards)
packed as in training, every token scored once.

Kept apart from the training loader (lingua/data/loader.py): no mixing, shuffling or resumable state, but padding and a mask
for the last sequence, and the UTF-8 byte count of the text each batch covers.
"""

import os
from typing import Optional

import numpy as np

from lingua.data.jsonl import read_lines
from lingua.data.streams import segment_positions
from lingua.data.tokenizer import TokenizerArgs, build_tokenizer, encode_array
from lingua.data.tokens import TokenDocs, resolve_format
from lingua.errors import LinguaError


def val_documents(root_dir: str, source: str, tokenizer, add_bos: bool, add_eos: bool, data_format: str = "jsonl",
                  tokenizer_args: Optional[TokenizerArgs] = None):
    """(tokens, UTF-8 bytes of the text) of every validation document of `source`, in order, from the token shards'
    val split when data_format (jsonl | tokens | auto) and tokenizer_args say so, else from the jsonl file."""
    manifest = None
    if tokenizer_args is not None:
        manifest = resolve_format(data_format, root_dir, source, tokenizer_args, add_bos, add_eos, split="val")
    if manifest is not None:
        yield from TokenDocs(source, manifest, split="val").documents()
        return
    path = os.path.join(root_dir, source, f"{source}.val.jsonl")
    if not os.path.isfile(path):
        raise LinguaError(f"no validation file for source '{source}': {path}")
    if isinstance(tokenizer, TokenizerArgs):
        tokenizer = build_tokenizer(tokenizer.name, tokenizer.path)
    for text, _ in read_lines(path, "validation file"):
        yield encode_array(tokenizer, text, add_bos, add_eos).astype(np.int64), \
            len(text.encode("utf-8"))


def val_iterator(root_dir, source: str, tokenizer, seq_len: int, batch_size: int, max_docs: Optional[int] = None,
                 add_bos: bool = True, add_eos: bool = True, dp_rank: int = 0, dp_size: int = 1,
                 data_format: str = "jsonl", tokenizer_args: Optional[TokenizerArgs] = None):
    """Yield (batch, n_bytes) over `<root_dir>/<source>/<source>.val.jsonl`, or the val split of its token shards
    (data_format tokens or auto, with the tokenizer_args the shards must match; see val_documents) (root_dir: a path
    or a DataArgs; tokenizer: a tokenizer or a TokenizerArgs), reading documents i % dp_size == dp_rank among the
    first max_docs.

    batch: `input`, `target`, `tok_idx`, `mask`, each [B, S] int64. Documents are packed as in training (stride S);
    the last sequence and batch are padded and `mask` is 1 exactly on real targets, so every token but the very first
    (a BOS when add_bos) is scored exactly once. n_bytes: UTF-8 bytes of the documents that start in the batch; summed
    over the iterator it is the size of all the text, so bits per byte = sum of masked target NLLs (nats) / (ln 2 *
    total bytes)."""
    if isinstance(tokenizer, TokenizerArgs):
        tokenizer_args = tokenizer_args or tokenizer
    root_dir = getattr(root_dir, "root_dir", root_dir)
    docs = val_documents(root_dir, source, tokenizer, add_bos, add_eos, data_format, tokenizer_args)
    S = seq_len

    def sequences():
        tokens, starts, pending = np.empty(0, dtype=np.int64), np.empty(0, dtype=bool), 0
        for i, (doc, n_bytes) in enumerate(docs):
            if max_docs is not None and i >= max_docs:
                break
            if i % dp_size != dp_rank:
                continue
            flags = np.zeros(len(doc), dtype=bool)
            flags[:1] = True
            tokens, starts = np.concatenate([tokens, doc]), np.concatenate([starts, flags])
            pending += n_bytes
            while len(tokens) >= S + 1:
                yield tokens[: S + 1], segment_positions(starts[:S]), np.ones(S, dtype=np.int64), pending
                tokens, starts, pending = tokens[S:], starts[S:], 0
        if len(tokens) > 1:  # the tail: pad, mask the padding
            n = len(tokens) - 1
            seq = np.zeros(S + 1, dtype=np.int64)
            seq[: n + 1] = tokens
            flags = np.zeros(S, dtype=bool)
            flags[:n] = starts[:n]
            flags[n] = True  # the padding is a segment of its own (n < S: a full sequence left the loop above)
            mask = np.zeros(S, dtype=np.int64)
            mask[:n] = 1
            yield seq, segment_positions(flags), mask, pending

    rows = []
    for row in sequences():
        rows.append(row)
        if len(rows) == batch_size:
            yield _val_batch(rows, S), sum(r[3] for r in rows)
            rows = []
    if rows:
        n_bytes = sum(r[3] for r in rows)
        while len(rows) < batch_size:  # keep shapes static: padded rows are fully masked
            rows.append((np.zeros(S + 1, dtype=np.int64), np.arange(S), np.zeros(S, dtype=np.int64), 0))
        yield _val_batch(rows, S), n_bytes


def _val_batch(rows, S: int) -> dict:
    tokens = np.stack([r[0] for r in rows])
    return {"input": tokens[:, :S], "target": tokens[:, 1: S + 1], "tok_idx": np.stack([r[1] for r in rows]),
            "mask": np.stack([r[2] for r in rows])}
