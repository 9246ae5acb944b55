"""Helpers for tests that submit real jobs through stool to the local cluster (setup/slurm_local.sh start).

A test names the module to run, so the same helpers drive tests/slurm_fake_train.py and apps.main.train:

    job = submit_and_wait("tests.slurm_fake_train", config, dump_dir, "ngpu=0", "ncpu=1", "tasks_per_node=2",
                          overrides=["steps=10"])
    assert job.state == "COMPLETED" and (job.dump_dir / "metrics.jsonl").exists()

Assert on what the job wrote, never on its state alone: a misconfigured cluster reports COMPLETED with exit 0 for a
job that ran nothing.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def slurm_problem() -> str | None:
    """Why SLURM cannot run jobs here, or None when it can."""
    if shutil.which("sbatch") is None:
        return "sbatch not found (start a local cluster: bash setup/slurm_local.sh start)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return f"SLURM controller not answering ({last}); start one: bash setup/slurm_local.sh start"
    if not out.stdout.strip():
        return "SLURM has no nodes"
    return None


def require_slurm() -> None:
    """Skip when SLURM is missing, except in CI (CI=true), where a missing cluster is a failure."""
    problem = slurm_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but SLURM is unusable: {problem}", pytrace=False)
    pytest.skip(problem)


@dataclass
class Job:
    job_id: str
    dump_dir: Path
    stool_output: str
    state: str = ""
    info: dict = field(default_factory=dict)

    @property
    def stdout_path(self) -> Path:
        return self.dump_dir / "logs" / f"{self.job_id}.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.dump_dir / "logs" / f"{self.job_id}.stderr"

    def logs(self) -> str:
        parts = []
        for p in (self.stdout_path, self.stderr_path):
            parts.append(f"--- {p.name}\n{p.read_text(errors='replace') if p.exists() else '(missing)'}")
        return "\n".join(parts)


def run_stool(*args: str, cwd: Path = ROOT, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m lingua.stool *args` from cwd (the code that gets snapshotted)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "lingua.tools.stool", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stool failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def submit(script: str, config, dump_dir, *stool_args: str, overrides=(), cwd: Path = ROOT) -> Job:
    """Submit `script` through stool; stool's own args (ngpu=0 ...) first, training overrides after `--`."""
    proc = run_stool(f"script={script}", f"config={config}", f"dump_dir={dump_dir}", *stool_args, "--",
                     *overrides, cwd=cwd)
    m = re.search(r"submitted job (\d+)", proc.stdout)
    assert m, f"no job id in stool's output:\n{proc.stdout}\n{proc.stderr}"
    return Job(m.group(1), Path(dump_dir), proc.stdout + proc.stderr)


def job_info(job_id: str) -> dict:
    """`scontrol show job` as a dict ({} once the controller forgot the job)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return {}
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out.stdout))


def wait_for(predicate, timeout: float, what: str, job: Job | None = None, interval: float = 0.2):
    """Poll predicate until it returns something truthy; on timeout cancel the job and fail with its logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    detail = ""
    if job is not None:
        detail = f"\njob {job.job_id}: {job_info(job.job_id)}\n{job.logs()}"
        subprocess.run(["scancel", job.job_id], capture_output=True, timeout=10)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")


def wait_job(job: Job, timeout: float = 120) -> Job:
    """Wait until the job reaches a terminal state (through any requeues); fills job.state and job.info."""
    def finished():
        info = job_info(job.job_id)
        return info if info.get("JobState") in TERMINAL else None
    job.info = wait_for(finished, timeout, f"job {job.job_id} to finish", job)
    job.state = job.info["JobState"]
    return job


def submit_and_wait(script: str, config, dump_dir, *stool_args: str, overrides=(), cwd: Path = ROOT,
                    timeout: float = 120) -> Job:
    return wait_job(submit(script, config, dump_dir, *stool_args, overrides=overrides, cwd=cwd), timeout)


def read_metrics(dump_dir) -> list[dict]:
    with open(Path(dump_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
