"""Faults at scale, with real torchrun processes: a dead rank costs one restart (and resumes exactly), a hung rank is
one error line, a slow rank is visible in metrics.jsonl, a loss spike can be skipped."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from lingua.distributed.mesh import DistEnv, attempt_store
from tests.conftest import assert_same_weights, final_weights, read_jsonl, tiny_overrides
from tests.dist_helpers import free_port, torchrun

STEPS, EVERY = 8, 2


def cfg(corpus, dump_dir, **extra) -> list[str]:
    base = dict(steps=STEPS, checkpoint__dump__every=EVERY, optim__warmup=0, distributed__dp_shard=2)
    return tiny_overrides(corpus, dump_dir, **{**base, **extra})


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults") / "ref"
    torchrun(2, cfg(tiny_corpus, d))
    return d


def assert_same_run(ref: Path, got: Path, steps=STEPS):
    """Bit-identical final weights, and metrics.jsonl with every step once, each with the uninterrupted loss."""
    rows, ref_rows = read_jsonl(got / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert_same_weights(final_weights(ref), final_weights(got))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--exit-at", "4"], ["--exit-in-save", "4"]], ids=["in_step", "in_save"])
def test_killed_rank_restarts_every_rank_and_resumes_exactly(tiny_corpus, tmp_path, uninterrupted, flags):
    d = tmp_path / "run"
    out = torchrun(2, cfg(tiny_corpus, d), flags + ["--fail-rank", "1"], max_restarts=1, timeout=600)
    assert "[test] rank 1 exits" in out.stdout
    assert "resumed from" in out.stdout and "at step 2 " in out.stdout, out.stdout[-3000:]  # the save of step 4 died
    assert_same_run(uninterrupted, d)


def test_each_launch_gets_a_key_prefix_of_its_own():
    """torchrun's agent store outlives a restart: a restarted rank must not see what the last launch wrote there (the
    dead ranks' gloo addresses, which made restarted ranks fail with 'Connection refused'), and every rank of one
    launch must agree on the prefix whichever starts first, whatever torchrun's per-node restart counts say."""
    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)  # noqa: F841 (the server)
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    first = [attempt_store(DistEnv("torchrun", r, 2, 0, "127.0.0.1", port), 10, env) for r in (0, 1)]
    first[1].set("rank_1", "127.0.0.1:39823")
    got = {}
    late = threading.Thread(target=lambda: got.update(rank1=attempt_store(
        DistEnv("torchrun", 1, 2, 0, "127.0.0.1", port), 30, env)))
    late.start()  # rank 1 of the second launch usually asks before its rank 0 drew a number: it must wait for it
    time.sleep(0.2)
    second0 = attempt_store(DistEnv("torchrun", 0, 2, 0, "127.0.0.1", port), 10, env)
    late.join()
    second0.set("probe", "x")
    assert got["rank1"].check(["probe"]) and not first[0].check(["probe"])
    assert first[0].check(["rank_1"]) and not second0.check(["rank_1"])


@pytest.mark.slow
def test_stopped_rank_is_one_line_naming_step_phase_and_rank(tiny_corpus, tmp_path):
    timeout_s = 10  # the stall the others wait out; torchrun then SIGKILLs the stopped rank (its SIGTERM is held)
    out = torchrun(2, cfg(tiny_corpus, tmp_path / "stop", steps=50, distributed__timeout_s=timeout_s),
                   ["--stop-at", "3", "--fail-rank", "1"], check=False, timeout=300)
    assert out.returncode != 0 and "[test] rank 1 stops at step 3" in out.stdout
    lines = [x for x in out.stdout.splitlines() if x.startswith("error: rank 0: ")]
    assert len(lines) == 1, out.stdout[-3000:]
    # rank 0 waits in its forward's all-gather; rank 1's last heartbeat may be from step 2 (one per second)
    assert "at step 3 (forward); ranks that did not arrive: 1 (not responding, last seen at step " in lines[0], lines[0]
    assert f"(distributed.timeout_s={timeout_s})" in lines[0], lines[0]


@pytest.mark.slow
def test_slow_rank_is_named_in_metrics_and_warned_about(tiny_corpus, tmp_path):
    d = tmp_path / "slow"
    slow_ms = 300  # far above a tiny step's own time (a few ms), so no load on the machine can reverse the order
    out = torchrun(2, cfg(tiny_corpus, d, steps=5, checkpoint__dump__every=0, checkpoint__save_at_end=False),
                   ["--slow-rank", "1", "--slow-ms", str(slow_ms)])
    rows = read_jsonl(d / "metrics.jsonl")
    assert [r["slowest_rank"] for r in rows] == [1] * 5
    assert all(r["rank_ms_max"] >= slow_ms > r["rank_ms_min"] for r in rows), rows
    assert "rank 1 is slow" in out.stdout and "up to step 3 (logging.slow_rank_factor=2)" in out.stdout


@pytest.mark.slow
def test_loss_spike_skips_resume_exactly_and_agree_on_every_rank(tiny_corpus, tmp_path):
    # factor 1 over a window of 2 skips a step whose loss is above the mean of the last two: steps 11 and 12 here
    steps = 12
    spikes = dict(steps=steps, optim__spike_factor=1.0, optim__spike_window=2, optim__lr=3e-2,
                  checkpoint__dump__every=5)
    ref, run = tmp_path / "ref", tmp_path / "run"
    torchrun(2, cfg(tiny_corpus, ref, **spikes))
    torchrun(2, cfg(tiny_corpus, run, **spikes), ["--exit-at", "11", "--fail-rank", "1"], max_restarts=1)
    rows = read_jsonl(ref / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0] * 10 + [1, 2]
    assert [r["skipped_steps"] for r in read_jsonl(run / "metrics.jsonl")] == [r["skipped_steps"] for r in rows]
    assert_same_run(ref, run, steps)  # step 11 is judged by the window of steps 9-10, from the checkpoint of step 10
    for d in (ref, run):  # every rank judged the same global loss the same way
        ckpt = d / "checkpoints" / f"{steps:010d}"
        states = [json.loads((ckpt / f"train_state_{r:05d}.json").read_text())["spikes"] for r in (0, 1)]
        assert states[0] == states[1] and states[0]["skipped"] == rows[-1]["skipped_steps"]
