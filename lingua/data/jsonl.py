"""jsonl documents: a source's chunk files as a document store for the loader (lingua/data/streams.py), and the line
scanner shared with setup/tokenize_data.py.

The documents of a source are its non-blank lines, numbered across all its chunk files in order
(`<source>.chunk.0.jsonl`, then `.chunk.1.jsonl`, ...); each is one JSON object with a string `text`. A stream reads
every n_streams-th document, so the store needs random access: it indexes a chunk file's line offsets (one fast
numpy pass over its bytes) the first time a document of that file is asked for, and keeps the few most recent
indexes, so memory and start-up grow with the size of one chunk file, not with the dataset.
"""

import glob
import json
import logging
import os
import re
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Union

import numpy as np

from lingua.data.tokenizer import encode_array
from lingua.errors import LinguaError

logger = logging.getLogger(__name__)

SCAN_BLOCK = 8 << 20  # bytes read at a time when indexing lines
INDEX_CACHE = 4  # chunk-file line indexes kept per source
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.strip() removes


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


def parse_document(raw: bytes, where: Union[str, Callable[[], str]]) -> str:
    """The text of one JSON line; LinguaError naming `where` (file:line, or a function computing it, called only on
    an error) when the line is not a document."""
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("text"), str):
            return doc["text"]
        problem = "no string 'text' field in this line"
    except ValueError as e:
        problem = f"malformed JSON line ({e})"
    raise LinguaError(f"{where if isinstance(where, str) else where()}: {problem}")


def line_number(path: str, offset: int) -> int:
    """The 1-based line number of the line starting at byte `offset` (for error messages only: it reads the file)."""
    n = 1
    with open(path, "rb") as f:
        while offset > 0:
            data = f.read(min(SCAN_BLOCK, offset))
            n, offset = n + data.count(b"\n"), offset - len(data)
    return n


def scan_lines(f, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) byte offsets of the non-blank lines in bytes [start, end) of the open binary file f; `start`
    is a line start and `end` a line start or the end of the file. A line's bytes include its newline."""
    starts, ends = [], []
    f.seek(start)
    pos, carry = start, b""  # carry: an unfinished line from the previous block
    while True:
        data = f.read(min(SCAN_BLOCK, end - pos)) if pos < end else b""
        pos += len(data)
        last = not data
        buf = carry + data
        if not buf:
            break
        arr = np.frombuffer(buf, dtype=np.uint8)
        line_ends = np.flatnonzero(arr == 10) + 1
        if last and (not len(line_ends) or line_ends[-1] < len(arr)):
            line_ends = np.append(line_ends, len(arr))  # a last line without a newline
        carry = b"" if last else buf[line_ends[-1] if len(line_ends) else 0:]
        line_starts = np.concatenate([[0], line_ends])[: len(line_ends)]
        content = np.concatenate([[0], np.cumsum(~_WHITESPACE[arr], dtype=np.int64)])
        keep = content[line_ends] > content[line_starts]  # a line with a non-whitespace byte is a document
        base = pos - len(buf)
        starts.append(base + line_starts[keep])
        ends.append(base + line_ends[keep])
        if last:
            break
    if not starts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64)


class JsonlDocs:
    """A source's chunk files as a document store: `count(k)` documents in file k, `tokens(k, j)` of document j."""

    def __init__(self, name: str, files: list[str], tokenizer, add_bos: bool, add_eos: bool,
                 skip_bad_lines: bool = False):
        self.name, self.files, self.tokenizer = name, files, tokenizer
        self.add_bos, self.add_eos, self.skip_bad_lines = add_bos, add_eos, skip_bad_lines
        self.n_files, self.bad = len(files), 0
        self._indexes: OrderedDict = OrderedDict()
        self._handles: dict = {}

    def _file(self, k: int):
        if k not in self._handles:
            try:
                self._handles[k] = open(self.files[k], "rb")
            except OSError as e:
                raise LinguaError(f"cannot read chunk file {self.files[k]}: {e.strerror}") from None
        return self._handles[k]

    def _index(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k in self._indexes:
            self._indexes.move_to_end(k)
        else:
            f = self._file(k)
            self._indexes[k] = scan_lines(f, 0, os.fstat(f.fileno()).st_size)
            if len(self._indexes) > INDEX_CACHE:
                self._indexes.popitem(last=False)
        return self._indexes[k]

    def count(self, k: int) -> int:
        return len(self._index(k)[0])

    def tokens(self, k: int, j: int) -> Optional[np.ndarray]:
        starts, ends = self._index(k)
        f = self._file(k)
        f.seek(starts[j])
        raw = f.read(int(ends[j] - starts[j]))
        try:
            text = parse_document(raw, lambda: f"{self.files[k]}:{line_number(self.files[k], int(starts[j]))}")
        except LinguaError as e:
            if not self.skip_bad_lines:
                raise
            self.bad += 1
            logger.warning("skipping bad line (%d so far in '%s'): %s", self.bad, self.name, e)
            return None
        return encode_array(self.tokenizer, text, self.add_bos, self.add_eos)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


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
