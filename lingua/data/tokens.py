"""Pre-tokenized token shards (written by setup/tokenize_data.py): the layout, the manifest check, and a memory-mapped
document store for the loader (lingua/data/streams.py) and validation (lingua/data/validation.py).

Layout, for a source NAME:
    <root_dir>/NAME/tokens/manifest.json             written last: its presence means the shards are complete
    <root_dir>/NAME/tokens/<split>.<k>.tokens.npy    uint16 (vocabulary < 65536) or uint32 token ids, documents
                                                     back to back, BOS/EOS included as the manifest says
    <root_dir>/NAME/tokens/<split>.<k>.index.npy     int64 [documents + 1, 2]: (token offset, UTF-8 byte offset) of
                                                     each document start, then the totals
split is `train` (the chunk files, in order) or `val`. Document j of the train split is the j-th non-blank line of
the chunk files, so the token loader draws exactly the documents, tokens and batches of the jsonl loader. A line
that was bad and skipped (--skip_bad_lines) is an empty document, which keeps the numbering.

The manifest names the tokenizer (sha256 of its model file), vocabulary size, add_bos/add_eos and the counts per
shard, so opening a source reads one small JSON file and maps shards only when a document of theirs is asked for:
start-up and memory do not grow with the dataset.
"""

import bisect
import functools
import hashlib
import json
import logging
import os
from typing import Iterator, Optional

import numpy as np

from lingua.errors import LinguaError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FORMATS = ("auto", "jsonl", "tokens")
TOKENIZE = "setup/tokenize_data.py"


def token_folder(root_dir: str, source: str) -> str:
    return os.path.join(root_dir, source, "tokens")


def shard_paths(folder: str, shard: str) -> tuple[str, str]:
    return os.path.join(folder, f"{shard}.tokens.npy"), os.path.join(folder, f"{shard}.index.npy")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65536 else np.uint32


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_sha256(tokenizer_args) -> str:
    """What identifies a tokenizer: the sha256 of its model file ('bytes' for the byte tokenizer, which has none)."""
    if tokenizer_args.name == "bytes":
        return "bytes"
    path = tokenizer_args.path or ""
    if not os.path.isfile(path):
        raise LinguaError(f"tokenizer file not found: {path or '(data.tokenizer.path is not set)'}")
    st = os.stat(path)
    return _file_sha256(os.path.abspath(path), st.st_size, st.st_mtime)


