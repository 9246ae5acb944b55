"""stool against real SLURM daemons (bash setup/slurm_local.sh start), with tests/slurm_fake_train.py as the job.

Every assertion is on files the job wrote: a broken cluster can report COMPLETED for a job that ran nothing.
Swapping SCRIPT (and the config/overrides) for apps.main.train is all it takes to run these against real training.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.slurm_fake_train import loss_at
from tests.slurm_helpers import (
    ROOT,
    Job,
    job_info,
    read_metrics,
    require_slurm,
    run_stool,
    submit,
    submit_and_wait,
    wait_for,
    wait_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]

SCRIPT = "tests.slurm_fake_train"
CPU_JOB = ("nodes=1", "ngpu=0", "ncpu=1", "tasks_per_node=2")
# Characters that break naive shell or #SBATCH quoting; the job must see these values exactly.
NASTY = "a b 'q' \"dq\" $HOME ;x `id` 50%"


@pytest.fixture(autouse=True)
def _slurm():
    require_slurm()


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "fake.yaml"
    path.write_text("name: fake\ndump_dir: /nonexistent/replaced/by/stool\nsteps: 10\nstep_time: 0.02\n")
    return path


def rank_file(dump_dir: Path, restart: int, rank: int) -> dict:
    return json.loads((dump_dir / "ranks" / f"restart{restart}_rank{rank}.json").read_text())


def sbatch_directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_two_task_cpu_job_writes_where_stool_said(tmp_path, config):
    dump_dir = tmp_path / f"run {NASTY}"
    job = submit_and_wait(SCRIPT, config, dump_dir, *CPU_JOB, "time=5", f"name=job {NASTY}", timeout=60,
                          overrides=["step_time=0.01"])
    # The batch script: every directive, in sbatch's quoting (double quotes, \" inside; % doubled in file names,
    # where SLURM reads it as a pattern), and the job step: srun with the job's shape, the config stool wrote.
    quoted = lambda v: '"' + v.replace('"', '\\"') + '"'  # noqa: E731  (NASTY holds no backslash)
    logs = f"{dump_dir}/logs".replace("%", "%%")
    script = (dump_dir / "submit.slurm").read_text()
    assert sbatch_directives(script) == [
        f"--job-name={quoted(f'job {NASTY}')}", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
        "--time=5", f"--output={quoted(logs + '/%j.stdout')}", f"--error={quoted(logs + '/%j.stderr')}",
        "--open-mode=append", "--signal=USR2@120", "--requeue"]
    assert ("  srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \"$PYTHON\" -u -m "
            'tests.slurm_fake_train config="$DUMP_DIR/base_config.yaml" &') in script.splitlines()
    # SLURM read those directives as meant: what the controller recorded for the job
    assert (job.info["NumNodes"], job.info["NumTasks"], job.info["TimeLimit"]) == ("1", "2", "00:05:00"), job.info
    assert (job.info["Requeue"], job.info["ExitCode"]) == ("1", "0:0"), job.info
    # The config the job ran with: the file given, name and dump_dir from stool, the override after `--`.
    assert OmegaConf.to_container(OmegaConf.load(dump_dir / "base_config.yaml")) == {
        "name": f"job {NASTY}", "dump_dir": str(dump_dir), "steps": 10, "step_time": 0.01}
    # stool told us where the logs go; they are there, with both tasks' output and nothing else.
    assert f"logs: {dump_dir}/logs/{job.job_id}.stdout" in job.stool_output
    log = job.stdout_path.read_text().splitlines()
    assert re.fullmatch(rf"\[stool\] job {job.job_id} restart 0 on \S+ at \S+: {re.escape(str(dump_dir))}/code",
                        log[0]), job.logs()
    assert sorted(log[1:]) == sorted([f"[fake_train] rank {r}/2 restart 0 job {job.job_id}: steps 0..9"
                                      for r in (0, 1)] + [f"[fake_train] rank {r} done" for r in (0, 1)]), job.logs()
    # The job wrote its results into dump_dir, with two ranks and every step's loss.
    done = json.loads((dump_dir / "done.json").read_text())
    assert done == {"final_step": 9, "final_loss": loss_at(9), "restart": 0, "job_id": job.job_id, "world_size": 2}
    assert [(m["step"], m["loss"]) for m in read_metrics(dump_dir)] == [(s, loss_at(s)) for s in range(10)]
    for rank in (0, 1):
        seen = rank_file(dump_dir, 0, rank)
        assert seen["env"]["SLURM_JOB_NAME"] == f"job {NASTY}"  # the #SBATCH quoting survived sbatch's parser
        assert seen["name"] == f"job {NASTY}" and seen["dump_dir"] == str(dump_dir)
        assert seen["cwd"] == str(dump_dir / "code")  # ran from the snapshot
        assert seen["file"] == str(dump_dir / "code" / "tests" / "slurm_fake_train.py")
        assert seen["lingua"] == str(dump_dir / "code" / "lingua" / "__init__.py")  # not the editable install
    assert job.state == "COMPLETED"


def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path, config):
    dump_dir = tmp_path / "preempt"
    job = submit(SCRIPT, config, dump_dir, *CPU_JOB, overrides=["wait_for_signal_at=4"])
    wait_for(lambda: (dump_dir / "waiting_for_signal").exists(), 60, "the job to reach step 4", job)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job.job_id], check=True, timeout=10)
    wait_job(job, timeout=90)  # includes the requeue delay, cred_expire + 1 s

    first, rerun = rank_file(dump_dir, 0, 0), rank_file(dump_dir, 1, 0)
    assert first["start_step"] == 0 and first["env"].get("SLURM_RESTART_COUNT", "0") == "0"
    assert rerun["env"]["SLURM_RESTART_COUNT"] == "1" and rerun["start_step"] == 4, job.logs()
    assert rank_file(dump_dir, 1, 1)["start_step"] == 4
    # Every step exactly once, the first four before the preemption, and the same losses as an uninterrupted run.
    metrics = read_metrics(dump_dir)
    assert [(m["step"], m["restart"]) for m in metrics] == [(s, int(s >= 4)) for s in range(10)]
    assert [m["loss"] for m in metrics] == [loss_at(s) for s in range(10)]
    done = json.loads((dump_dir / "done.json").read_text())
    assert done["restart"] == 1 and done["final_loss"] == loss_at(9)
    log = job.stdout_path.read_text() + job.stderr_path.read_text()
    assert "SIGUSR2: forwarding to the job step" in log
    assert "restart 0 on" in log and "restart 1 on" in log  # --open-mode=append kept the first attempt's log
    assert job.state == "COMPLETED"


def test_queued_job_runs_the_code_as_submitted(tmp_path, config):
    # A git project of our own, so that editing "the working tree" touches nothing shared.
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "slurm_fake_train.py", project / "tests" / "slurm_fake_train.py")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "."], cwd=project, check=True)
    # Hold both CPUs so the job stays queued while we edit the code.
    blocker = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--output=/dev/null", "--job-name=blocker",
                              "--wrap=sleep 60"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        dump_dir = tmp_path / "snapshot"
        job = submit(SCRIPT, config, dump_dir, *CPU_JOB, cwd=project)
        assert job_info(job.job_id).get("JobState") == "PENDING"
        source = project / "tests" / "slurm_fake_train.py"
        source.write_text(source.read_text().replace('CODE_VERSION = "original"', 'CODE_VERSION = "edited"'))
        assert 'CODE_VERSION = "edited"' in source.read_text()
    finally:
        subprocess.run(["scancel", blocker], timeout=10)
    wait_job(job, timeout=60)
    seen = rank_file(dump_dir, 0, 0)
    assert seen["code_version"] == "original", job.logs()
    assert seen["file"] == str(dump_dir / "code" / "tests" / "slurm_fake_train.py")


def test_dry_run_writes_the_script_without_submitting_and_it_runs_by_hand(tmp_path, config):
    dump_dir = tmp_path / "dry"
    name = f"dry-{tmp_path.name}"
    proc = run_stool(f"script={SCRIPT}", f"config={config}", f"dump_dir={dump_dir}", f"name={name}", *CPU_JOB,
                     "dry_run=true")
    assert "submitted job" not in proc.stdout
    squeue = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=10)
    assert squeue.stdout.strip() == "" and not (dump_dir / "done.json").exists()
    script = (dump_dir / "submit.slurm").read_text()
    assert sbatch_directives(script) == [
        f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
        f"--output={dump_dir}/logs/%j.stdout", f"--error={dump_dir}/logs/%j.stderr", "--open-mode=append",
        "--signal=USR2@120", "--requeue"]
    assert OmegaConf.to_container(OmegaConf.load(dump_dir / "base_config.yaml")) == {
        "name": name, "dump_dir": str(dump_dir), "steps": 10, "step_time": 0.02}
    # The written script is self-contained: sbatch it from elsewhere, as a user resubmitting by hand would.
    out = subprocess.run(["sbatch", "--parsable", str(dump_dir / "submit.slurm")], cwd="/", capture_output=True,
                         text=True, check=True, timeout=10)
    job = wait_job(Job(out.stdout.strip().split(";")[0], dump_dir, ""), timeout=60)
    done = json.loads((dump_dir / "done.json").read_text())
    assert done == {"final_step": 9, "final_loss": loss_at(9), "restart": 0, "job_id": job.job_id,
                    "world_size": 2}, job.logs()
