"""The training data loader: sources -> documents -> tokens -> packed sequences -> shuffled batches, resumable.

Layout read (written by setup/prepare_data.py): `<root_dir>/<source>/<source>.chunk.<k>.jsonl` and
`<source>.val.jsonl`, one JSON object with a `text` field per line.

The pipeline is a chain of generators, each yielding (item, state) where `state` is a small JSON-serialisable dict
from which the generator restarts and yields exactly what would have come next:
  1. `lingua.jsonl.read_documents`: one per source, rank r of n reading the source's global line stream i % n == r.
  2. `lingua.jsonl.mixed_documents`: picks the next document's source by weight with a seeded RNG (a pure function
     of the document count, so the state is an integer, not an RNG dump).
  3. `packed_sequences`: tokenizes and concatenates documents (BOS/EOS as configured) into sequences of
     seq_len + n_views - 1 tokens, consecutive sequences overlapping by n_views - 1 so that every token is an input
     exactly once and a target once per view; no padding. The state is the document holding the next unused token and
     how many of its tokens are used, so resuming re-reads that one document instead of saving a token buffer.
  4. `shuffled_batches`: fills a buffer of prefetch_size batches of sequences, permutes it with a seeded RNG, yields it
     batch by batch. The state is the packer state at the start of the buffer plus the number of batches already
     yielded from it; resuming refills the buffer (deterministically) and skips those.

Batches are dicts of int64 numpy arrays: `input [B, S]`, `target [B, S]` (`[B, S, n_views - 1]` when n_views > 2, view
v predicting the token v ahead) and `tok_idx [B, S]`, the position of each token inside its document segment: 0 at
each document start and at position 0 of every sequence (a sequence continuing a document starts a new segment).

`DataLoader` runs this in the trainer's process (load_async=False) or in a spawned child process feeding a bounded
queue (load_async=True). Each batch travels with the state *after* it, so `state_dict()` always describes the batches
the trainer consumed, never those produced ahead.

Resuming at another data-parallel size (`load_state_dicts`, given the states of all old ranks). For each source the
new ranks restart from the earliest old position P (so nothing is dropped) and skip every line an old rank had already
consumed past P (the rule "line i is consumed if it is before old rank i % n_old's position"); a document an old rank
had partly packed resumes at the token where it stopped. Positions are taken at the start of each old rank's shuffle
buffer, so the bound is:
  * no document or token is dropped;
  * the only repeated data are the sequences each old rank had already yielded from its current shuffle buffer: at most
    (prefetch_size - 1) * batch_size sequences, i.e. (prefetch_size - 1) * batch_size * seq_len input tokens, per old
    rank (0 when it stopped at a buffer boundary);
  * this holds within the epoch of the slowest old rank; data a faster rank had seen in a later epoch is seen again.
Exact (bit-identical) resume needs the same data config and world size; elastic resume needs the same tokenizer.
"""

import copy
import logging
import multiprocessing as mp
import os
import queue
import signal
import traceback
import weakref
from collections import deque
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Iterator, Optional

import numpy as np

from lingua.errors import LinguaError
from lingua.jsonl import chunk_files, initial_cursor, merge_cursors, mixed_documents
from lingua.tokenizer import TokenizerArgs, build_tokenizer

logger = logging.getLogger(__name__)

STATE_VERSION = 1
QUEUE_BATCHES = 8  # async mode: batches produced ahead of the trainer


@dataclass
class DataArgs:
    root_dir: Optional[str] = None
    sources: dict[str, float] = field(default_factory=dict)  # source folder name -> sampling weight (per document)
    batch_size: int = 2
    seq_len: int = 256
    n_views: int = 2  # 1 input view + (n_views - 1) target views (multi-token prediction)
    seed: int = 42
    add_bos: bool = True
    add_eos: bool = True
    load_async: bool = True
    prefetch_size: int = 64  # shuffle buffer, in batches
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    skip_bad_lines: bool = False  # count and log malformed lines instead of stopping


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


def validate(args: DataArgs) -> dict[str, list[str]]:
    """Check the config and the files it names; return {source: chunk files}."""
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
    for name, weight in args.sources.items():
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise LinguaError(f"data.sources.{name}: weight must be > 0, got {weight}")
    return {name: chunk_files(args.root_dir, name) for name in args.sources}


