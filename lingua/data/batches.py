"""What the loader computes, apart from its state bookkeeping: the data arguments (`DataArgs`), a rank's `Plan`
(its streams, per micro-batch), and the generator of its batches (`rank_batches`, `make_batch`). Both the
synchronous loader (lingua/data/loader.py) and its child process (lingua/data/loader_async.py) run these.
"""

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from lingua.data.jsonl import JsonlDocs
from lingua.data.streams import (
    rows_yielded,
    stream_fills,
)
from lingua.data.tokenizer import TokenizerArgs, build_tokenizer
from lingua.data.tokens import TokenDocs
from lingua.errors import LinguaError

logger = logging.getLogger(__name__)


@dataclass
class DataArgs:
    root_dir: Optional[str] = None  # the data folder (setup/prepare_data.py): one subfolder per source
    sources: dict[str, float] = field(default_factory=dict)  # source folder name -> sampling weight (per document)
    format: str = "auto"  # jsonl | tokens | auto (token shards when their manifest matches the tokenizer)
    batch_size: int = 2  # per data-parallel rank and micro-batch
    seq_len: int = 256  # tokens per row
    n_views: int = 2  # 1 input view + (n_views - 1) target views (multi-token prediction)
    seed: int = 42  # seeds the data order (document shuffle and source sampling)
    n_streams: Optional[int] = None  # logical streams of the data order; None: the global batch in rows
    add_bos: bool = True  # start each document with the BOS token
    add_eos: bool = True  # end each document with the EOS token
    load_async: bool = True  # build batches in a child process (lingua/data/loader_async.py)
    prefetch_size: int = 64  # shuffle buffer of each stream, in sequences
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    skip_bad_lines: bool = False  # count and log malformed lines instead of stopping
    reset_state: bool = False  # a checkpoint's loader state this lingua cannot resume: restart the data order


@dataclass
class Plan:
    """Everything the pipeline needs besides its state; picklable (crosses into the async process)."""

    args: DataArgs
    sources: dict[str, dict]
    dp_rank: int
    dp_size: int
    n_streams: int

    def cycle(self) -> list[list[int]]:
        """This rank's streams, per micro-batch: micro-batch t reads row i from stream cycle[t % len][i]."""
        b, rows = self.args.batch_size, self.args.batch_size * self.dp_size
        return [[q * rows + self.dp_rank * b + i for i in range(b)] for q in range(self.n_streams // rows)]

    def own(self) -> list[int]:
        return [s for ids in self.cycle() for s in ids]


def open_stores(plan: Plan, tokenizer) -> dict:
    a, stores = plan.args, {}
    for name, spec in plan.sources.items():
        if spec["format"] == "tokens":
            stores[name] = TokenDocs(name, spec["manifest"])
        else:
            stores[name] = JsonlDocs(name, spec["files"], tokenizer, a.add_bos, a.add_eos, a.skip_bad_lines)
    return stores


def make_batch(rows: np.ndarray, tok_idx: np.ndarray, seq_len: int, n_views: int) -> dict:
    """The int64 batch from rows [..., B, S + n_views - 1] and tok_idx [..., B, S] (any leading dimensions)."""
    if n_views == 2:
        target = rows[..., 1: seq_len + 1]  # (..., B, S)
    else:
        target = np.stack([rows[..., v: v + seq_len] for v in range(1, n_views)], axis=-1)  # (..., B, S, n_views - 1)
    return {"input": rows[..., :seq_len].astype(np.int64), "target": target.astype(np.int64),
            "tok_idx": tok_idx.astype(np.int64)}


class _Group:
    """The streams of one cycle position: they always stand at the same row of the same fill (each micro-batch that
    reads them takes one row from each), so a batch is one gather from their stacked fills."""

    def __init__(self, streams: list[int], fills: list, skip: int, seq_len: int, row_len: int):
        self.streams, self.fills, self.next = tuple(streams), fills, skip
        self.S, self.L, self.lanes = seq_len, row_len, np.arange(len(streams))
        self.load()

    def load(self) -> None:
        self.current = [next(f) for f in self.fills]
        P, S, L = len(self.current[0].order), self.S, self.L
        # row q of a fill is block[q * S: q * S + L]: overlapping views of the block, copied once into the stack
        self.rows = np.stack([np.ndarray((P, L), np.int32, f.block, strides=(4 * S, 4)) for f in self.current])
        self.tok_idx = np.stack([f.tok_idx for f in self.current])  # (B, P, S)
        self.order = np.stack([f.order for f in self.current])  # (B, P)
        self.starts = tuple(f.start for f in self.current)
        self.ends = tuple(f.end for f in self.current)

    def take(self, with_refs: bool) -> tuple:
        """(rows [B, L], tok_idx [B, S], position after (see lingua.data.streams.group_states), refs or None) of the
        next batch."""
        P, j = self.order.shape[1], self.next
        if j == P:
            self.load()
            j = 0
        pick = (self.lanes, self.order[:, j])  # the fill row each stream yields now
        number = self.current[0].number
        after = (self.streams, number + 1, 0, self.ends) if j + 1 == P else (self.streams, number, j + 1, self.starts)
        refs = [f.refs[f.order[j]] for f in self.current] if with_refs else None
        self.next = j + 1
        return self.rows[pick], self.tok_idx[pick], after, refs


def rank_batches(plan: Plan, states: dict[int, dict], tokenizer=None, with_refs: bool = False) -> Iterator[tuple]:
    """Yield (rows [B, S + n_views - 1] int32, tok_idx [B, S] int32, position after) (plus each row's document
    ranges when with_refs) of this rank, forever: `make_batch` makes the batch, lingua.data.streams.group_states the
    states of the batch's streams from the position. `states` holds every stream of this rank."""
    a = plan.args
    tokenizer = tokenizer or build_tokenizer(a.tokenizer.name, a.tokenizer.path)
    stores = open_stores(plan, tokenizer)
    cycle = plan.cycle()
    t = sum(rows_yielded(states[s], a.prefetch_size) for s in plan.own()) // a.batch_size  # micro-batches so far
    groups = {}
    try:
        while True:
            q = t % len(cycle)
            if q not in groups:  # built on first use: a fill costs time and memory
                ids = cycle[q]
                if len({(states[s]["fill"], states[s]["next"]) for s in ids}) != 1:
                    raise LinguaError(f"data loader state: streams {ids} of one micro-batch row group stand at "
                                      f"different positions (a state edited by hand, or from another lingua?)")
                fills = [stream_fills(stores, a, s, plan.n_streams, states[s], with_refs) for s in ids]
                groups[q] = _Group(ids, fills, states[ids[0]]["next"], a.seq_len, a.seq_len + a.n_views - 1)
            rows, tok_idx, after, refs = groups[q].take(with_refs)
            t += 1
            yield (rows, tok_idx, after, refs) if with_refs else (rows, tok_idx, after)
    finally:
        for store in stores.values():
            store.close()
