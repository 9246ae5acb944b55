"""Token shards: setup/tokenize_data.py (parallel, atomic, resumable) and the memory-mapped document store
(lingua/data/tokens.py), which gives the loader and validation the same batches as the jsonl files."""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lingua.data.loader import DataLoader, traced_batches
from lingua.data.tokenizer import ByteTokenizer, TokenizerArgs
from lingua.data.tokens import MANIFEST, read_manifest, shard_paths, token_folder
from lingua.data.validation import val_iterator
from lingua.errors import LinguaError
from tests.conftest import ROOT
from tests.test_data import args_for, doc_text, global_batches, same, write_source

TOK = ByteTokenizer()
SMALL = "0.001"  # --shard_mb: ~1 KB of jsonl per shard, so that files are cut into several pieces
sys.path.insert(0, str(ROOT / "setup"))  # importable by name: its worker processes import it too
import tokenize_data as SCRIPT  # noqa: E402


def tokenize(root, source, *extra, tokenizer="bytes"):
    return SCRIPT.main(["--data_dir", str(root), "--source", source, "--tokenizer", str(tokenizer), "--quiet",
                        *extra])


def write_val(root, name, n=5):
    texts = [doc_text(f"val-{name}", k) for k in range(n)]
    (root / name / f"{name}.val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


@pytest.fixture
def corpus(tmp_path):
    """Sources a (3 chunk files, a blank and a whitespace-only line that are no documents) and b, with val splits."""
    texts = write_source(tmp_path, "a", [20, 25, 15])
    path = tmp_path / "a" / "a.chunk.1.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3] + ["\n", "  \t\n"] + lines[3:]))
    write_source(tmp_path, "b", [30, 30], start=1000)
    write_val(tmp_path, "a")
    write_val(tmp_path, "b")
    return tmp_path, texts


def shard_documents(folder, manifest, split="train"):
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        tokens_path, index_path = shard_paths(folder, shard["name"])
        tokens, index = np.load(tokens_path), np.load(index_path)
        docs += [tokens[index[j, 0]: index[j + 1, 0]] for j in range(len(index) - 1)]
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# setup/tokenize_data.py

def test_tokenize_writes_shards_index_and_manifest(corpus):
    root, texts = corpus
    m = tokenize(root, "a", "--shard_mb", SMALL)
    folder = token_folder(str(root), "a")
    assert m == read_manifest(folder)
    assert (m["dtype"], m["tokenizer"]["sha256"], m["tokenizer"]["vocab_size"]) == ("uint16", "bytes", 258)
    assert m["add_bos"] and m["add_eos"]
    train = m["splits"]["train"]
    assert train["docs"] == 60 and len(train["shards"]) > 5  # blank lines are no documents
    assert train["tokens"] == sum(len(TOK.encode(t)) for t in texts)
    assert train["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    docs = shard_documents(folder, m)
    assert all(d.dtype == np.uint16 for d in docs)
    assert [d.tolist() for d in docs] == [TOK.encode(t) for t in texts]  # document j is the j-th non-blank line
    assert m["splits"]["val"]["docs"] == 5
    assert sorted(os.listdir(root / "a")) == ["a.chunk.0.jsonl", "a.chunk.1.jsonl", "a.chunk.2.jsonl",
                                              "a.val.jsonl", "tokens"]  # no partial folder left
    assert not [n for n in os.listdir(folder) if not n.endswith(".npy") and n != MANIFEST]


def test_tokenize_is_idempotent_and_refuses_other_settings_without_force(corpus, capsys):
    root, _ = corpus
    tokenize(root, "a")
    folder = token_folder(str(root), "a")
    before = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)}
    tokenize(root, "a")
    assert "is up to date" in capsys.readouterr().out
    assert before == {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)}
    with pytest.raises(LinguaError, match="made with other inputs or settings; --force replaces them"):
        tokenize(root, "a", "--no-add_bos")
    assert tokenize(root, "a", "--no-add_bos", "--force")["add_bos"] is False