@dataclass
class Plan:
    """Everything the pipeline needs besides its state; picklable (crosses into the async process)."""

    args: DataArgs
    files: dict[str, list[str]]
    dp_rank: int
    dp_size: int


def initial_state(files: dict[str, list[str]], dp_rank: int, dp_size: int) -> dict:
    docs = {"n": 0, "sources": {name: initial_cursor() for name in files}}
    return {"version": STATE_VERSION, "dp_rank": dp_rank, "dp_size": dp_size, "gen": 0, "fill": 0, "next": 0,
            "seqs": {"docs": docs, "offset": 0, "doc": None}}


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline.

def segment_positions(starts: np.ndarray) -> np.ndarray:
    """tok_idx from a bool array marking segment starts (position 0 is always a start)."""
    idx = np.arange(len(starts))
    starts = starts.copy()
    starts[0] = True
    return idx - np.maximum.accumulate(np.where(starts, idx, 0))


class _Piece:
    """The unused tokens of one document in the packing buffer."""

    __slots__ = ("tokens", "offset", "ref", "before")

    def __init__(self, tokens, offset, ref, before):
        self.tokens, self.offset, self.ref, self.before = tokens, offset, ref, before


def packed_sequences(plan: Plan, tokenizer, gen: int, state: dict) -> Iterator[tuple]:
    """Yield (tokens [S + n_views - 1], tok_idx [S], spans, state after). spans lists the (source, epoch, line,
    first token, end token) ranges of the S input tokens (used by tests to account for every token).
    state = {"docs": mixer state before the document holding the next unused token, "offset": how many of its
    tokens are used, "doc": its (source, epoch, line) or None}."""
    a = plan.args
    S, L = a.seq_len, a.seq_len + a.n_views - 1
    docs = mixed_documents(plan.files, a.sources, a.seed, plan.dp_rank, plan.dp_size, gen, state["docs"],
                           a.skip_bad_lines)
    pieces, avail = deque(), 0
    before, first_offset = state["docs"], state["offset"]
    while True:
        while avail < L:
            (text, ref, skip), after = next(docs)
            tokens = np.asarray(tokenizer.encode(text, add_bos=a.add_bos, add_eos=a.add_eos), dtype=np.int64)
            offset, first_offset = max(skip, first_offset), 0
            if offset < len(tokens):
                pieces.append(_Piece(tokens[offset:], offset, ref, before))
                avail += len(tokens) - offset
            before = after
        seq, starts, spans, pos = np.empty(L, dtype=np.int64), np.zeros(S, dtype=bool), [], 0
        for p in pieces:
            take = min(len(p.tokens), L - pos)
            seq[pos: pos + take] = p.tokens[:take]
            if pos < S:
                starts[pos] = True
                n_in = min(take, S - pos)
                spans.append((*p.ref, p.offset, p.offset + n_in))
            pos += take
            if pos == L:
                break
        drop = S  # the next sequence starts S tokens later: n_views - 1 tokens overlap
        while drop:
            p = pieces[0]
            if len(p.tokens) <= drop:
                drop -= len(p.tokens)
                avail -= len(p.tokens)
                pieces.popleft()
            else:
                p.tokens, p.offset, avail, drop = p.tokens[drop:], p.offset + drop, avail - drop, 0
        if pieces:
            p = pieces[0]
            after_state = {"docs": p.before, "offset": p.offset, "doc": list(p.ref)}
        else:
            after_state = {"docs": before, "offset": 0, "doc": None}
        yield seq, segment_positions(starts), spans, after_state


def make_batch(seqs: list[np.ndarray], tok_idx: list[np.ndarray], seq_len: int, n_views: int) -> dict:
    tokens = np.stack(seqs)  # (B, S + n_views - 1)
    if n_views == 2:
        target = tokens[:, 1: seq_len + 1]  # (B, S)
    else:
        target = np.stack([tokens[:, v: v + seq_len] for v in range(1, n_views)], axis=-1)  # (B, S, n_views - 1)
    return {"input": np.ascontiguousarray(tokens[:, :seq_len]), "target": np.ascontiguousarray(target),
            "tok_idx": np.stack(tok_idx)}


