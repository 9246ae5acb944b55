"""Documents: a source's chunk files read as one global stream shared out between data-parallel ranks, and the
sources mixed by weight. The first stages of the pipeline in `lingua.data`.

The documents of a source are its lines, numbered across all its chunk files in order (`<source>.chunk.0.jsonl`, then
`.chunk.1.jsonl`, ...). Rank r of n owns the lines i with i % n == r, so every chunk file is read whatever the world
size and no two ranks ever own the same document. At the end of the last file the stream starts again (next epoch).

A reader's state is a cursor (epoch, next line, file, line in file, byte offset) plus, after a resume at another world
size (see `lingua.data`), rules naming lines an older world already consumed and documents it had partly consumed.
"""

import glob
import json
import logging
import os
import re
from typing import Iterator, Optional

import numpy as np

from lingua.errors import LinguaError

logger = logging.getLogger(__name__)

MIX_BLOCK = 1024  # source draws are generated in blocks of this many documents


def chunk_files(root_dir: str, source: str) -> list[str]:
    """The chunk files of `source`, in stream order; a one-line error when the source or its files are missing."""
    folder = os.path.join(root_dir, source)
    if not os.path.isdir(folder):
        known = sorted(d for d in os.listdir(root_dir) if os.path.isdir(os.path.join(root_dir, d)) and d[0] != ".")
        raise LinguaError(f"unknown data source '{source}': no folder {folder} (sources in {root_dir}: "
                          f"{', '.join(known) or 'none'}; see setup/prepare_data.py)")
    files = glob.glob(os.path.join(glob.escape(folder), "*.chunk.*.jsonl"))
    if not files:
        raise LinguaError(f"data source '{source}' has no chunk files ({folder}/*.chunk.*.jsonl)")

    def order(path):
        m = re.search(r"\.chunk\.(\d+)\.jsonl$", path)
        return (int(m[1]) if m else float("inf"), path)

    return sorted(files, key=order)


