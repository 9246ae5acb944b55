"""The training data loader: the same global batches on any number of data-parallel ranks, resumable on any of them.

Layout read: `<root_dir>/<source>/<source>.chunk.<k>.jsonl` (setup/prepare_data.py), or the token shards of
`<root_dir>/<source>/tokens/` (setup/tokenize_data.py); `data.format: auto` takes the shards when their manifest
matches the tokenizer and BOS/EOS settings (lingua/data/tokens.py). Both give the same batches.

The data order. The data is cut into `n_streams` logical streams (default: the global batch in rows, batch_size x
dp_size x grad_acc_steps). Stream s owns document i of every source when i % n_streams == s, mixes sources by
weight, packs and shuffles its documents on its own, with seeds that depend on (seed, s) only (lingua/data/streams.py).
Global row j, counting rows over all steps, micro-batches and ranks, is the next sequence of stream j % n_streams.
Micro-batch m of step k covers the global rows [t * n * b, (t + 1) * n * b) with t = k * grad_acc_steps + m (n ranks
of batch_size b), and rank r takes rows [t * n * b + r * b, t * n * b + (r + 1) * b). So the sequence of global
batches depends on (data, seed, n_streams, seq_len, n_views, prefetch_size) only, and rank r only ever runs its own
streams. n * b must divide n_streams (one-line error otherwise); with the default, any layout of the same global
batch works.

State. Per stream a few integers (lingua/data/streams.py). `state_dict()` holds this rank's streams; `load_state_dicts`
takes the states of all old ranks and picks this rank's streams, for any new layout of the same n_streams:
nothing is dropped or repeated, and the batches are bit-identical to an uninterrupted run. States of lingua's older
per-rank loader (version 1) are refused with one line; `data.reset_state=true` restarts the data order instead.

Batches are dicts of int64 numpy arrays: `input [B, S]`, `target [B, S]` (`[B, S, n_views - 1]` when n_views > 2, view
v predicting the token v ahead) and `tok_idx [B, S]`, the position of each token inside its document segment: 0 at
each document start and at position 0 of every sequence (a sequence continuing a document starts a new segment).

`DataLoader` runs the pipeline in the trainer's process (load_async=False) or in a spawned child process feeding a
bounded ring of shared-memory slots (load_async=True, lingua/data/loader_async.py). Each batch travels with the position of
the streams it advanced, so `state_dict()` always describes the batches the trainer consumed, never those produced
ahead.
"""

import copy
import logging
import os
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Iterator, Optional

import numpy as np

from lingua.data.jsonl import JsonlDocs, chunk_files
from lingua.data.streams import (
    expected_rows,
    group_states,
    initial_stream_state,
    rows_yielded,
    stream_fills,
)
from lingua.data.tokenizer import TokenizerArgs, build_tokenizer
from lingua.data.tokens import TokenDocs, resolve_format
from lingua.errors import ConfigError, LinguaError

logger = logging.getLogger(__name__)

STATE_VERSION = 2


@dataclass
class DataArgs:
    root_dir: Optional[str] = None
    sources: dict[str, float] = field(default_factory=dict)  # source folder name -> sampling weight (per document)
    format: str = "auto"  # jsonl | tokens | auto (token shards when their manifest matches the tokenizer)
    batch_size: int = 2  # per data-parallel rank and micro-batch
    seq_len: int = 256
    n_views: int = 2  # 1 input view + (n_views - 1) target views (multi-token prediction)
    seed: int = 42
    n_streams: Optional[int] = None  # logical streams of the data order; None: the global batch in rows
    add_bos: bool = True
    add_eos: bool = True
    load_async: bool = True
    prefetch_size: int = 64  # shuffle buffer of each stream, in sequences
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    skip_bad_lines: bool = False  # count and log malformed lines instead of stopping
    reset_state: bool = False  # a checkpoint's loader state this lingua cannot resume: restart the data order


def as_data_args(args) -> DataArgs:
    """Accept a DataArgs, an omegaconf DictConfig of one, or a plain dict."""
    if isinstance(args, DataArgs):
        return args
    if not isinstance(args, dict) and not is_dataclass(args):
        from omegaconf import OmegaConf

        args = OmegaConf.to_container(args, resolve=True)
    d = asdict(args) if is_dataclass(args) else dict(args)
    tok = d.get("tokenizer") or {}
    d["tokenizer"] = tok if isinstance(tok, TokenizerArgs) else TokenizerArgs(**tok)
    return DataArgs(**d)


