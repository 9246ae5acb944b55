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
from dataclasses import asdict, is_dataclass
from typing import Any, Iterator

import numpy as np

from lingua.data.batches import DataArgs, Plan, make_batch, rank_batches
from lingua.data.jsonl import chunk_files
from lingua.data.loader_async import AsyncPipeline
from lingua.data.streams import (
    expected_rows,
    group_states,
    initial_stream_state,
    rows_yielded,
)
from lingua.data.tokenizer import TokenizerArgs, build_tokenizer
from lingua.data.tokens import resolve_format
from lingua.errors import ConfigError, LinguaError

logger = logging.getLogger(__name__)

STATE_VERSION = 2


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
