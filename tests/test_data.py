"""The loader (lingua/data.py, lingua/jsonl.py) on small corpora written by the tests, with the bytes tokenizer."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lingua.data import DataArgs, DataLoader, Plan, initial_state, merge_states, shuffled_batches, validate
from lingua.val_data import val_iterator
from lingua.errors import LinguaError
from lingua.jsonl import mixed_documents
from lingua.tokenizer import ByteTokenizer, TokenizerArgs

TOK = ByteTokenizer()


def doc_text(source: str, k: int) -> str:
    """A distinct document of 20..150 characters, with some non-ASCII."""
    rng = np.random.default_rng(k)
    words = ["to", "be", "or", "not", "thee", "thou", "hath", "ère", "naïve", "—", "art"]
    return f"{source}#{k}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 30))))


def write_source(root, name: str, docs_per_file: list[int], start: int = 0) -> list[str]:
    """<root>/<name>/<name>.chunk.<k>.jsonl with the given numbers of documents; returns all texts in stream order."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    texts, k = [], start
    for f, n in enumerate(docs_per_file):
        with open(folder / f"{name}.chunk.{f}.jsonl", "w") as out:
            for _ in range(n):
                texts.append(doc_text(name, k))
                out.write(json.dumps({"text": texts[-1], "source": name, "id": k}) + "\n")
                k += 1
    return texts


def args_for(root, **kw) -> DataArgs:
    kw.setdefault("sources", {"a": 1.0})
    kw.setdefault("load_async", False)
    return DataArgs(root_dir=str(root), **{"batch_size": 2, "seq_len": 32, "prefetch_size": 4, **kw})


def documents(plan):
    """The document stream of rank 0 of 1 (what the packer consumes)."""
    state = initial_state(plan.files, 0, 1)["seqs"]["docs"]
    return mixed_documents(plan.files, plan.args.sources, plan.args.seed, 0, 1, 0, state)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(batches_a, batches_b))


@pytest.fixture
def corpus(tmp_path):
    write_source(tmp_path, "a", [20, 25, 15])
    write_source(tmp_path, "b", [30, 30])
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------------
# Packing

@pytest.mark.parametrize("n_views", [2, 3])
def test_packing_no_padding_and_boundaries(corpus, n_views):
    # prefetch 1 x batch 1: the shuffle is the identity, so batches follow the token stream
    args = args_for(corpus, batch_size=1, prefetch_size=1, n_views=n_views, seq_len=24)
    plan = Plan(args, validate(args), 0, 1)
    docs = documents(plan)
    stream = np.concatenate([TOK.encode(next(docs)[0][0]) for _ in range(40)])
    with DataLoader(args) as loader:
        batches = take(loader, 30)
    S = args.seq_len
    for i, b in enumerate(batches):
        assert b["input"].dtype == np.int64 and b["input"].shape == (1, S) and b["tok_idx"].shape == (1, S)
        seq = stream[i * S: i * S + S + n_views - 1]  # consecutive sequences overlap by n_views - 1
        assert np.array_equal(b["input"][0], seq[:S])
        if n_views == 2:
            assert b["target"].shape == (1, S) and np.array_equal(b["target"][0], seq[1: S + 1])
        else:
            assert b["target"].shape == (1, S, n_views - 1)
            for v in range(1, n_views):
                assert np.array_equal(b["target"][0, :, v - 1], seq[v: v + S])
        # tok_idx restarts at each document start (BOS) and at the sequence start, and counts up in between
        starts = b["input"][0] == TOK.bos_id
        starts[0] = True
        expected = np.arange(S) - np.maximum.accumulate(np.where(starts, np.arange(S), 0))
        assert np.array_equal(b["tok_idx"][0], expected)


def test_bos_eos_options(corpus):
    args = args_for(corpus, add_bos=False, add_eos=True, batch_size=1, prefetch_size=1)
    with DataLoader(args) as loader:
        b = np.concatenate([x["input"][0] for x in take(loader, 20)])
    assert TOK.bos_id not in b and TOK.eos_id in b


# ---------------------------------------------------------------------------------------------------------------------
# Sharding and sampling

def epoch0_spans(args, dp_rank, dp_size, state=None, max_batches=10_000):
    """{(source, line): [(start, end), ...]} of the input tokens yielded by one rank until its whole first epoch is
    out of the shuffle buffer, plus the number of batches."""
    plan = Plan(args, validate(args), dp_rank, dp_size)
    state = state or initial_state(plan.files, dp_rank, dp_size)
    spans, n = {}, 0
    for n, (_, st, rows) in enumerate(shuffled_batches(plan, TOK, state, with_spans=True), 1):
        for row in rows:
            for source, epoch, line, a, b in row:
                if epoch == 0:
                    spans.setdefault((source, line), []).append((a, b))
        start = st["seqs"]
        if all(c["epoch"] >= 1 for c in start["docs"]["sources"].values()) and (
                start["doc"] is None or start["doc"][1] >= 1):
            return spans, n
        assert n < max_batches
    raise AssertionError("unreachable")