def validate(args: DataArgs) -> dict[str, dict]:
    """Check the config and the files it names; return {source: {"format": "jsonl", "files": [...]} or
    {"format": "tokens", "manifest": {...}}}."""
    if not args.root_dir:
        raise LinguaError("data.root_dir is not set (the folder written by setup/prepare_data.py)")
    if not os.path.isdir(args.root_dir):
        raise LinguaError(f"data.root_dir '{args.root_dir}' does not exist (run setup/prepare_data.py)")
    if not args.sources:
        raise LinguaError("data.sources is empty: give at least one source, e.g. data.sources={shakespeare: 1.0}")
    for key in ("batch_size", "seq_len", "prefetch_size"):
        if getattr(args, key) < 1:
            raise LinguaError(f"data.{key} must be >= 1, got {getattr(args, key)}")
    if args.seed < 0:
        raise LinguaError(f"data.seed must be >= 0, got {args.seed}")
    if args.n_views < 2:
        raise LinguaError(f"data.n_views must be >= 2 (one input view and at least one target), got {args.n_views}")
    sources = {}
    for name, weight in args.sources.items():
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise LinguaError(f"data.sources.{name}: weight must be > 0, got {weight}")
        if not os.path.isdir(os.path.join(args.root_dir, name)):
            chunk_files(args.root_dir, name)  # raises the unknown-source error, with the sources that exist
        manifest = resolve_format(args.format, args.root_dir, name, args.tokenizer, args.add_bos, args.add_eos)
        sources[name] = ({"format": "tokens", "manifest": manifest} if manifest else
                         {"format": "jsonl", "files": chunk_files(args.root_dir, name)})
    return sources


def resolve_n_streams(args: DataArgs, dp_size: int, grad_acc_steps: int) -> int:
    rows = args.batch_size * dp_size  # one micro-batch over all data-parallel ranks
    n = args.n_streams if args.n_streams is not None else rows * grad_acc_steps
    if n < 1 or n % rows:
        raise ConfigError(f"data.n_streams={n} is not a multiple of data.batch_size x data-parallel ranks = "
                          f"{args.batch_size} x {dp_size} = {rows}: every rank must own whole streams (leave "
                          f"data.n_streams unset for the global batch)")
    return n


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


def traced_batches(args, dp_rank: int = 0, dp_size: int = 1, grad_acc_steps: int = 1) -> Iterator[tuple]:
    """(batch, refs, position after) of a fresh loader, synchronously; refs[row] lists the (source, epoch, document,
    first token, end token) ranges of the row's input tokens: which documents went where (tests, debugging)."""
    with DataLoader(args, dp_rank, dp_size, grad_acc_steps) as loader:
        plan, states, tokenizer = loader.plan, dict(loader._streams), loader.tokenizer
    a = plan.args
    for rows, tok_idx, after, refs in rank_batches(plan, states, tokenizer, with_refs=True):
        yield make_batch(rows, tok_idx, a.seq_len, a.n_views), refs, after


# ---------------------------------------------------------------------------------------------------------------------
# Resuming.

class StateMismatch(LinguaError):
    """A saved loader state this run cannot continue (older lingua, other stream layout): data.reset_state applies."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}; set data.reset_state=true to restart the data order from the beginning")
        self.reason = reason


def restore_streams(states: list[dict], plan: Plan) -> dict[int, dict]:
    """This rank's stream states from the states of all old ranks (any old layout of the same streams)."""
    a = plan.args
    if not states:
        raise LinguaError("load_state_dicts: no data loader states given")
    for s in states:
        if s.get("version") != STATE_VERSION:
            raise StateMismatch(f"data loader state version {s.get('version')} in the checkpoint was written by an "
                                f"older lingua (one data order per rank), which this one cannot continue")
    for key, want in (("n_streams", plan.n_streams), ("seq_len", a.seq_len), ("n_views", a.n_views),
                      ("prefetch_size", a.prefetch_size)):
        got = sorted({s[key] for s in states})
        if got != [want]:
            hint = " (default: the global batch, batch_size x dp x grad_acc_steps)" if key == "n_streams" else ""
            raise StateMismatch(f"the checkpoint's data loader has {key}={got[0]}, this run data.{key}={want}{hint}: "
                                f"keep it to resume the data order")
    merged = {int(k): v for s in states for k, v in s["streams"].items()}  # tensor-parallel ranks repeat theirs
    missing = [s for s in plan.own() if s not in merged]
    if missing:
        raise LinguaError(f"load_state_dicts: no saved state for stream(s) {missing[:8]} of data-parallel rank "
                          f"{plan.dp_rank}: pass the states of every old rank")
    P, rows = a.prefetch_size, a.batch_size * plan.dp_size
    counts = {s: rows_yielded(st, P) for s, st in merged.items()}
    if len(merged) == plan.n_streams and sum(counts.values()) % rows:
        raise LinguaError(f"the checkpoint's data position ({sum(counts.values())} sequences) is not a whole number "
                          f"of this run's micro-batches (batch_size x dp = {rows}): keep the global batch to resume")
    total = sum(counts[s] for s in plan.own()) // a.batch_size * rows  # global rows consumed
    for s, c in counts.items():
        if c != expected_rows(total, s, plan.n_streams):
            raise LinguaError(f"data loader states do not describe one position of the data order (stream {s} "
                              f"yielded {c} sequences, expected {expected_rows(total, s, plan.n_streams)} after "
                              f"{total} rows): were they saved at the same step, with the same global batch?")
    return {s: merged[s] for s in plan.own()}


