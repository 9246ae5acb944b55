"""checkpoint.async_save: the same checkpoints as synchronous saves (the staged copy is the state at the save step,
whatever training does next), and a kill -9 during an async save leaves nothing half-written to resume from."""

import json
import subprocess
import sys
import time

import pytest
import torch

from lingua.args import load_config
from lingua.checkpoint.integrity import verify
from lingua.checkpoint.manager import list_checkpoints
from lingua.checkpoint.weights import consolidate
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs, train
from tests.conftest import ROOT, assert_same_weights, losses, tiny_overrides

STEPS = dict(steps=6, checkpoint__dump__every=3, eval__at_end=False)


def _weights(ckpt, out):
    consolidate(str(ckpt), str(out))
    return torch.load(out / "consolidated.pth", weights_only=True)["model"]


@pytest.mark.slow
def test_async_saves_write_the_same_checkpoints_as_sync(tiny_corpus, tmp_path):
    for mode in ("sync", "async"):
        train(load_config(TrainArgs, tiny_overrides(tiny_corpus, tmp_path / mode, **STEPS,
                                                    checkpoint__async_save=mode == "async")), TRANSFORMER_SPEC)
    sync, asyn = (list_checkpoints(tmp_path / m / "checkpoints") for m in ("sync", "async"))
    assert [p.name for p in asyn] == [p.name for p in sync] == ["0000000003", "0000000006"]
    for a, b in zip(sync, asyn):
        assert verify(b)  # COMPLETE carries checksums of the async-written files
        assert_same_weights(_weights(a, tmp_path / "c" / a.name), _weights(b, tmp_path / "d" / b.name))
        state = [json.loads((p / "train_state_00000.json").read_text()) for p in (a, b)]
        assert state[0]["data"] == state[1]["data"] and state[0]["step"] == state[1]["step"]
    assert losses(tmp_path / "sync") == losses(tmp_path / "async")


def _cli(corpus, dump_dir, **extra):
    return [sys.executable, "-m", "apps.main.train"] + tiny_overrides(corpus, dump_dir, **extra)


@pytest.mark.slow
def test_kill_9_during_an_async_save_then_resume(tiny_corpus, tmp_path):
    steps = dict(steps=30, checkpoint__dump__every=5, optim__warmup=0, eval__at_end=False, logging__freq=5)
    ref = tmp_path / "ref"
    subprocess.run(_cli(tiny_corpus, ref, **steps), check=True, capture_output=True, cwd=ROOT, timeout=600)
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(tiny_corpus, run, checkpoint__async_save=True, **steps), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts, caught = run / "checkpoints", False
    end = time.time() + 120
    while time.time() < end and proc.poll() is None:
        if len(list_checkpoints(ckpts)) >= 1 and any(p.name.endswith(".tmp") for p in ckpts.iterdir()):
            proc.kill()  # an async save is in flight
            caught = True
            break
        time.sleep(0.002)
    proc.wait()
    assert caught, "the run finished before an async save could be caught in flight"
    for p in list_checkpoints(ckpts):
        assert verify(p)  # whatever is complete is whole
    subprocess.run(_cli(tiny_corpus, run, checkpoint__async_save=True, **steps), check=True, capture_output=True,
                   cwd=ROOT, timeout=600)
    assert losses(ref)[30] == losses(run)[30]


def stepped_linear(width: int):
    """A (width, width) Linear and its AdamW after one step: optimizer state to save."""
    model = torch.nn.Linear(width, width)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def test_async_save_hashes_its_shards_off_the_training_thread(tmp_path):
    """The save returns once the state is staged (through DCP's DefaultStager: pinned memory on CUDA); the shards'
    checksums come from the hashing thread with the write, so wait() on the loop's thread hashes only the small
    train state; COMPLETE then verifies."""
    import threading

    from lingua.checkpoint.integrity import file_sha256
    from lingua.checkpoint.manager import CheckpointArgs, CheckpointManager

    model, opt = stepped_linear(64)
    mgr = CheckpointManager(CheckpointArgs(async_save=True), str(tmp_path))
    mgr.save(1, model, opt, {"step": 1}, {}, wait=False)
    pending = mgr._pending
    hashed = pending.future.result(timeout=60)  # written and hashed, before anyone called wait()
    shards = sorted(p.name for p in pending.tmp.glob("__0_*.distcp"))
    assert shards and sorted(k for k in hashed if k.endswith(".distcp")) == shards
    assert all(hashed[n] == file_sha256(pending.tmp / n) for n in shards)
    assert any(t.name.startswith("ckpt-hash") for t in threading.enumerate())
    mgr.wait()
    done = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert verify(done)
    # every file of the checkpoint is checksummed, the shards hashed off the thread included
    recorded = json.loads((done / "COMPLETE").read_text())["sha256"]
    assert sorted(recorded) == sorted(p.name for p in done.iterdir() if p.name != "COMPLETE")


def test_a_second_async_save_completes_the_first_before_it_starts(tmp_path):
    """At most one save in flight: a save while another is written first finishes that one (its COMPLETE)."""
    from lingua.checkpoint.manager import CheckpointArgs, CheckpointManager

    model, opt = stepped_linear(8)
    mgr = CheckpointManager(CheckpointArgs(async_save=True), str(tmp_path))
    mgr.save(1, model, opt, {"step": 1}, {}, wait=False)
    mgr.save(2, model, opt, {"step": 2}, {}, wait=False)
    mgr.wait()
    done = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in done] == ["0000000001", "0000000002"] and all(verify(p) for p in done)
