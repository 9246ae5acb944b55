"""One logical stream of the training data: its documents, mixed by source, packed into sequences, shuffled.

A stream is the unit of the data order (see lingua/data/loader.py): stream s of n_streams owns document i of every source
when i % n_streams == s, and nothing about it depends on the number of ranks. Its pipeline is a chain of generators,
each yielding (item, state) where `state` is a small JSON dict from which the generator restarts and yields exactly
what would have come next:
  1. `stream_documents`: the stream's documents of one source, in order, epoch after epoch. State: a cursor
     {"epoch", "doc": next document index, "file", "base": index of that file's first document}.
  2. `mixed_documents`: the next document's source is drawn by weight with an RNG seeded by (seed, stream, block),
     so the state is a count, not an RNG dump: {"n": documents drawn, "src": {source: cursor}}.
  3. `stream_fills`: concatenates the documents (their tokens already carry BOS/EOS) and cuts a *fill* of
     prefetch_size sequences of seq_len + n_views - 1 tokens at a time, consecutive sequences overlapping by
     n_views - 1 tokens (every token is an input once and a target once per view; no padding), with the fill's
     rows to be yielded in a permutation seeded by (seed, stream, fill). State: the mixer state before the document
     holding the fill's first token, how many of its tokens came before ("offset"), the fill number and how many rows
     of it were yielded ("next"). Resuming re-reads one fill (deterministically) and skips the rows already yielded.

A document store (lingua.data.jsonl.JsonlDocs, lingua.data.tokens.TokenDocs) gives the documents as token arrays:
`name`, `n_files`, `count(k)` (documents in file k) and `tokens(k, j)` (int array, or None for a skipped bad line).
Both formats give the same arrays for the same text and tokenizer, so they give the same batches.
"""

from collections import deque
from typing import Iterator

import numpy as np

from lingua.errors import LinguaError

MIX_BLOCK = 1024  # source draws are generated in blocks of this many documents


def initial_cursor(stream: int) -> dict:
    return {"epoch": 0, "doc": stream, "file": 0, "base": 0}


def initial_stream_state(stream: int, sources) -> dict:
    return {"fill": 0, "next": 0, "n": 0, "offset": 0, "src": {name: initial_cursor(stream) for name in sources}}


def rows_yielded(state: dict, prefetch_size: int) -> int:
    """How many sequences a stream has yielded, from its state."""
    return state["fill"] * prefetch_size + state["next"]


def state_of(position: tuple) -> dict:
    """The JSON state of a stream from its position (fill, next, start of the fill), built only when a state is
    saved: batches are made faster without it."""
    fill, nxt, start = position
    return {"fill": fill, "next": nxt, **start}


def group_states(position: tuple) -> dict[int, dict]:
    """{stream: state} from the position of a group of streams standing at the same row of the same fill:
    (streams, fill, rows of it yielded, each stream's position at that fill's start)."""
    streams, fill, nxt, starts = position
    return {s: state_of((fill, nxt, start)) for s, start in zip(streams, starts)}


def segment_positions(starts: np.ndarray) -> np.ndarray:
    """tok_idx from a bool array marking segment starts (position 0 is always a start)."""
    idx = np.arange(len(starts))
    starts = starts.copy()
    starts[0] = True
    return idx - np.maximum.accumulate(np.where(starts, idx, 0))


def stream_documents(store, stream: int, n_streams: int, cursor: dict) -> Iterator[tuple]:
    """Yield (tokens, (source, epoch, doc), cursor after) for the documents doc % n_streams == stream of `store`,
    forever; empty documents and skipped bad lines are passed over."""
    epoch, doc, k, base = cursor["epoch"], cursor["doc"], cursor["file"], cursor["base"]
    found, empty_epochs = 0, 0
    while True:
        if k >= store.n_files:  # next epoch
            empty_epochs = 0 if found else empty_epochs + 1
            if empty_epochs >= 2:  # two in a row: the first may have been the tail of a resumed epoch
                raise LinguaError(f"data source '{store.name}' has no document for stream {stream} of {n_streams} "
                                  f"(too few documents, or only empty or bad lines; lower data.n_streams or the "
                                  f"global batch)")
            epoch, doc, k, base, found = epoch + 1, stream, 0, 0, 0
            continue
        n = store.count(k)
        if doc >= base + n:
            k, base = k + 1, base + n
            continue
        tokens = store.tokens(k, doc - base)
        ref = (store.name, epoch, doc)
        doc += n_streams
        if tokens is not None and len(tokens):
            found += 1
            yield tokens, ref, {"epoch": epoch, "doc": doc, "file": k, "base": base}


def mixed_documents(stores: dict, weights: dict[str, float], seed: int, stream: int, n_streams: int,
                    state: dict) -> Iterator[tuple]:
    """Yield (tokens, ref, state after) with each document's source drawn by weight (per document)."""
    names = list(weights)
    cum = np.cumsum([weights[s] for s in names], dtype=np.float64)
    cum /= cum[-1]
    cursors = {s: state["src"].get(s) or initial_cursor(stream) for s in names}
    readers = {s: stream_documents(stores[s], stream, n_streams, cursors[s]) for s in names}
    n, block_id, draws = state["n"], None, None
    while True:
        if n // MIX_BLOCK != block_id:
            block_id = n // MIX_BLOCK
            rng = np.random.default_rng([seed, 0, stream, block_id])
            draws = np.minimum(np.searchsorted(cum, rng.random(MIX_BLOCK), side="right"), len(names) - 1)
        source = names[draws[n % MIX_BLOCK]]
        tokens, ref, cursors[source] = next(readers[source])
        n += 1
        yield tokens, ref, {"n": n, "src": dict(cursors)}


