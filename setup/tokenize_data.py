"""Pre-tokenize a prepared source into token shards the loader memory-maps (data.format: tokens, or auto).

    python setup/tokenize_data.py --data_dir data --source shakespeare --tokenizer tokenizers/shakespeare_sp4096.model
    python setup/tokenize_data.py --data_dir data --source mine --tokenizer bytes --workers 8

Reads `<data_dir>/<source>/<source>.chunk.<k>.jsonl` (the train split) and `<source>.val.jsonl` (the val split), and
writes `<data_dir>/<source>/tokens/` as lingua/data/tokens.py describes: one shard per piece of at most --shard_mb of
jsonl (a piece never splits a line), uint16 ids when the vocabulary has fewer than 65536 tokens (else uint32), an
index of document boundaries (token and UTF-8 byte offsets) per shard, and `manifest.json` with the tokenizer's
sha256, vocabulary size, add_bos/add_eos and the document and token counts.

Parallel: --workers processes tokenize pieces; a progress bar (on a terminal) shows MB/s and the ETA.
Atomic and resumable: shards are written into `<source>/tokens.partial/`, each file renamed into place and a piece
marked done only once both its files are complete; a killed run continues where it stopped; the folder is renamed
to `tokens/` when every piece is done. Idempotent: a second run with the same inputs and settings does nothing.
"""

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from lingua.data.jsonl import chunk_files, line_number, parse_document, scan_lines  # noqa: E402
from lingua.data.tokenizer import TokenizerArgs, build_tokenizer, encode_array  # noqa: E402
from lingua.data.tokens import (  # noqa: E402
    FORMAT_VERSION,
    MANIFEST,
    read_manifest,
    shard_paths,
    token_dtype,
    token_folder,
    tokenizer_sha256,
)
from lingua.errors import LinguaError, exit_on_error  # noqa: E402

PLAN = "plan.json"


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def split_points(path: str, shard_bytes: int) -> list[int]:
    """Byte offsets cutting a file into pieces of about shard_bytes, each cut at a line start (no full read)."""
    size = os.path.getsize(path)
    points = [0]
    with open(path, "rb") as f:
        while points[-1] + shard_bytes < size:
            f.seek(points[-1] + shard_bytes)
            f.readline()  # to the next line start
            if f.tell() >= size:
                break
            points.append(f.tell())
    return points + [size]


def plan_pieces(inputs: dict[str, list[str]], shard_bytes: int) -> list[dict]:
    """The work: {split, name, input, start, end} per piece, in document order."""
    pieces = []
    for split, files in inputs.items():
        n = 0
        for path in files:
            points = split_points(path, shard_bytes)
            for start, end in zip(points[:-1], points[1:]):
                pieces.append({"split": split, "name": f"{split}.{n:05d}", "input": path, "start": start, "end": end})
                n += 1
    return pieces


_tokenizer = None  # one per worker process


def _init_worker(tokenizer_args) -> None:
    global _tokenizer
    _tokenizer = build_tokenizer(tokenizer_args.name, tokenizer_args.path)


def tokenize_piece(job: tuple) -> dict:
    """Tokenize one piece into its shard files in `folder`, then mark it done; returns the done record."""
    piece, folder, add_bos, add_eos, skip_bad_lines, dtype = job
    path, docs, byte_counts, bad = piece["input"], [], [], 0
    with open(path, "rb") as f:
        starts, ends = scan_lines(f, piece["start"], piece["end"])
        f.seek(piece["start"])
        buf = f.read(piece["end"] - piece["start"])
    for a, b in zip((starts - piece["start"]).tolist(), (ends - piece["start"]).tolist()):
        try:
            text = parse_document(buf[a:b], lambda: f"{path}:{line_number(path, piece['start'] + a)}")
        except LinguaError:
            if not skip_bad_lines:
                raise
            bad += 1
            text = None  # an empty document keeps the numbering of the jsonl loader, which skips it too
        ids = encode_array(_tokenizer, text, add_bos, add_eos) if text is not None else np.zeros(0, dtype=dtype)
        docs.append(ids.astype(dtype))
        byte_counts.append(len(text.encode("utf-8")) if text is not None else 0)
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=dtype)
    index = np.zeros((len(docs) + 1, 2), dtype=np.int64)
    index[1:, 0] = np.cumsum([len(d) for d in docs])
    index[1:, 1] = np.cumsum(byte_counts)
    tokens_path, index_path = shard_paths(folder, piece["name"])
    save_npy(tokens_path, tokens)
    save_npy(index_path, index)
    record = {**piece, "input": os.path.basename(path), "docs": len(docs), "tokens": int(index[-1, 0]),
              "bytes": int(index[-1, 1]), "bad": bad}
    write_json(os.path.join(folder, f"{piece['name']}.done.json"), record)  # last: the piece is complete
    return record