def test_tokenize_with_two_workers_writes_what_one_writes(corpus, tmp_path_factory):
    root, _ = corpus
    other = tmp_path_factory.mktemp("copy")
    shutil.copytree(root / "a", other / "a", copy_function=shutil.copy2)  # same sizes and mtimes: same settings
    one = tokenize(root, "a", "--shard_mb", SMALL)
    two = tokenize(other, "a", "--shard_mb", SMALL, "--workers", "2")
    assert {k: v for k, v in one.items() if k != "seconds"} == {k: v for k, v in two.items() if k != "seconds"}
    for name in os.listdir(token_folder(str(root), "a")):
        a = open(os.path.join(token_folder(str(root), "a"), name), "rb").read()
        b = open(os.path.join(token_folder(str(other), "a"), name), "rb").read()
        assert a == b or name == MANIFEST, name


def test_tokenize_resumes_after_a_failure_and_never_looks_complete(corpus, tmp_path_factory):
    root, _ = corpus
    clean = tmp_path_factory.mktemp("clean")
    shutil.copytree(root / "a", clean / "a", copy_function=shutil.copy2)
    reference = tokenize(clean, "a", "--shard_mb", SMALL)
    last = root / "a" / "a.chunk.2.jsonl"
    good = last.read_bytes()
    stat = os.stat(last)
    lines = good.decode().splitlines(keepends=True)
    last.write_text("".join(lines[:4] + ["#" + lines[4][1:]] + lines[5:]))  # line 5 of the last file is broken
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(LinguaError, match=r"a\.chunk\.2\.jsonl:5: malformed JSON"):
        tokenize(root, "a", "--shard_mb", SMALL)
    partial = root / "a" / "tokens.partial"
    assert not (root / "a" / "tokens").exists() and not (partial / MANIFEST).exists()
    done = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.npy")}
    assert done and all((partial / f"{n.rsplit('.', 2)[0]}.done.json").exists() for n in done)
    (partial / "train.00099.tokens.npy.tmp123").write_bytes(b"half a write")
    last.write_bytes(good)  # fixed (same size and mtime: the same plan), and run again: only what is left is done
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    m = tokenize(root, "a", "--shard_mb", SMALL)
    folder = token_folder(str(root), "a")
    assert all(os.stat(os.path.join(folder, n)).st_mtime_ns == t for n, t in done.items())  # not redone
    assert {k: v for k, v in m.items() if k != "seconds"} == {k: v for k, v in reference.items() if k != "seconds"}
    assert [d.tolist() for d in shard_documents(folder, m)] == \
        [d.tolist() for d in shard_documents(token_folder(str(clean), "a"), reference)]
    assert not any(".tmp" in n for n in os.listdir(folder))


@pytest.mark.slow
def test_tokenize_killed_with_sigkill_continues(tmp_path):
    write_source(tmp_path, "big", [1500, 1500, 1500])
    cmd = [sys.executable, str(ROOT / "setup" / "tokenize_data.py"), "--data_dir", str(tmp_path), "--source", "big",
           "--tokenizer", "bytes", "--shard_mb", "0.004", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = tmp_path / "big" / "tokens.partial"
    deadline = time.time() + 60
    while len(list(partial.glob("*.done.json"))) < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_pieces = len(json.loads((partial / "plan.json").read_text())["pieces"])
    done = list(partial.glob("*.done.json"))
    assert not (tmp_path / "big" / "tokens").exists() and 10 <= len(done) < n_pieces
    for marker in done:  # a piece marked done has both its files, complete
        record = json.loads(marker.read_text())
        tokens_path, index_path = shard_paths(str(partial), record["name"])
        assert np.load(tokens_path).shape == (record["tokens"],)
        assert np.load(index_path).shape == (record["docs"] + 1, 2)
    subprocess.run(cmd, check=True, timeout=300)
    m = read_manifest(token_folder(str(tmp_path), "big"))
    assert m["splits"]["train"]["docs"] == 4500 and len(m["splits"]["train"]["shards"]) == n_pieces


# ---------------------------------------------------------------------------------------------------------------------
# The token loader

@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)])  # (data-parallel ranks, grad_acc_steps)
def test_jsonl_and_tokens_give_the_same_batches(corpus, layout):
    root, _ = corpus
    dp, acc = layout

    def args(fmt, n_views=2):
        return args_for(root, sources={"a": 1.0, "b": 2.0}, batch_size=8 // dp // acc, n_views=n_views,
                        format=fmt)

    for n_views in (2, 3):
        reference, jsonl_states = global_batches(args("jsonl", n_views), dp, 30, acc)
        tokenize(root, "a", "--shard_mb", SMALL)  # only a: auto mixes a's shards with b's jsonl
        mixed, _ = global_batches(args("auto", n_views), dp, 30, acc)
        tokenize(root, "b")
        tokens, _ = global_batches(args("tokens", n_views), dp, 30, acc)
        assert same(mixed, reference) and same(tokens, reference)
        # the state is the same in both formats: a jsonl run continues from token shards, exactly
        first, states = global_batches(args("jsonl", n_views), dp, 12, acc)
        rest, _ = global_batches(args("tokens", n_views), dp, 18, acc, states=states)
        assert same(first + rest, reference)
        # the documents behind each row, as the probe and the data tests trace them: the same, by source name
        if layout == (1, 1):
            traced = {f: [refs for _, (_, refs, _) in zip(range(10), traced_batches(args(f, n_views)))]
                      for f in ("jsonl", "tokens")}
            assert traced["tokens"] == traced["jsonl"] and traced["jsonl"][0][0][0][0] in ("a", "b")
        for source in ("a", "b"):
            shutil.rmtree(token_folder(str(root), source))