class _Piece:
    """The unused tokens of one document: tokens[offset:], and the mixer state before the document."""

    __slots__ = ("tokens", "offset", "ref", "before")

    def __init__(self, tokens, offset, ref, before):
        self.tokens, self.offset, self.ref, self.before = tokens, offset, ref, before


def _cut_fill(pieces, n_rows: int, S: int, L: int, with_refs: bool):
    """(block [(n_rows - 1) * S + L] int32, tok_idx [n_rows, S] int32, refs or None) from the pieces holding >=
    the block's tokens; row q of the fill is block[q * S: q * S + L]."""
    need = (n_rows - 1) * S + L
    parts, starts, lengths, spans, pos = [], [], [], [], 0
    for p in pieces:
        take = min(len(p.tokens) - p.offset, need - pos)
        parts.append(p.tokens[p.offset: p.offset + take])
        starts.append(pos)
        lengths.append(take)
        spans.append((pos, p))
        pos += take
        if pos == need:
            break
    block = np.concatenate(parts, dtype=np.int32)
    # Every piece but the first begins a document, and the first begins where the first row does: the segment of
    # a token starts at its piece's start, or at its row's start when that is later.
    n = n_rows * S
    doc_start = np.repeat(np.array(starts, dtype=np.int32), lengths)[:n].reshape(n_rows, S)
    row_start = np.arange(0, n, S, dtype=np.int32)[:, None]  # (n_rows, 1)
    tok_idx = np.arange(n, dtype=np.int32).reshape(n_rows, S) - np.maximum(doc_start, row_start)
    refs = _row_refs(spans, n_rows, S) if with_refs else None
    return block, tok_idx, refs


def _row_refs(spans, n_rows: int, S: int) -> list:
    """Per row, the (source, epoch, doc, first token, end token) ranges of its S input tokens (for tests)."""
    refs = []
    for q in range(n_rows):
        lo, hi, row = q * S, (q + 1) * S, []
        for i, (pos, p) in enumerate(spans):
            end = spans[i + 1][0] if i + 1 < len(spans) else pos + len(p.tokens) - p.offset
            if pos < hi and end > lo:
                a, b = max(lo, pos) - pos + p.offset, min(hi, end) - pos + p.offset
                row.append((*p.ref, a, b))
        refs.append(row)
    return refs


class Fill:
    """One fill of a stream: P rows of S + n_views - 1 tokens, row q being block[q * S: q * S + S + n_views - 1],
    with their tok_idx [P, S] (int32), to be yielded in the order `order`; `start` and `end` are the stream
    positions ({"n", "src", "offset"}) at its first token and after it."""

    __slots__ = ("number", "block", "tok_idx", "order", "start", "end", "refs")

    def __init__(self, number, block, tok_idx, order, start, end, refs):
        self.number, self.block, self.tok_idx, self.order = number, block, tok_idx, order
        self.start, self.end, self.refs = start, end, refs


def stream_fills(stores: dict, args, stream: int, n_streams: int, state: dict,
                 with_refs: bool = False) -> Iterator[Fill]:
    """Yield the fills of one stream from the one `state` is in, forever (the caller skips the state["next"] rows
    already yielded). `args` is a DataArgs (sources, seed, seq_len, n_views, prefetch_size)."""
    S, L, P = args.seq_len, args.seq_len + args.n_views - 1, args.prefetch_size
    need = (P - 1) * S + L
    fill = state["fill"]
    start = {"n": state["n"], "src": state["src"], "offset": state["offset"]}
    docs = mixed_documents(stores, args.sources, args.seed, stream, n_streams, start)
    pieces, avail = deque(), 0
    before, offset = {"n": start["n"], "src": start["src"]}, start["offset"]
    while True:
        while avail < need:
            tokens, ref, after = next(docs)
            if offset < len(tokens):
                pieces.append(_Piece(tokens, offset, ref, before))
                avail += len(tokens) - offset
            before, offset = after, 0
        block, tok_idx, refs = _cut_fill(pieces, P, S, L, with_refs)
        drop = P * S  # the next fill starts P * S tokens later (its first row overlaps this fill's last)
        while drop:
            p = pieces[0]
            left = len(p.tokens) - p.offset
            if left <= drop:
                pieces.popleft()
                drop, avail = drop - left, avail - left
            else:
                p.offset, avail, drop = p.offset + drop, avail - drop, 0
        if pieces:
            end = {"n": pieces[0].before["n"], "src": pieces[0].before["src"], "offset": pieces[0].offset}
        else:
            end = {**before, "offset": 0}
        order = np.random.Generator(np.random.Philox(key=[args.seed, stream << 32 | fill])).permutation(P)
        yield Fill(fill, block, tok_idx, order, start, end, refs)
        start, fill = end, fill + 1


def expected_rows(rows_total: int, stream: int, n_streams: int) -> int:
    """Sequences stream `stream` has yielded once `rows_total` global rows were consumed (row i is stream i % n)."""
    return rows_total // n_streams + (1 if stream < rows_total % n_streams else 0)