def run_pieces(jobs: list[tuple], workers: int, tokenizer_args, on_done) -> None:
    if workers <= 1:
        _init_worker(tokenizer_args)
        for job in jobs:
            on_done(tokenize_piece(job))
        return
    ctx = mp.get_context("spawn")  # the same on every platform; workers import only numpy and the tokenizer
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_args,)) as pool:
        for record in pool.imap_unordered(tokenize_piece, jobs):
            on_done(record)


def settings_of(args, tokenizer_args, tokenizer, inputs: dict[str, list[str]]) -> dict:
    """What the output depends on: same settings, same shards (the up-to-date and resume checks compare these)."""
    files = [{"split": split, "file": os.path.basename(p), "size": os.path.getsize(p),
              "mtime_ns": os.stat(p).st_mtime_ns} for split, paths in inputs.items() for p in paths]
    tokenizer_id = {"name": tokenizer_args.name, "sha256": tokenizer_sha256(tokenizer_args),
                    "vocab_size": tokenizer.n_words}
    return {"version": FORMAT_VERSION, "tokenizer": tokenizer_id,
            "add_bos": args.add_bos, "add_eos": args.add_eos, "skip_bad_lines": args.skip_bad_lines,
            "shard_mb": args.shard_mb, "inputs": files}


def manifest_of(source: str, settings: dict, path, records: list[dict], seconds: float) -> dict:
    splits = {}
    for r in sorted(records, key=lambda r: r["name"]):
        s = splits.setdefault(r["split"], {"docs": 0, "tokens": 0, "bytes": 0, "bad": 0, "shards": []})
        for key in ("docs", "tokens", "bytes", "bad"):
            s[key] += r[key]
        s["shards"].append({k: r[k] for k in ("name", "docs", "tokens", "bytes", "input", "start", "end")})
    return {"version": FORMAT_VERSION, "source": source, "tokenizer": {**settings["tokenizer"], "path": path},
            "add_bos": settings["add_bos"], "add_eos": settings["add_eos"],
            "dtype": np.dtype(token_dtype(settings["tokenizer"]["vocab_size"])).name, "splits": splits,
            "settings": settings, "seconds": round(seconds, 3)}


def prepare_partial(partial: str, plan: dict) -> dict[str, dict]:
    """The partial folder for this plan (started afresh if it was for another one); returns the done records."""
    if os.path.isdir(partial):
        try:
            with open(os.path.join(partial, PLAN)) as f:
                same = json.load(f) == plan
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)
    write_json(os.path.join(partial, PLAN), plan)
    done = {}
    for name in os.listdir(partial):
        if ".tmp" in name:
            os.remove(os.path.join(partial, name))  # a write a killed run left half done
        elif name.endswith(".done.json"):
            with open(os.path.join(partial, name)) as f:
                record = json.load(f)
            done[record["name"]] = record
    return done


