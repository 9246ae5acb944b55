"""The loader (lingua/data/loader.py, lingua/data/streams.py, lingua/data/jsonl.py) on small corpora written by the tests, with the bytes
tokenizer: packing, the world-size-invariant data order, exact resume on any layout, the async process, bad input."""

import dataclasses
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

from lingua.data.batches import DataArgs, open_stores
from lingua.data.loader import DataLoader, traced_batches
from lingua.data.streams import group_states, initial_stream_state, mixed_documents
from lingua.data.tokenizer import ByteTokenizer, TokenizerArgs
from lingua.data.validation import val_iterator
from lingua.errors import ConfigError, LinguaError

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


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(batches_a, batches_b))


def global_batches(args, dp_size: int, steps: int, grad_acc: int = 1, states=None) -> list[dict]:
    """The global batch of each step as `dp_size` ranks of batch args.batch_size see it: every rank's micro-batches,
    rows in rank order, micro-batches one after the other. `states`: resume all ranks from these."""
    loaders = [DataLoader(args, r, dp_size, grad_acc) for r in range(dp_size)]
    for loader in loaders:
        if states is not None:
            loader.load_state_dicts(states)
    out = []
    for _ in range(steps):
        micro = [[next(loader) for loader in loaders] for _ in range(grad_acc)]
        out.append({k: np.concatenate([b[k] for m in micro for b in m]) for k in micro[0][0]})
    saved = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]  # as a checkpoint stores it
    for loader in loaders:
        loader.close()
    return out, saved


@pytest.fixture
def corpus(tmp_path):
    write_source(tmp_path, "a", [20, 25, 15])
    write_source(tmp_path, "b", [30, 30])
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------------
# Packing

@pytest.mark.parametrize("n_views", [2, 3])
def test_packing_no_padding_and_boundaries(corpus, n_views):
    # one stream and a fill of one row: the shuffle is the identity, so batches follow the stream's tokens
    args = args_for(corpus, batch_size=1, prefetch_size=1, n_views=n_views, seq_len=24, sources={"a": 1.0, "b": 1.0})
    with DataLoader(args) as loader:
        stores = open_stores(loader.plan, TOK)
        docs = mixed_documents(stores, args.sources, args.seed, 0, 1, initial_stream_state(0, args.sources))
        stream = np.concatenate([next(docs)[0] for _ in range(40)])
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
# The data order: streams, ranks, sources

@pytest.mark.parametrize("n_views", [2, 3])
def test_global_batch_is_the_same_on_1_2_4_ranks_and_with_grad_accumulation(corpus, n_views):
    args = args_for(corpus, sources={"a": 1.0, "b": 2.0}, n_views=n_views, batch_size=8)
    reference, _ = global_batches(args, 1, 20)
    for dp_size, grad_acc in [(2, 1), (4, 1), (1, 2), (2, 2), (8, 1), (1, 4)]:  # (1, 4): 4 micro-batches, in order
        b = 8 // dp_size // grad_acc
        got, _ = global_batches(args_for(corpus, sources={"a": 1.0, "b": 2.0}, n_views=n_views, batch_size=b),
                                dp_size, 20, grad_acc)
        assert same(got, reference), (dp_size, grad_acc)
    # the seed, and only the seed, changes the order
    other, _ = global_batches(args_for(corpus, sources={"a": 1.0, "b": 2.0}, n_views=n_views, batch_size=8,
                                       seed=7), 1, 20)
    assert not same(other, reference)


def test_n_streams_is_a_multiple_of_the_rows_of_a_micro_batch(corpus):
    args = args_for(corpus, batch_size=2, n_streams=16)
    reference, _ = global_batches(args, 1, 12)
    got, _ = global_batches(args_for(corpus, batch_size=1, n_streams=16), 2, 12)
    assert same(got, reference)  # 16 streams: 2 ranks x 1 row == 1 rank x 2 rows
    with pytest.raises(ConfigError, match=r"data.n_streams=6 is not a multiple of data.batch_size x data-parallel "
                                          r"ranks = 2 x 2 = 4") as e:
        DataLoader(args_for(corpus, batch_size=2, n_streams=6), 0, 2)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="is not a multiple"):  # 4 streams cannot be shared out between 3 ranks
        DataLoader(args_for(corpus, batch_size=1, n_streams=4), 0, 3)