def parse_document(raw: bytes, where: str) -> str:
    """The text of one JSON line; LinguaError naming `where` (file:line) when the line is not a document."""
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise LinguaError(f"{where}: malformed JSON line ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise LinguaError(f"{where}: no string 'text' field in this line")
    return doc["text"]


def initial_cursor() -> dict:
    return {"epoch": 0, "line": 0, "file": 0, "fline": 0, "offset": 0}


def position(state: dict) -> tuple[int, int]:
    """Where a reader stands in the global stream, comparable across ranks: (epoch, next line)."""
    return state["epoch"], state["line"]


def consumed(epoch: int, line: int, rules) -> bool:
    """Did an older world consume line `line` of `epoch`? Rule (mod, until): old rank line % mod had consumed every
    line it owned before until[line % mod]."""
    return any((epoch, line) < until[line % mod] for mod, until in rules)


def read_documents(files: list[str], state: dict, source: str, dp_rank: int, dp_size: int,
                   skip_bad_lines: bool = False) -> Iterator[tuple[str, tuple, int, dict]]:
    """Yield (text, (source, epoch, line), tokens to skip, state after this document) for this rank's documents,
    forever. `tokens to skip` is > 0 only for a document an older world had partly consumed."""
    epoch, line, k, fline, offset = (state[key] for key in ("epoch", "line", "file", "fline", "offset"))
    if k > len(files):
        raise LinguaError(f"data source '{source}': saved state points at chunk file {k} but only "
                          f"{len(files)} exist (were the chunk files changed?)")
    rules = [(r["mod"], [tuple(u) for u in r["until"]]) for r in state.get("skip", [])]
    partial = {(e, i): n for e, i, n in state.get("partial", [])}
    bad = state.get("bad", 0)
    found_in_epoch, empty_epochs = 0, 0
    while True:
        if k >= len(files):  # next epoch
            empty_epochs = empty_epochs + 1 if found_in_epoch == 0 else 0
            if empty_epochs >= 2:
                raise LinguaError(f"data source '{source}' has no document for data-parallel rank {dp_rank} of "
                                  f"{dp_size} (too few documents, or only bad lines, in {len(files)} chunk files)")
            epoch, line, k, fline, offset, found_in_epoch = epoch + 1, 0, 0, 0, 0, 0
        path = files[k]
        try:
            f = open(path, "rb")
        except OSError as e:
            raise LinguaError(f"cannot read chunk file {path}: {e.strerror}") from None
        with f:
            f.seek(offset)
            for raw in f:
                i = line
                line, fline, offset = line + 1, fline + 1, offset + len(raw)
                if i % dp_size != dp_rank or not raw.strip():
                    continue
                if rules and consumed(epoch, i, rules):
                    continue
                try:
                    text = parse_document(raw, f"{path}:{fline}")
                except LinguaError as e:
                    if not skip_bad_lines:
                        raise
                    bad += 1
                    logger.warning("skipping bad line (%d so far in '%s'): %s", bad, source, e)
                    continue
                skip = partial.pop((epoch, i), 0) if partial else 0
                if rules and all((epoch, line) >= max(until) for _, until in rules):
                    rules = []  # this rank has passed every old rank's position: the rules are spent
                after = {"epoch": epoch, "line": line, "file": k, "fline": fline, "offset": offset}
                if rules:
                    after["skip"] = [{"mod": mod, "until": [list(u) for u in until]} for mod, until in rules]
                if partial:
                    partial = {key: n for key, n in partial.items() if key >= (epoch, line)}
                    after["partial"] = [[e, j, n] for (e, j), n in sorted(partial.items())]
                if bad:
                    after["bad"] = bad
                found_in_epoch += 1
                yield text, (source, epoch, i), skip, after
        k, fline, offset = k + 1, 0, 0


def mixed_documents(files: dict[str, list[str]], weights: dict[str, float], seed: int, dp_rank: int, dp_size: int,
                    gen: int, state: dict, skip_bad_lines: bool = False) -> Iterator[tuple[tuple, dict]]:
    """Yield ((text, ref, skip), state after) with each document's source drawn by weight (per document).
    state = {"n": documents drawn so far, "sources": {name: reader state}}. The draw for document n depends only on
    (seed, rank, world size, gen, n), so the state needs no RNG dump; gen changes after an elastic resume."""
    names = list(weights)
    cum = np.cumsum([weights[s] for s in names], dtype=np.float64)
    cum /= cum[-1]
    cursors = {s: state["sources"].get(s, initial_cursor()) for s in names}
    readers = {s: read_documents(files[s], cursors[s], s, dp_rank, dp_size, skip_bad_lines) for s in names}
    n, block_id, draws = state["n"], None, None
    while True:
        if n // MIX_BLOCK != block_id:
            block_id = n // MIX_BLOCK
            rng = np.random.default_rng([seed, 0, dp_rank, dp_size, gen, block_id])
            draws = np.minimum(np.searchsorted(cum, rng.random(MIX_BLOCK), side="right"), len(names) - 1)
        source = names[draws[n % MIX_BLOCK]]
        text, ref, skip, cursors[source] = next(readers[source])
        n += 1
        yield (text, ref, skip), {"n": n, "sources": dict(cursors)}


def merge_cursors(cursors: list[dict], partly: list[tuple[int, int, int]]) -> dict:
    """One reader state continuing the old ranks' readers of a source (old rank r's cursor is cursors[r]), for a new
    world of any size: start at the earliest cursor, skip what each old rank had consumed past it, resume the
    documents in `partly` ((epoch, line, tokens used)) where they stopped. Old positions in a later epoch than the
    slowest rank's are capped at the end of its epoch."""
    low = min(cursors, key=position)
    cap = (position(low)[0] + 1, 0)
    rules = {}
    for rule in [r for c in cursors for r in c.get("skip", [])] + [
            {"mod": len(cursors), "until": [list(min(position(c), cap)) for c in cursors]}]:
        rules[repr(rule)] = rule
    used = {}
    for e, i, n in [tuple(p) for c in cursors for p in c.get("partial", [])] + list(partly):
        used[(e, i)] = max(n, used.get((e, i), 0))
    merged = {k: low[k] for k in ("epoch", "line", "file", "fline", "offset")}
    merged["skip"] = [r for r in rules.values() if max(map(tuple, r["until"])) > position(merged)]
    merged["partial"] = [[e, i, n] for (e, i), n in sorted(used.items()) if (e, i) >= position(merged)]
    bad = sum(c.get("bad", 0) for c in cursors)
    if bad:
        merged["bad"] = bad
    return merged


def read_lines(path: str, what: Optional[str] = None) -> Iterator[tuple[str, str]]:
    """(text, 'file:line') of every document of one jsonl file, in order (for validation files)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LinguaError(f"cannot read {what or 'file'} {path}: {e.strerror}") from None
    with f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                where = f"{path}:{n}"
                yield parse_document(raw, where), where