def test_auto_takes_the_shards_only_when_the_manifest_matches(corpus, caplog):
    root, _ = corpus
    tokenize(root, "a")
    with DataLoader(args_for(root)) as loader:
        assert loader.plan.sources["a"]["format"] == "tokens"
    with caplog.at_level(logging.WARNING, logger="lingua.data.tokens"):
        with DataLoader(args_for(root, add_bos=False)) as loader:
            assert loader.plan.sources["a"]["format"] == "jsonl"
    assert "data.format=auto reads 'a' (train) from jsonl: token shards in" in caplog.text
    assert "made with add_bos=True add_eos=True, not data.add_bos=False data.add_eos=True" in caplog.text
    with pytest.raises(LinguaError, match="not data.add_bos=False") as e:
        DataLoader(args_for(root, add_bos=False, format="tokens"))
    assert "\n" not in str(e.value)
    write_source(root, "a", [20, 25, 16])  # the jsonl changed since it was tokenized: the shards are stale
    with pytest.raises(LinguaError, match="were made from other jsonl files than those in"):
        DataLoader(args_for(root, format="tokens"))
    with DataLoader(args_for(root)) as loader:
        assert loader.plan.sources["a"]["format"] == "jsonl"


def test_a_tokenizer_that_does_not_match_the_manifest_is_refused(corpus, tmp_path_factory):
    root, _ = corpus
    model = tmp_path_factory.mktemp("tok") / "other.model"
    model.write_bytes(b"not the bytes tokenizer")
    tokenize(root, "a")
    args = args_for(root, format="tokens", tokenizer=TokenizerArgs("sp", str(model)))
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    with pytest.raises(LinguaError, match=rf"were made with tokenizer bytes:None \(sha256 bytes\), not "
                                          rf"data.tokenizer sp:{model} \(sha256 {sha[:12]}\); re-run") as e:
        DataLoader(args)
    assert "\n" not in str(e.value)