def shuffled_batches(plan: Plan, tokenizer, state: dict, with_spans: bool = False) -> Iterator[tuple]:
    """Yield (batch, state after) (plus the spans of each row when with_spans), forever."""
    a = plan.args
    per_fill = a.prefetch_size * a.batch_size
    gen, fill, skip, start = state["gen"], state["fill"], state["next"], state["seqs"]
    seqs = packed_sequences(plan, tokenizer, gen, start)
    while True:
        buffer = [next(seqs) for _ in range(per_fill)]
        end = buffer[-1][3]
        order = np.random.default_rng([a.seed, 1, plan.dp_rank, plan.dp_size, gen, fill]).permutation(per_fill)
        for j in range(skip, a.prefetch_size):
            rows = [buffer[i] for i in order[j * a.batch_size: (j + 1) * a.batch_size]]
            batch = make_batch([r[0] for r in rows], [r[1] for r in rows], a.seq_len, a.n_views)
            last = j + 1 == a.prefetch_size
            after = {"version": STATE_VERSION, "dp_rank": plan.dp_rank, "dp_size": plan.dp_size, "gen": gen,
                     "fill": fill + 1 if last else fill, "next": 0 if last else j + 1, "seqs": end if last else start}
            yield (batch, after, [r[2] for r in rows]) if with_spans else (batch, after)
        start, fill, skip = end, fill + 1, 0


# ---------------------------------------------------------------------------------------------------------------------
# Resuming at another world size.

def merge_states(states: list[dict], sources) -> dict:
    """One state from which every rank of a new world continues the old ranks' streams (see module docstring); the
    caller fills in the new dp_rank and dp_size."""
    if not states:
        raise LinguaError("load_state_dicts: no data loader states given")
    n_old = states[0]["dp_size"]
    if len(states) != n_old or sorted(s["dp_rank"] for s in states) != list(range(n_old)):
        raise LinguaError(f"load_state_dicts: need the states of all {n_old} old ranks, got ranks "
                          f"{sorted(s['dp_rank'] for s in states)}")
    states = sorted(states, key=lambda s: s["dp_rank"])
    merged = {}
    for source in sources:
        # positions at the start of each old rank's shuffle buffer, and the document it had partly packed there
        cursors = [s["seqs"]["docs"]["sources"].get(source, initial_cursor()) for s in states]
        partly = [(s["seqs"]["doc"][1], s["seqs"]["doc"][2], s["seqs"]["offset"]) for s in states
                  if s["seqs"]["doc"] and s["seqs"]["doc"][0] == source and s["seqs"]["offset"] > 0]
        merged[source] = merge_cursors(cursors, partly)
    return {"version": STATE_VERSION, "dp_rank": None, "dp_size": None, "gen": max(s["gen"] for s in states) + 1,
            "fill": 0, "next": 0, "seqs": {"docs": {"n": 0, "sources": merged}, "offset": 0, "doc": None}}


# ---------------------------------------------------------------------------------------------------------------------
# The loader.

