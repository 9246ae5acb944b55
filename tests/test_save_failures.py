"""A save that cannot be written (a full disk) is one line that says so and names the last complete checkpoint; its
temp dir is removed, and a rerun on the still-full disk starts (stale temp dirs go before anything is written)."""

import errno
import os
import subprocess
import uuid

import pytest

from lingua.args import load_config
from lingua.checkpoint.manager import list_checkpoints
from lingua.errors import LinguaError
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs, train
from tests.conftest import read_jsonl, tiny_overrides


@pytest.fixture
def small_disk(tmp_path):
    """A 1.4 MB tmpfs: one tiny checkpoint (~0.9 MB) fits, a second does not. Needs root (mount)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path):
    """Write zeros until the disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _run(corpus, dump_dir, **extra):
    return train(load_config(TrainArgs, tiny_overrides(corpus, dump_dir, eval__at_end=False, **extra)),
                 TRANSFORMER_SPEC)


def test_disk_full_during_a_save_is_one_line_and_a_rerun_starts(tiny_corpus, small_disk):
    run = small_disk / "run"
    msg = (f"checkpoint step 4: no space left on device in {run / 'checkpoints'}; "
           "the last complete checkpoint is 2")
    with pytest.raises(LinguaError) as e:
        _run(tiny_corpus, run, steps=6, checkpoint__dump__every=2)
    assert str(e.value) == msg
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["0000000002"]  # the .tmp is gone
    # a save killed on the full disk left a temp dir that fills it to the last byte; the rerun still starts, resumes
    # from 2 and fails at the same save with the same line
    stale = run / "checkpoints" / "0000000004.tmp"
    stale.mkdir()
    _fill(stale / "__0_0.distcp")
    with pytest.raises(LinguaError) as e:
        _run(tiny_corpus, run, steps=6, checkpoint__dump__every=2)
    assert str(e.value) == msg and not stale.exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")][-2:] == [3, 4]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["0000000002"]
