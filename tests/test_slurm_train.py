"""Real training through stool on the local SLURM cluster: a 2-task CPU job equals torchrun, and preemption resumes.

Needs `bash setup/slurm_local.sh start` (CI starts it); skipped without sbatch except in CI, where that fails.
"""

import json
import subprocess
import sys

import pytest

from lingua.args import load_config
from lingua.checkpoint.integrity import verify
from lingua.train.loop import TrainArgs
from tests.conftest import ROOT, read_jsonl, tiny_overrides
from tests.dist_helpers import free_port
from tests.slurm_helpers import (
    read_metrics,
    require_slurm,
    submit,
    submit_and_wait,
    wait_for,
    wait_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(400)]

CPU_JOB = ("nodes=1", "ngpu=0", "ncpu=1", "tasks_per_node=2")


@pytest.fixture(autouse=True)
def _slurm():
    require_slurm()


def write_config(tmp_path, corpus, **extra):
    """The tiny test run as a YAML file (stool takes a config file plus overrides)."""
    lines = []
    for item in tiny_overrides(corpus, tmp_path / "unused", **extra):
        key, value = item.split("=", 1)
        if key != "dump_dir":
            lines.append(f"{key}: {value}")
    path = tmp_path / "tiny.yaml"
    # dotted keys are not YAML nesting: let omegaconf build the tree from a dotlist, then save it as YAML
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.from_dotlist([line.replace(": ", "=", 1) for line in lines]), path)
    return path


def torchrun(config, dump_dir, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()),
           "-m", "apps.main.train", f"config={config}", f"dump_dir={dump_dir}", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    return {m["step"]: m["loss"] for m in read_jsonl(dump_dir / "metrics.jsonl")}


def test_two_task_training_job_equals_torchrun(tmp_path, tiny_corpus):
    config = write_config(tmp_path, tiny_corpus, steps=6, checkpoint__dump__every=3)
    job = submit_and_wait("apps.main.train", config, tmp_path / "slurm", *CPU_JOB, timeout=300)
    dump, log = tmp_path / "slurm", job.stdout_path.read_text()
    metrics = read_metrics(dump)
    assert "world: 2 process(es) via slurm" in log, job.logs()
    assert [m["step"] for m in metrics] == list(range(1, 7)), job.logs()
    assert f"done at step 6, loss {metrics[-1]['loss']:.4f}" in log, job.logs()  # the loop's last line
    # The config the job ran with (written by the job) is the file given plus what stool set: name, dump_dir.
    given = load_config(TrainArgs, [f"config={config}", f"dump_dir={dump}", "name=slurm"])
    assert load_config(TrainArgs, [f"config={dump / 'config.yaml'}"]) == given
    # Both ranks saved step 6 into one checkpoint whose checksums cover every file and hold.
    ckpt = dump / "checkpoints" / "0000000006"
    complete = json.loads((ckpt / "COMPLETE").read_text())
    assert complete["step"] == 6 and verify(ckpt) is True
    assert sorted(complete["sha256"]) == sorted(p.name for p in ckpt.iterdir() if p.name != "COMPLETE")
    rank_files = {"__0_0.distcp", "__1_0.distcp", "train_state_00000.json", "train_state_00001.json"}
    assert rank_files <= complete["sha256"].keys()
    for rank in (0, 1):
        state = json.loads((ckpt / f"train_state_{rank:05d}.json").read_text())
        # 6 steps x 2 ranks x batch_size 4 x seq_len 32 tokens
        assert (state["step"], state["tokens_seen"], state["world_size"]) == (6, 6 * 2 * 4 * 32, 2)
    reference = torchrun(config, tmp_path / "torchrun")
    assert {m["step"]: m["loss"] for m in metrics} == reference
    assert job.state == "COMPLETED"


def test_preempted_training_job_requeues_and_matches_uninterrupted(tmp_path, tiny_corpus):
    config = write_config(tmp_path, tiny_corpus, steps=300, checkpoint__dump__every=0, optim__warmup=0)
    dump_dir = tmp_path / "preempt"
    job = submit("apps.main.train", config, dump_dir, *CPU_JOB)
    wait_for(lambda: (dump_dir / "metrics.jsonl").exists() and len(read_metrics(dump_dir)) >= 5, 200,
             "the job to train a few steps", job)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job.job_id], check=True, timeout=10)
    wait_job(job, timeout=300)
    log = job.stdout_path.read_text() + job.stderr_path.read_text()
    assert "received SIGUSR2" in log and "requeueing SLURM job" in log, job.logs()
    assert "resumed from" in log, job.logs()
    steps = [m["step"] for m in read_metrics(dump_dir)]
    assert steps[-1] == 300 and 5 <= steps.index(steps[-1]) and len(set(steps)) == 300
    reference = torchrun(config, tmp_path / "reference")
    assert read_metrics(dump_dir)[-1]["loss"] == reference[300]
    assert job.state == "COMPLETED"