def test_sentencepiece_shards_give_the_jsonl_batches(tmp_path):
    from tests.test_tokenizer import load_script

    write_source(tmp_path, "a", [60, 60])
    write_val(tmp_path, "a")
    model = tmp_path / "sp.model"
    load_script("train_tokenizer").main(["--data_dir", str(tmp_path), "--source", "a", "--vocab_size", "300",
                                         "--out", str(model)])
    m = tokenize(tmp_path, "a", "--workers", "2", tokenizer=model)
    assert m["tokenizer"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (m["tokenizer"]["name"], m["tokenizer"]["vocab_size"]) == ("sp", 300)
    sp = TokenizerArgs("sp", str(model))
    jsonl, _ = global_batches(args_for(tmp_path, format="jsonl", tokenizer=sp, batch_size=4), 1, 25)
    tokens, _ = global_batches(args_for(tmp_path, format="tokens", tokenizer=sp, batch_size=4), 1, 25)
    assert same(jsonl, tokens)


def test_a_shard_that_does_not_match_the_manifest_is_refused(corpus):
    root, _ = corpus
    m = tokenize(root, "a")
    tokens_path, _ = shard_paths(token_folder(str(root), "a"), m["splits"]["train"]["shards"][0]["name"])
    np.save(tokens_path, np.load(tokens_path)[:-5])
    with DataLoader(args_for(root, format="tokens")) as loader:
        with pytest.raises(LinguaError, match=r"train\.00000\.tokens\.npy does not match manifest\.json"):
            next(loader)


@pytest.mark.parametrize("dp_size,max_docs", [(1, None), (2, 3)])
def test_val_iterator_reads_token_shards_like_jsonl(corpus, dp_size, max_docs):
    root, _ = corpus
    tokenize(root, "a")
    for r in range(dp_size):
        kw = dict(max_docs=max_docs, dp_rank=r, dp_size=dp_size, tokenizer_args=TokenizerArgs())
        jsonl = list(val_iterator(str(root), "a", TOK, 16, 3, data_format="jsonl", **kw))
        tokens = list(val_iterator(str(root), "a", TOK, 16, 3, data_format="tokens", **kw))
        assert [n for _, n in jsonl] == [n for _, n in tokens] and sum(n for _, n in tokens) > 0
        assert same([b for b, _ in jsonl], [b for b, _ in tokens])
    os.remove(root / "a" / "a.val.jsonl")  # the shards alone are enough
    assert list(val_iterator(str(root), "a", TOK, 16, 3, data_format="auto", tokenizer_args=TokenizerArgs()))


# ---------------------------------------------------------------------------------------------------------------------
# Start-up and memory do not grow with the dataset

def write_token_corpus(root, source: str, n_tokens: int, n_shards: int, seed: int = 0) -> None:
    """A synthetic pre-tokenized source (bytes vocabulary), written directly: random documents of ~1000 tokens."""
    folder = token_folder(str(root), source)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    shards = []
    for k in range(n_shards):
        n = n_tokens // n_shards
        lengths = rng.integers(200, 1800, size=n // 600)
        lengths = lengths[np.cumsum(lengths) < n]
        lengths[-1] += n - lengths.sum()
        tokens = rng.integers(0, 256, size=n, dtype=np.uint16)
        tokens[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = TOK.bos_id
        index = np.zeros((len(lengths) + 1, 2), dtype=np.int64)
        index[1:, 0] = index[1:, 1] = np.cumsum(lengths)
        tokens_path, index_path = shard_paths(folder, f"train.{k:05d}")
        np.save(tokens_path, tokens)
        np.save(index_path, index)
        shards.append({"name": f"train.{k:05d}", "docs": len(lengths), "tokens": n, "bytes": n,
                       "input": f"{source}.chunk.{k}.jsonl"})
        del tokens
    split = {"docs": sum(s["docs"] for s in shards), "tokens": n_tokens, "bytes": n_tokens, "shards": shards}
    manifest = {"version": 1, "source": source, "tokenizer": {"name": "bytes", "sha256": "bytes", "vocab_size": 258},
                "add_bos": True, "add_eos": True, "dtype": "uint16", "splits": {"train": split}}
    (root / source / "tokens" / MANIFEST).write_text(json.dumps(manifest))


PROBE = """
import json, resource, sys, time
from lingua.data.loader import DataArgs, DataLoader

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

if __name__ == "__main__":
    before = rss_mb()
    t0 = time.perf_counter()
    loader = DataLoader(DataArgs(root_dir=sys.argv[1], sources={"synth": 1.0}, format="tokens", batch_size=8,
                                 seq_len=256, load_async=False))
    next(loader)
    startup = time.perf_counter() - t0
    for _ in range(300):
        next(loader)
    print(json.dumps({"startup_s": startup, "rss_mb": rss_mb() - before}))
"""


@pytest.mark.slow
def test_start_up_and_memory_do_not_grow_with_the_dataset(tmp_path):
    sizes = {"small": 2_000_000, "big": 200_000_000}
    for name, n in sizes.items():
        write_token_corpus(tmp_path / name, "synth", n, n_shards=4 if name == "small" else 8)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    results = {}
    for name in sizes:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        runs = [json.loads(subprocess.run([sys.executable, str(probe), str(tmp_path / name)], cwd=ROOT, check=True,
                                          env=env, capture_output=True, text=True, timeout=300).stdout)
                for _ in range(3)]
        results[name] = {k: min(r[k] for r in runs) for k in runs[0]}  # the least disturbed of three runs
    small, big = results["small"], results["big"]
    # 100x the tokens: the same start-up (one fill per stream) and memory (the fills, the pages they touch)
    assert big["startup_s"] < 2 * small["startup_s"] + 0.05, results
    assert big["rss_mb"] < 1.5 * small["rss_mb"] + 16, results