def doc_lengths(root, source):
    out = []
    for f in sorted(os.listdir(root / source), key=lambda p: int(p.split(".")[-2])):
        out += [len(TOK.encode(json.loads(line)["text"])) for line in open(root / source / f)]
    return out


def coverage(spans_list, lengths_by_source):
    """(every token of every epoch-0 document covered?, number of tokens yielded more than once)."""
    counts = {}
    for spans in spans_list:
        for key, ranges in spans.items():
            c = counts.setdefault(key, np.zeros(lengths_by_source[key[0]][key[1]], dtype=np.int64))
            for a, b in ranges:
                c[a:b] += 1
    complete = all((source, line) in counts and counts[(source, line)].min() >= 1
                   for source, lengths in lengths_by_source.items() for line in range(len(lengths)))
    repeated = int(sum(np.maximum(c - 1, 0).sum() for c in counts.values()))
    return complete, repeated


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_every_chunk_read_no_document_shared(corpus, dp_size):
    args = args_for(corpus, sources={"a": 1.0, "b": 2.0})
    per_rank = [epoch0_spans(args, r, dp_size)[0] for r in range(dp_size)]
    lengths = {s: doc_lengths(corpus, s) for s in ("a", "b")}
    complete, repeated = coverage(per_rank, lengths)
    assert complete and repeated == 0  # every document of every chunk file, each token once
    for r in range(dp_size):
        for q in range(r + 1, dp_size):
            assert not set(per_rank[r]) & set(per_rank[q])  # no document on two ranks
    assert all(line % dp_size == r for r, spans in enumerate(per_rank) for (_, line) in spans)


def test_source_weights_respected(corpus):
    args = args_for(corpus, sources={"a": 3.0, "b": 1.0})
    plan = Plan(args, validate(args), 0, 1)
    docs = documents(plan)
    n = 4000
    share_a = sum(next(docs)[0][1][0] == "a" for _ in range(n)) / n
    assert abs(share_a - 0.75) < 0.03  # binomial sd is 0.007


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume

@pytest.mark.parametrize("stop_at", [3, 4, 9])  # mid-buffer, at a buffer boundary (prefetch_size 4), later
def test_exact_resume_sync(corpus, stop_at):
    args = args_for(corpus, sources={"a": 1.0, "b": 0.5})
    with DataLoader(args) as loader:
        reference = take(loader, stop_at + 8)
    with DataLoader(args) as loader:
        take(loader, stop_at)
        state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    with DataLoader(args) as loader:
        loader.load_state_dict(state)
        assert same(take(loader, 8), reference[stop_at:])


def test_exact_resume_across_epochs(tmp_path):
    write_source(tmp_path, "tiny", [2, 1])  # a few hundred tokens: 20 batches of 64 cycle through it many times
    write_source(tmp_path, "a", [4])
    args = args_for(tmp_path, sources={"tiny": 1.0, "a": 1.0}, prefetch_size=3)
    with DataLoader(args) as loader:
        reference = take(loader, 20)
        assert loader.state_dict()["seqs"]["docs"]["sources"]["tiny"]["epoch"] >= 1
    for stop_at in (7, 14):
        with DataLoader(args) as loader:
            take(loader, stop_at)
            state = loader.state_dict()
        with DataLoader(args) as loader:
            loader.load_state_dict(state)
            assert same(take(loader, 20 - stop_at), reference[stop_at:])


def test_exact_resume_async_matches_sync(corpus):
    sync_args = args_for(corpus, sources={"a": 1.0, "b": 0.5})
    with DataLoader(sync_args) as loader:
        reference = take(loader, 14)
    with DataLoader(sync_args) as loader:
        take(loader, 6)
        sync_state = loader.state_dict()
    async_args = args_for(corpus, sources={"a": 1.0, "b": 0.5}, load_async=True)
    with DataLoader(async_args) as loader:
        assert same(take(loader, 6), reference[:6])
        time.sleep(0.2)  # the child runs ahead; the state must still be that of the 6 consumed batches
        state = json.loads(json.dumps(loader.state_dict()))
    assert state == sync_state
    with DataLoader(async_args) as loader:
        loader.load_state_dict(state)
        assert same(take(loader, 8), reference[6:])


