"""One run per dump_dir: a second process on a dump_dir in use is refused in one line naming the holder, and a lock
whose holder died (kill -9) is free again."""

import os
import socket
import subprocess
import sys

import pytest

from lingua.args import load_config
from lingua.checkpoint.lock import RunLock
from lingua.errors import LinguaError
from lingua.models.transformer.spec import TRANSFORMER_SPEC
from lingua.train.loop import TrainArgs, train
from tests.conftest import ROOT, tiny_overrides

HOLD = "import sys, time; from lingua.checkpoint.lock import RunLock; l = RunLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(600)"


def test_second_run_on_a_dump_dir_is_refused_until_the_holder_is_gone(tiny_corpus, tmp_path):
    (tmp_path / "config.yaml").write_text("steps: 3\n")  # what the first run wrote: must survive the second
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LinguaError) as e:  # this process is the second run (tests/test_bad_inputs.py: the CLI)
            train(load_config(TrainArgs, tiny_overrides(tiny_corpus, tmp_path)), TRANSFORMER_SPEC)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(e.value) and str(tmp_path) in str(e.value)
        assert (tmp_path / "config.yaml").read_text() == "steps: 3\n"
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the kernel released the dead holder's lock: nothing stale to clean up
        assert f"pid {os.getpid()}" in (tmp_path / "run.lock").read_text()