def _worker(plan: Plan, state: dict, out, stop) -> None:
    """Async mode: run the pipeline in a child process until told to stop or the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    parent = mp.parent_process()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                if parent is not None and not parent.is_alive():
                    return False
        return False

    try:
        tokenizer = build_tokenizer(plan.args.tokenizer.name, plan.args.tokenizer.path)
        for item in shuffled_batches(plan, tokenizer, state):
            if not put(("batch", item)):
                break
    except LinguaError as e:
        put(("error", str(e)))  # flushed before exit: the queue's feeder thread is joined
    except BaseException:
        put(("crash", traceback.format_exc()))
    if stop.is_set() or (parent is not None and not parent.is_alive()):
        out.cancel_join_thread()  # nobody will read what is left: never block exit on it


def _stop_worker(proc, stop, q) -> None:
    """Stop the child without reading from the queue: a child that exits mid-write (it cancels its feeder thread once
    `stop` is set) can leave half a message in the pipe, and a `get` on that would block forever."""
    stop.set()
    proc.join(timeout=3)  # the child checks `stop` at least every 0.2 s while it waits to put a batch
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=2)
    if proc.is_alive():
        proc.kill()
        proc.join()
    q.close()
    q.cancel_join_thread()


class _AsyncPipeline:
    """The pipeline in a spawned child process, batches through a bounded queue."""

    def __init__(self, plan: Plan, state: dict):
        ctx = mp.get_context("spawn")  # fork is unsafe once torch has started threads
        self.queue, self.stop = ctx.Queue(maxsize=QUEUE_BATCHES), ctx.Event()
        self.proc = ctx.Process(target=_worker, args=(plan, state, self.queue, self.stop), daemon=True,
                                name=f"lingua-data-rank{plan.dp_rank}")
        self.proc.start()
        self._finalize = weakref.finalize(self, _stop_worker, self.proc, self.stop, self.queue)
        self.batches = 0

    def __next__(self):
        while True:
            try:
                kind, payload = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    try:  # it may have put its last message just before exiting
                        kind, payload = self.queue.get(timeout=0.5)
                        break
                    except queue.Empty:
                        pass
                    hint = "" if self.batches else (
                        "; with data.load_async=true the main script must run under `if __name__ == '__main__':`")
                    raise LinguaError(f"the data loader process exited unexpectedly (exit code "
                                      f"{self.proc.exitcode}){hint}")
        self.batches += 1
        if kind == "batch":
            return payload
        self.close()
        if kind == "error":
            raise LinguaError(payload)
        raise RuntimeError(f"the data loader process failed:\n{payload}")

    def close(self) -> None:
        self._finalize()


class DataLoader:
    """Batches for data-parallel rank `dp_rank` of `dp_size`; see the module docstring.

        with DataLoader(args, rank, world) as loader:
            for step, batch in zip(range(steps), loader): ...
            state = loader.state_dict()
    """

    def __init__(self, args, dp_rank: int = 0, dp_size: int = 1):
        self.args = as_data_args(args)
        if not 0 <= dp_rank < dp_size:
            raise LinguaError(f"data-parallel rank {dp_rank} is not in [0, {dp_size})")
        self.plan = Plan(self.args, validate(self.args), dp_rank, dp_size)
        self.tokenizer = build_tokenizer(self.args.tokenizer.name, self.args.tokenizer.path)  # fail early, here
        self._state = initial_state(self.plan.files, dp_rank, dp_size)
        self._pipeline = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pipeline is None:
            if self.args.load_async:
                self._pipeline = _AsyncPipeline(self.plan, self._state)
            else:
                self._pipeline = shuffled_batches(self.plan, self.tokenizer, self._state)
        batch, self._state = next(self._pipeline)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The state after the last batch returned (JSON-serialisable)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batch `state` was saved at (same world size and rank)."""
        if state.get("version") != STATE_VERSION:
            raise LinguaError(f"data loader state has version {state.get('version')}, expected {STATE_VERSION}")
        if (state["dp_rank"], state["dp_size"]) != (self.plan.dp_rank, self.plan.dp_size):
            raise LinguaError(f"data loader state is for rank {state['dp_rank']} of {state['dp_size']}, not "
                              f"{self.plan.dp_rank} of {self.plan.dp_size}: use load_state_dicts(all old states)")
        self._restart(state)

    def load_state_dicts(self, states: list[dict]) -> None:
        """Resume from the states of all ranks of a previous run, whatever its world size (see module docstring).
        Ranks of one data-parallel group (tensor parallelism) share a state: duplicates are fine."""
        states = list({s.get("dp_rank"): s for s in reversed(states)}.values())  # one per old dp rank
        if len(states) == self.plan.dp_size and all(s.get("dp_size") == self.plan.dp_size for s in states):
            mine = [s for s in states if s.get("dp_rank") == self.plan.dp_rank]
            if len(mine) == 1:
                return self.load_state_dict(mine[0])
        for s in states:
            if s.get("version") != STATE_VERSION:
                raise LinguaError(f"data loader state has version {s.get('version')}, expected {STATE_VERSION}")
        merged = merge_states(states, self.plan.files)
        merged.update(dp_rank=self.plan.dp_rank, dp_size=self.plan.dp_size)
        logger.info("data: resuming %d old ranks' streams on %d ranks", len(states), self.plan.dp_size)
        self._restart(merged)

    def _restart(self, state: dict) -> None:
        self.close()
        self._state = state

    def close(self) -> None:
        """Stop the async process (or close the sync generator's files); iterating again restarts from the state."""
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