def test_load_state_dict_checks_rank(corpus):
    states = []
    for r in range(2):
        with DataLoader(args_for(corpus), r, 2) as loader:
            take(loader, 3)
            states.append(loader.state_dict())
    with DataLoader(args_for(corpus), 1, 2) as loader:
        with pytest.raises(LinguaError, match="load_state_dicts"):
            loader.load_state_dict(states[0])
        loader.load_state_dicts(states * 2)  # same world size: each rank takes its own state, exactly
        assert loader.state_dict() == states[1]


# ---------------------------------------------------------------------------------------------------------------------
# Resume at another world size

@pytest.mark.parametrize("old_size,new_size,steps", [(2, 1, 5), (1, 2, 6), (2, 3, 7), (3, 2, 4)])
def test_elastic_resume_within_bound(corpus, old_size, new_size, steps):
    args = args_for(corpus, sources={"a": 1.0, "b": 1.0})
    plan_old = [Plan(args, validate(args), r, old_size) for r in range(old_size)]
    old_spans, old_states = [], []
    for plan in plan_old:
        spans = {}
        batches = shuffled_batches(plan, TOK, initial_state(plan.files, plan.dp_rank, old_size), with_spans=True)
        for _ in range(steps):
            _, state, rows = next(batches)
            for row in rows:
                for source, epoch, line, a, b in row:
                    spans.setdefault((source, line), []).append((a, b))
        old_spans.append(spans)
        old_states.append(json.loads(json.dumps(state)))
    merged = merge_states(old_states, ["a", "b"])
    new_spans = []
    for r in range(new_size):
        state = dict(merged, dp_rank=r, dp_size=new_size)
        new_spans.append(epoch0_spans(args, r, new_size, state)[0])
    lengths = {s: doc_lengths(corpus, s) for s in ("a", "b")}
    complete, repeated = coverage(old_spans + new_spans, lengths)
    assert complete  # nothing dropped
    bound = old_size * (args.prefetch_size - 1) * args.batch_size * args.seq_len  # see lingua/data.py docstring
    assert repeated <= bound
    # the same through the public API (tensor-parallel ranks repeat their group's state: duplicates are fine)
    with DataLoader(args, 0, new_size) as loader:
        loader.load_state_dicts(old_states + old_states[:1])
        assert loader.state_dict()["dp_size"] == new_size and next(loader)["input"].shape == (2, 32)


def test_elastic_resume_at_buffer_boundary_repeats_nothing(corpus):
    args = args_for(corpus, sources={"a": 1.0})
    old = []
    for r in range(2):
        plan = Plan(args, validate(args), r, 2)
        batches = shuffled_batches(plan, TOK, initial_state(plan.files, r, 2), with_spans=True)
        spans = {}
        for _ in range(args.prefetch_size):  # exactly one full buffer
            _, state, rows = next(batches)
            for row in rows:
                for source, epoch, line, a, b in row:
                    spans.setdefault((source, line), []).append((a, b))
        old.append((spans, state))
    merged = merge_states([s for _, s in old], ["a"])
    new = epoch0_spans(args, 0, 1, dict(merged, dp_rank=0, dp_size=1))[0]
    complete, repeated = coverage([s for s, _ in old] + [new], {"a": doc_lengths(corpus, "a")})
    assert complete and repeated == 0


# ---------------------------------------------------------------------------------------------------------------------
# Async process lifecycle

def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True  # exited; only waiting for a reaper
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_async_close_and_exceptions_leave_no_process(corpus):
    args = args_for(corpus, load_async=True)
    with DataLoader(args) as loader:
        next(loader)
        pid = loader._pipeline.proc.pid
    assert gone(pid)
    with pytest.raises(ValueError):
        with DataLoader(args) as loader:
            next(loader)
            pid = loader._pipeline.proc.pid
            raise ValueError("trainer failed")
    assert gone(pid)