def tokenize_source(args) -> dict:
    """Tokenize args.source; returns the manifest (also when it was already up to date)."""
    from lingua.train.metrics import (
        Progress,  # imports torch: kept out of the spawned workers' imports
    )

    tokenizer_args = TokenizerArgs(args.tokenizer_name or guess_tokenizer(args.tokenizer),
                                   None if args.tokenizer == "bytes" else args.tokenizer)
    tokenizer = build_tokenizer(tokenizer_args.name, tokenizer_args.path)
    data_dir, source = str(args.data_dir), args.source
    inputs = {"train": chunk_files(data_dir, source)}
    val = os.path.join(data_dir, source, f"{source}.val.jsonl")
    if os.path.isfile(val):
        inputs["val"] = [val]
    settings = settings_of(args, tokenizer_args, tokenizer, inputs)
    final = token_folder(data_dir, source)
    existing = read_manifest(final)
    if existing is not None and existing.get("settings") == settings:
        print(f"[tokenize] {final} is up to date ({describe(existing)})")
        return existing
    if os.path.exists(final) and not args.force:
        raise LinguaError(f"{final} holds token shards made with other inputs or settings; --force replaces them")
    partial = final + ".partial"
    pieces = plan_pieces(inputs, int(args.shard_mb * 2**20))
    done = prepare_partial(partial, {"settings": settings, "pieces": pieces})
    dtype = token_dtype(tokenizer.n_words)
    todo = [p for p in pieces if p["name"] not in done]
    total = sum(p["end"] - p["start"] for p in pieces)
    before = total - sum(p["end"] - p["start"] for p in todo)  # done by an earlier, interrupted run
    progress = Progress(total, start=before, enabled=not args.quiet)
    t0, run_bytes = time.perf_counter(), 0

    def on_done(record):
        nonlocal run_bytes
        done[record["name"]] = record
        run_bytes += record["end"] - record["start"]
        progress.update(before + run_bytes, f"{run_bytes / 1e6 / (time.perf_counter() - t0):.2f} MB/s")

    jobs = [(p, partial, args.add_bos, args.add_eos, args.skip_bad_lines, dtype) for p in todo]
    try:
        run_pieces(jobs, args.workers, tokenizer_args, on_done)
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    manifest = manifest_of(source, settings, tokenizer_args.path, list(done.values()), seconds)
    write_json(os.path.join(partial, MANIFEST), manifest)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(partial, final)
    for name in os.listdir(final):  # bookkeeping of the partial run, not part of the output
        if name == PLAN or name.endswith(".done.json"):
            os.remove(os.path.join(final, name))
    mb = run_bytes / 1e6
    print(f"[tokenize] {final}: {describe(manifest)}; {mb:.1f} MB in {seconds:.1f} s "
          f"({mb / max(seconds, 1e-9):.2f} MB/s, {args.workers} worker(s))")
    return manifest


def guess_tokenizer(path: str) -> str:
    if path == "bytes":
        return "bytes"
    if path.endswith(".model"):
        return "sp"
    if path.endswith(".tiktoken"):
        return "tiktoken"
    raise LinguaError(f"cannot tell the tokenizer kind of {path}: pass --tokenizer_name sp|tiktoken|bytes")


def describe(manifest: dict) -> str:
    return ", ".join(f"{split} {s['docs']:,} docs {s['tokens']:,} tokens in {len(s['shards'])} shard(s)"
                     for split, s in manifest["splits"].items()) + f" ({manifest['dtype']})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default="data")
    p.add_argument("--source", required=True)
    p.add_argument("--tokenizer", required=True, help="a .model (sentencepiece) or .tiktoken file, or 'bytes'")
    p.add_argument("--tokenizer_name", choices=["bytes", "sp", "tiktoken"], help="default: from the file name")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard_mb", type=float, default=64.0, help="jsonl megabytes per shard")
    p.add_argument("--add_bos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--add_eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--skip_bad_lines", action="store_true", help="empty documents for malformed lines")
    p.add_argument("--force", action="store_true", help="replace token shards made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1 or args.shard_mb <= 0:
        p.error("--workers must be >= 1 and --shard_mb > 0")
    return args


def main(argv=None) -> dict:
    return tokenize_source(parse_args(argv))


if __name__ == "__main__":
    exit_on_error(main)()