# ---------------------------------------------------------------------------------------------------------------------
# The loader.

class DataLoader:
    """Batches for data-parallel rank `dp_rank` of `dp_size`; see the module docstring.

        with DataLoader(args, rank, world, grad_acc_steps) as loader:
            for step, batch in zip(range(steps), loader): ...
            state = loader.state_dict()
    """

    def __init__(self, args, dp_rank: int = 0, dp_size: int = 1, grad_acc_steps: int = 1):
        self.args = as_data_args(args)
        if not 0 <= dp_rank < dp_size:
            raise LinguaError(f"data-parallel rank {dp_rank} is not in [0, {dp_size})")
        sources = validate(self.args)
        self.plan = Plan(self.args, sources, dp_rank, dp_size, resolve_n_streams(self.args, dp_size, grad_acc_steps))
        self.tokenizer = build_tokenizer(self.args.tokenizer.name, self.args.tokenizer.path)  # fail early, here
        self._streams = {s: initial_stream_state(s, sources) for s in self.plan.own()}
        self._positions = {}  # streams of a batch -> their position after the last batch, newer than _streams
        self._pipeline = None
        if dp_rank == 0:
            formats = ", ".join(f"{name}: {spec['format']}" for name, spec in sources.items())
            logger.info("data: %d streams, %d per rank; %s", self.plan.n_streams, len(self._streams), formats)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pipeline is None:
            if self.args.load_async:
                from lingua.data.loader_async import AsyncPipeline

                self._pipeline = AsyncPipeline(self.plan, self._stream_states())
            else:
                S, n_views = self.args.seq_len, self.args.n_views
                self._pipeline = ((make_batch(rows, tok_idx, S, n_views), after) for rows, tok_idx, after in
                                  rank_batches(self.plan, dict(self._stream_states()), self.tokenizer))
        batch, after = next(self._pipeline)
        self._positions[after[0]] = after
        return batch

    def _stream_states(self) -> dict[int, dict]:
        """Every stream's state after the last batch returned (positions the pipeline yielded, made states)."""
        for position in self._positions.values():
            self._streams.update(group_states(position))
        self._positions.clear()
        return self._streams

    def state_dict(self) -> dict[str, Any]:
        """The state after the last batch returned (JSON-serialisable): this rank's streams."""
        a = self.args
        return copy.deepcopy({"version": STATE_VERSION, "n_streams": self.plan.n_streams, "seq_len": a.seq_len,
                              "n_views": a.n_views, "prefetch_size": a.prefetch_size, "dp_rank": self.plan.dp_rank,
                              "dp_size": self.plan.dp_size,
                              "streams": {str(s): v for s, v in self._stream_states().items()}})

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batch `state` was saved at (a state of this rank, same layout)."""
        self.load_state_dicts([state])

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue exactly after the step the states of all old ranks were saved at, whatever the old layout
        (duplicates, e.g. from tensor-parallel ranks, are fine)."""
        try:
            streams = restore_streams(states, self.plan)
        except StateMismatch as e:
            if not self.args.reset_state:
                raise
            logger.warning("data.reset_state=true: %s; the data order starts from the beginning", e.reason)
            streams = {s: initial_stream_state(s, self.plan.sources) for s in self.plan.own()}
        self.close()
        self._streams, self._positions = streams, {}

    def close(self) -> None:
        """Stop the async process (or close the sync generator's files); iterating again restarts from the state."""
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