def spans_until_epoch(args, dp_rank, dp_size, epochs=2, max_batches=20_000):
    """{(source, doc): [(start, end), ...]} of the epoch-0 input tokens a rank yields, reading until every stream of
    it has started epoch `epochs` of every source (so no epoch-0 token is left in a shuffle buffer)."""
    with DataLoader(args, dp_rank, dp_size) as loader:
        states = {int(k): v for k, v in loader.state_dict()["streams"].items()}
    spans = {}
    for n, (_, refs, after) in enumerate(traced_batches(args, dp_rank, dp_size)):
        for row in refs:
            for source, epoch, doc, a, b in row:
                if epoch == 0:
                    spans.setdefault((source, doc), []).append((a, b))
        states.update(group_states(after))
        if all(c["epoch"] >= epochs for st in states.values() for c in st["src"].values()):
            return spans
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
    complete = all((source, doc) in counts and counts[(source, doc)].min() >= 1
                   for source, lengths in lengths_by_source.items() for doc in range(len(lengths)))
    repeated = int(sum(np.maximum(c - 1, 0).sum() for c in counts.values()))
    return complete, repeated


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_every_token_once_per_epoch_and_ranks_own_their_streams(corpus, dp_size):
    args = args_for(corpus, sources={"a": 1.0, "b": 2.0}, batch_size=4 // dp_size, n_streams=4)
    per_rank = [spans_until_epoch(args, r, dp_size) for r in range(dp_size)]
    lengths = {s: doc_lengths(corpus, s) for s in ("a", "b")}
    complete, repeated = coverage(per_rank, lengths)
    assert complete and repeated == 0  # every document of every chunk file, each token once
    for r in range(dp_size):
        # rank r owns streams r * b .. r * b + b - 1 of the 4, hence documents i with i % 4 in that range
        b = 4 // dp_size
        assert all(doc % 4 // b == r for (_, doc) in per_rank[r])
        for q in range(r + 1, dp_size):
            assert not set(per_rank[r]) & set(per_rank[q])  # no document on two ranks


def test_source_weights_respected(corpus):
    args = args_for(corpus, sources={"a": 3.0, "b": 1.0})
    with DataLoader(args) as loader:
        stores = open_stores(loader.plan, TOK)
    docs = mixed_documents(stores, args.sources, args.seed, 1, 2, initial_stream_state(1, args.sources))
    n = 4000
    share_a = sum(next(docs)[1][0] == "a" for _ in range(n)) / n
    assert abs(share_a - 0.75) < 0.03  # binomial sd is 0.007


def test_each_stream_draws_its_own_source_order(corpus):
    # streams mix on their own (seeds depend on (seed, stream)): two streams drawing the same order of sources would
    # keep the weights but correlate every global batch's rows
    args = args_for(corpus, sources={"a": 1.0, "b": 1.0})
    with DataLoader(args, 0, 1, 2) as loader:  # 2 micro-batches of 2 rows: 4 streams
        stores = open_stores(loader.plan, TOK)

    def sources(stream):
        docs = mixed_documents(stores, args.sources, args.seed, stream, 4, initial_stream_state(stream, args.sources))
        return [next(docs)[1][0] for _ in range(64)]

    orders = [sources(s) for s in range(4)]
    assert all(orders[i] != orders[j] for i in range(4) for j in range(i))  # equal by chance: 2 ** -64


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume

@pytest.mark.parametrize("stop_at", [3, 4, 9])  # mid-fill, at a fill boundary (prefetch_size 4), later
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


def test_exact_resume_between_the_micro_batches_of_a_step(corpus):
    """5 micro-batches of 2 per step, mid-fill: the two row groups stand at different rows (3 and 2), and the next
    micro-batch is the second group's; the loader finds it from the rows each stream yielded (fill and row)."""
    args = args_for(corpus, sources={"a": 1.0, "b": 0.5})
    with DataLoader(args, 0, 1, 2) as loader:
        reference = take(loader, 13)
    with DataLoader(args, 0, 1, 2) as loader:
        take(loader, 5)
        state = json.loads(json.dumps(loader.state_dict()))
    with DataLoader(args, 0, 1, 2) as loader:
        loader.load_state_dict(state)
        assert same(take(loader, 8), reference[5:])


def test_exact_resume_across_epochs(tmp_path):
    write_source(tmp_path, "tiny", [2, 1])  # a few hundred tokens per stream: 20 batches cycle through it many times
    write_source(tmp_path, "a", [4])
    args = args_for(tmp_path, sources={"tiny": 3.0, "a": 1.0}, prefetch_size=3)
    with DataLoader(args) as loader:
        reference = take(loader, 20)
        assert max(st["src"]["tiny"]["epoch"] for st in loader.state_dict()["streams"].values()) >= 2
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


def test_async_child_tokenizes_with_the_configured_model(corpus, sp_model):
    """The child process builds its own tokenizer from data.tokenizer (name and path): the same batches as in-process."""
    args = args_for(corpus, tokenizer=TokenizerArgs(name="sp", path=str(sp_model)))
    with DataLoader(args) as loader:
        reference = take(loader, 3)
    assert reference[0]["input"].max() >= 258  # sentencepiece ids (400 pieces), not the bytes tokenizer's
    with DataLoader(dataclasses.replace(args, load_async=True)) as loader:
        assert same(take(loader, 3), reference)


@pytest.mark.parametrize("old,new", [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((2, 1), (4, 1)), ((4, 1), (2, 1)),
                                     ((1, 1), (4, 1)), ((2, 1), (1, 2)), ((1, 2), (4, 1)),
                                     # several ranks AND several micro-batches on the new side (and the old)
                                     ((1, 1), (2, 2)), ((4, 1), (2, 2)), ((2, 2), (4, 1)), ((2, 2), (1, 2))])
def test_resume_on_another_layout_continues_the_same_global_batches(corpus, old, new):
    # (dp ranks, grad_acc_steps) of the same global batch of 8 rows; stopped mid-fill (prefetch_size 4, 6 steps)
    def args(dp, acc):
        return args_for(corpus, sources={"a": 1.0, "b": 2.0}, batch_size=8 // dp // acc)

    reference, _ = global_batches(args(1, 1), 1, 14)
    first, states = global_batches(args(*old), old[0], 6, old[1])
    assert same(first, reference[:6])
    # the train loop gives every rank the states of all old ranks (tensor-parallel ranks repeat theirs)
    rest, _ = global_batches(args(*new), new[0], 8, new[1], states=states + states[:1])
    assert same(rest, reference[6:])  # nothing dropped, nothing repeated, bit-identical


def test_load_state_dict_takes_only_this_ranks_streams(corpus):
    states = []
    for r in range(2):
        with DataLoader(args_for(corpus), r, 2) as loader:
            take(loader, 3)
            states.append(loader.state_dict())
    with DataLoader(args_for(corpus), 1, 2) as loader:
        with pytest.raises(LinguaError, match=r"no saved state for stream\(s\) \[2, 3\] of data-parallel rank 1"):
            loader.load_state_dict(states[0])
        loader.load_state_dict(states[1])
        assert loader.state_dict() == states[1]


def test_resume_refuses_states_it_cannot_continue(corpus, caplog):
    args = args_for(corpus)
    _, states = global_batches(args, 1, 3)
    v1 = {"version": 1, "dp_rank": 0, "dp_size": 1, "gen": 0, "fill": 0, "next": 3, "seqs": {}}
    cases = [
        ([v1], "data loader state version 1 in the checkpoint was written by an older lingua"),
        ([dict(states[0], n_streams=4)], r"has n_streams=4, this run data.n_streams=2 \(default: the global batch"),
        ([dict(states[0], seq_len=64)], "has seq_len=64, this run data.seq_len=32"),
    ]
    for bad, message in cases:
        with DataLoader(args) as loader:
            with pytest.raises(LinguaError, match=message) as e:
                loader.load_state_dicts(bad)
            assert "\n" not in str(e.value) and "data.reset_state=true" in str(e.value)
        with DataLoader(args_for(corpus, reset_state=True)) as loader, caplog.at_level(logging.WARNING):
            loader.load_state_dicts(bad)  # restarts the data order, says so
            assert same(take(loader, 2), global_batches(args, 1, 2)[0])
        assert "data.reset_state=true" in caplog.text
    # states of two different steps are not one position of the data order
    _, later = global_batches(args_for(corpus, batch_size=1), 2, 5)
    _, earlier = global_batches(args_for(corpus, batch_size=1), 2, 3)
    with DataLoader(args) as loader, pytest.raises(LinguaError, match="do not describe one position"):
        loader.load_state_dicts([earlier[0], later[1]])
    # the two streams of one micro-batch's rows written at different positions (a state edited by hand): both have
    # yielded 4 rows, at the end of fill 0 (fill 0, next 4 = prefetch_size) and at the start of fill 1: refused
    _, at_fill_end = global_batches(args, 1, 4)
    edited = json.loads(json.dumps(at_fill_end[0]))
    assert [(v["fill"], v["next"]) for v in edited["streams"].values()] == [(1, 0), (1, 0)]
    edited["streams"]["0"].update(fill=0, next=4)
    with DataLoader(args) as loader:
        loader.load_state_dicts([edited])
        with pytest.raises(LinguaError, match=r"^data loader state: streams \[0, 1\] of one micro-batch row group "
                                              r"stand at different positions \(a state edited by hand"):
            next(loader)
    with DataLoader(args, 0, 1) as loader, pytest.raises(LinguaError, match="no data loader states given"):
        loader.load_state_dicts([])


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


def test_async_worker_runs_one_compute_thread(corpus):
    # the trainer's cores are for the step: BLAS/OpenMP runtimes in the loader's process get one thread each
    with DataLoader(args_for(corpus, load_async=True)) as loader:
        next(loader)
        pid = loader._pipeline.proc.pid
        env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        threads = int(open(f"/proc/{pid}/status").read().split("Threads:")[1].split()[0])
    assert all(env[k] == "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"))
    assert threads <= 3  # the pipeline, the queue's feeder thread (and at most one more of Python's own)
    assert os.environ.get("OMP_NUM_THREADS") != "0"  # the trainer's environment is left as it was


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
import faulthandler, os, signal, sys, time
from lingua.data.loader import DataArgs, DataLoader
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for the stacks of a run that does not exit
# a run started from a terminal turns Ctrl-C into KeyboardInterrupt; pytest started as a script's background job
# inherits SIGINT ignored, and so would this run
signal.signal(signal.SIGINT, signal.default_int_handler)
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
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        pytest.fail(f"the run did not exit within 20 s ({how}); its threads:\n{proc.communicate()[1][-4000:]}")
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
    texts = write_source(tmp_path, "a", [4])
    path = tmp_path / "a" / "a.chunk.0.jsonl"
    path.write_text(path.read_text() + "not json\n" + '{"no_text": 1}\n')
    with caplog.at_level(logging.WARNING, logger="lingua.data.jsonl"):
        with DataLoader(args_for(tmp_path, skip_bad_lines=True, prefetch_size=1, batch_size=1)) as loader:
            tokens = np.concatenate([b["input"][0] for b in take(loader, 40)])
    assert "a.chunk.0.jsonl:5: malformed JSON" in caplog.text and "a.chunk.0.jsonl:6" in caplog.text
    assert "(2 so far in 'a')" in caplog.text
    good = np.concatenate([TOK.encode(t) for t in texts])  # one stream: the good documents, again and again
    assert np.array_equal(tokens[: len(good)], good)


def test_config_errors_are_one_line(corpus, tmp_path):
    cases = [
        (DataArgs(sources={"a": 1.0}), "data.root_dir is not set"),
        (DataArgs(root_dir=str(tmp_path / "nope"), sources={"a": 1.0}), "does not exist"),
        (args_for(corpus, sources={"a": 1.0, "c": 1.0}), "unknown data source 'c'"),
        (args_for(corpus, sources={"a": 0.0}), r"data.sources.a: weight must be > 0"),
        (args_for(corpus, sources={"b": -1}), r"data.sources.b: weight must be > 0"),
        (args_for(corpus, sources={}), "data.sources is empty"),
        (args_for(corpus, n_views=1), "n_views must be >= 2"),
        (args_for(corpus, format="parquet"), "data.format must be one of auto, jsonl, tokens, got 'parquet'"),
        (args_for(corpus, format="tokens"), "data.format=tokens but source 'a' has no token shards"),
    ]
    (corpus / "empty").mkdir()
    cases.append((args_for(corpus, sources={"empty": 1.0}), "data source 'empty' has no chunk files"))
    for args, message in cases:
        with pytest.raises(LinguaError, match=message) as e:
            DataLoader(args)
        assert "\n" not in str(e.value)


def test_too_few_documents_for_the_streams(tmp_path):
    write_source(tmp_path, "a", [3])
    with DataLoader(args_for(tmp_path, batch_size=4), 0, 1) as loader:
        with pytest.raises(LinguaError, match=r"data source 'a' has no document for stream 3 of 4 \(too few "):
            next(loader)


def test_omegaconf_structured_config(corpus):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(DataArgs), {"root_dir": str(corpus), "sources": {"a": 1.0},
                                                           "load_async": False, "tokenizer": {"name": "bytes"}})
    with DataLoader(cfg) as loader:
        assert next(loader)["input"].shape == (2, 256)