def read_manifest(folder: str) -> Optional[dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise LinguaError(f"cannot read token manifest {path}: {e}") from None


def manifest_problem(manifest: dict, folder: str, tokenizer_args, add_bos: bool, add_eos: bool,
                     split: str) -> Optional[str]:
    """Why these token shards cannot stand in for tokenizing the jsonl with this config (None: they can)."""
    if manifest.get("version") != FORMAT_VERSION:
        return f"token shards in {folder} have format version {manifest.get('version')}, expected {FORMAT_VERSION}"
    tok, sha = manifest["tokenizer"], tokenizer_sha256(tokenizer_args)
    if tok["sha256"] != sha:
        return (f"token shards in {folder} were made with tokenizer {tok['name']}:{tok.get('path')} (sha256 "
                f"{tok['sha256'][:12]}), not data.tokenizer {tokenizer_args.name}:{tokenizer_args.path} (sha256 "
                f"{sha[:12]}); re-run setup/tokenize_data.py with this tokenizer")
    if (manifest["add_bos"], manifest["add_eos"]) != (add_bos, add_eos):
        return (f"token shards in {folder} were made with add_bos={manifest['add_bos']} add_eos="
                f"{manifest['add_eos']}, not data.add_bos={add_bos} data.add_eos={add_eos}")
    if split not in manifest["splits"]:
        return f"token shards in {folder} have no '{split}' split"
    return _stale_inputs(manifest, folder, split)


def _stale_inputs(manifest: dict, folder: str, split: str) -> Optional[str]:
    """Do the jsonl files next to the shards (when they are there) differ in size from those tokenized?"""
    made = {i["file"]: i["size"] for i in manifest.get("settings", {}).get("inputs", []) if i["split"] == split}
    source = os.path.dirname(folder)
    names = [n for n in os.listdir(source) if n.endswith(".val.jsonl" if split == "val" else ".jsonl")
             and (split == "val" or ".chunk." in n)]
    now = {n: os.path.getsize(os.path.join(source, n)) for n in names}
    if made and now and now != made:
        return (f"token shards in {folder} were made from other jsonl files than those in {source} (re-run "
                f"{TOKENIZE} --force)")
    return None


def resolve_format(fmt: str, root_dir: str, source: str, tokenizer_args, add_bos: bool, add_eos: bool,
                   split: str = "train") -> Optional[dict]:
    """The manifest to read `source` from, or None to read its jsonl. fmt: jsonl | tokens | auto (tokens when a
    matching manifest exists)."""
    if fmt not in FORMATS:
        raise LinguaError(f"data.format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if fmt == "jsonl":
        return None
    folder = token_folder(root_dir, source)
    manifest = read_manifest(folder)
    if manifest is None:
        if fmt == "tokens":
            raise LinguaError(f"data.format=tokens but source '{source}' has no token shards ({folder}/{MANIFEST}; "
                              f"run setup/tokenize_data.py --data_dir {root_dir} --source {source})")
        return None
    problem = manifest_problem(manifest, folder, tokenizer_args, add_bos, add_eos, split)
    if problem and fmt == "tokens":
        raise LinguaError(problem)
    if problem:  # the train split warns; validation (whose caller may not know the tokenizer's file) only informs
        log = logger.warning if split == "train" else logger.info
        log("data.format=auto reads '%s' (%s) from jsonl: %s", source, split, problem)
        return None
    return dict(manifest, folder=folder)


class TokenDocs:
    """One split of a source's token shards as a document store, addressed like the jsonl it was made from:
    `count(k)` documents in input file k (a chunk file), `tokens(k, j)` of its document j (a view into the
    memory-mapped shard that holds it). So a stream's cursor means the same in both formats."""

    def __init__(self, name: str, manifest: dict, split: str = "train"):
        self.name, self.folder = name, manifest["folder"]
        self.shards = manifest["splits"][split]["shards"]
        # shards are consecutive pieces of the input files: group them by input, in order
        self._files: list[list[int]] = []
        for k, shard in enumerate(self.shards):
            if not self._files or self.shards[self._files[-1][-1]]["input"] != shard["input"]:
                self._files.append([])
            self._files[-1].append(k)
        self._firsts = [np.cumsum([0] + [self.shards[k]["docs"] for k in ks]).tolist() for ks in self._files]
        self.n_files = len(self._files)
        self._open: dict = {}

    def _shard(self, k: int):
        if k not in self._open:
            shard = self.shards[k]
            tokens_path, index_path = shard_paths(self.folder, shard["name"])
            try:
                tokens = np.load(tokens_path, mmap_mode="r").view(np.ndarray)
                index = np.load(index_path, mmap_mode="r").view(np.ndarray)
            except (OSError, ValueError) as e:
                raise LinguaError(f"cannot read token shard {tokens_path}: {e} (re-run {TOKENIZE})") from None
            if tokens.shape != (shard["tokens"],) or index.shape != (shard["docs"] + 1, 2):
                raise LinguaError(f"token shard {tokens_path} does not match {MANIFEST} (re-run {TOKENIZE})")
            self._open[k] = (tokens, index[:, 0], index[:, 1])
        return self._open[k]

    def count(self, k: int) -> int:
        return self._firsts[k][-1]

    def tokens(self, k: int, j: int) -> np.ndarray:
        firsts = self._firsts[k]
        i = bisect.bisect_right(firsts, j) - 1  # the shard of file k holding document j
        tokens, offsets, _ = self._shard(self._files[k][i])
        j -= firsts[i]
        return tokens[offsets[j]: offsets[j + 1]]

    def documents(self) -> Iterator[tuple[np.ndarray, int]]:
        """(tokens, UTF-8 bytes of the text) of every document, in order (validation)."""
        for k, shard in enumerate(self.shards):
            tokens, offsets, byte_offsets = self._shard(k)
            for j in range(shard["docs"]):
                yield tokens[offsets[j]: offsets[j + 1]], int(byte_offsets[j + 1] - byte_offsets[j])

    def close(self) -> None:
        self._open.clear()