SCRIPT = """
import os, sys, time
from lingua.data import DataArgs, DataLoader
def main():
    loader = DataLoader(DataArgs(root_dir=sys.argv[1], sources={"a": 1.0}, seq_len=32, prefetch_size=4))
    next(loader)
    print(loader._pipeline.proc.pid, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), 9)
    with loader:
        while True:
            next(loader)
            time.sleep(0.01)
if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_async_no_orphan_on_ctrl_c_or_parent_death(corpus, tmp_path, how):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen([sys.executable, str(script), str(corpus), how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    child = int(proc.stdout.readline())
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole process group
    proc.wait(timeout=20)
    assert gone(child, timeout=10)
    if how == "ctrl-c":
        assert "KeyboardInterrupt" in proc.stderr.read()


def test_async_error_names_file_line(tmp_path):
    write_source(tmp_path, "a", [5])
    with open(tmp_path / "a" / "a.chunk.0.jsonl", "a") as f:
        f.write('{"text": "unterminated\n')
    with DataLoader(args_for(tmp_path, load_async=True)) as loader:
        with pytest.raises(LinguaError, match=r"a\.chunk\.0\.jsonl:6: malformed JSON"):
            take(loader, 50)
        assert loader._pipeline is None or gone(loader._pipeline.proc.pid)


# ---------------------------------------------------------------------------------------------------------------------
# Validation iterator

def test_val_iterator_scores_every_token_once(tmp_path):
    write_source(tmp_path, "a", [3])
    texts = [doc_text("val", k) for k in range(11)]
    with open(tmp_path / "a" / "a.val.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    stream = np.concatenate([TOK.encode(t) for t in texts])
    scored, total_bytes, S = [], 0, 16
    for batch, n_bytes in val_iterator(str(tmp_path), "a", TOK, seq_len=S, batch_size=3):
        assert all(batch[k].shape == (3, S) for k in ("input", "target", "tok_idx", "mask"))
        for row in range(3):
            m = batch["mask"][row].astype(bool)
            assert m[: m.sum()].all()  # real targets first, then padding
            scored.append(batch["target"][row][m])
            assert (batch["tok_idx"][row][batch["input"][row] == TOK.bos_id] == 0).all()
        total_bytes += n_bytes
    assert np.array_equal(np.concatenate(scored), stream[1:])  # every token but the first BOS, exactly once
    assert total_bytes == sum(len(t.encode("utf-8")) for t in texts)
    n = sum(m.sum() for m in [b["mask"] for b, _ in val_iterator(str(tmp_path), "a", TOK, S, 3, max_docs=2)])
    assert n == len(TOK.encode(texts[0])) + len(TOK.encode(texts[1])) - 1


def test_val_iterator_missing_file(tmp_path):
    write_source(tmp_path, "a", [3])
    with pytest.raises(LinguaError, match="no validation file for source 'a'"):
        next(val_iterator(str(tmp_path), "a", TokenizerArgs(), 16, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("line,message", [('{"text": "cut', "malformed JSON"), ('{"body": "x"}', "no string 'text'"),
                                          ('["text"]', "no string 'text'")])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    write_source(tmp_path, "a", [4])
    path = tmp_path / "a" / "a.chunk.0.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [line] + lines[2:]) + "\n")
    with DataLoader(args_for(tmp_path)) as loader:
        with pytest.raises(LinguaError, match=rf"a\.chunk\.0\.jsonl:3: {message}"):
            take(loader, 20)


def test_skip_bad_lines_counts_and_logs(tmp_path, caplog):
    write_source(tmp_path, "a", [4])
    path = tmp_path / "a" / "a.chunk.0.jsonl"
    path.write_text(path.read_text() + "not json\n" + '{"no_text": 1}\n')
    with caplog.at_level(logging.WARNING, logger="lingua.jsonl"):
        with DataLoader(args_for(tmp_path, skip_bad_lines=True, prefetch_size=1)) as loader:
            take(loader, 10)
            assert loader.state_dict()["seqs"]["docs"]["sources"]["a"]["bad"] >= 2
    assert "a.chunk.0.jsonl:5: malformed JSON" in caplog.text and "a.chunk.0.jsonl:6" in caplog.text


def test_config_errors_are_one_line(corpus, tmp_path):
    cases = [
        (DataArgs(sources={"a": 1.0}), "data.root_dir is not set"),
        (DataArgs(root_dir=str(tmp_path / "nope"), sources={"a": 1.0}), "does not exist"),
        (args_for(corpus, sources={"a": 1.0, "c": 1.0}), "unknown data source 'c'"),
        (args_for(corpus, sources={"a": 0.0}), r"data.sources.a: weight must be > 0"),
        (args_for(corpus, sources={"b": -1}), r"data.sources.b: weight must be > 0"),
        (args_for(corpus, sources={}), "data.sources is empty"),
        (args_for(corpus, n_views=1), "n_views must be >= 2"),
    ]
    (corpus / "empty").mkdir()
    cases.append((args_for(corpus, sources={"empty": 1.0}), "data source 'empty' has no chunk files"))
    for args, message in cases:
        with pytest.raises(LinguaError, match=message) as e:
            DataLoader(args)
        assert "\n" not in str(e.value)


def test_too_few_documents_for_ranks(tmp_path):
    write_source(tmp_path, "a", [1])
    with DataLoader(args_for(tmp_path), 1, 2) as loader:
        with pytest.raises(LinguaError, match="no document for data-parallel rank 1 of 2"):
            next(loader)


def test_omegaconf_structured_config(corpus):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(DataArgs), {"root_dir": str(corpus), "sources": {"a": 1.0},
                                                           "load_async": False, "tokenizer": {"name": "bytes"}})
    with DataLoader(cfg) as loader:
        assert next(loader)["input"].shape == (2, 256)
