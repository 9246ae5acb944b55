"""A stand-in for a training run, for stool's end-to-end tests: no torch, no model, the same contract.

    python -m tests.slurm_fake_train config=<yaml> [key=value ...]

Config keys: dump_dir, name, steps (default 20), step_time (seconds per step, 0.05), wait_for_signal_at (-1 = never;
else, in the first attempt only, block at that step until SIGUSR2 arrives, at most 60 s, after touching
<dump_dir>/waiting_for_signal so a test knows when to send it), read_file (a path, read and reported, so tests can
check how relative paths like data/... resolve).

Like a real training run it reads its rank from SLURM_PROCID (srun) or RANK (torchrun), rank 0 appends one line per
step to <dump_dir>/metrics.jsonl, resumes from <dump_dir>/checkpoints/latest.json, and on SIGUSR2 checkpoints and
requeues its job with `scontrol requeue $SLURM_JOB_ID` (the rerun sees SLURM_RESTART_COUNT=1). Each rank also
writes <dump_dir>/ranks/restart<R>_rank<K>.json with what it saw (env, cwd, its own path, CODE_VERSION), and rank 0
writes <dump_dir>/done.json at the end, so tests assert on files the job wrote, never on its state alone.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

from omegaconf import OmegaConf

CODE_VERSION = "original"  # the snapshot test edits this line in the working tree after submitting

_signalled = False


def _on_usr2(signum, frame):
    global _signalled
    _signalled = True


def loss_at(step: int) -> float:
    return round(1.0 / (1 + step), 6)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def load_config(argv: list[str]):
    config = [a.split("=", 1)[1] for a in argv if a.startswith("config=")]
    cfg = OmegaConf.load(config[0]) if config else OmegaConf.create()
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([a for a in argv if not a.startswith("config=")]))
    return cfg


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR2, _on_usr2)  # first thing: the default action for SIGUSR2 is to die
    cfg = load_config(argv)
    dump_dir, steps = cfg.dump_dir, int(cfg.get("steps", 20))
    step_time, wait_at = float(cfg.get("step_time", 0.05)), int(cfg.get("wait_for_signal_at", -1))
    rank = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", 0)))
    world = int(os.environ.get("SLURM_NTASKS", os.environ.get("WORLD_SIZE", 1)))
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    job_id = os.environ.get("SLURM_JOB_ID")
    os.makedirs(f"{dump_dir}/ranks", exist_ok=True)
    os.makedirs(f"{dump_dir}/checkpoints", exist_ok=True)
    ckpt = f"{dump_dir}/checkpoints/latest.json"

    start = 0
    if os.path.exists(ckpt):
        with open(ckpt) as f:
            start = json.load(f)["step"] + 1
    env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "OMP_NUM_THREADS")}
    write_json(f"{dump_dir}/ranks/restart{restart}_rank{rank}.json", {
        "rank": rank, "world_size": world, "restart": restart, "job_id": job_id, "start_step": start,
        "name": cfg.get("name"), "dump_dir": dump_dir, "cwd": os.getcwd(), "file": os.path.abspath(__file__),
        "code_version": CODE_VERSION, "python": sys.executable, "host": socket.gethostname(), "env": env,
        "read_file": open(cfg.read_file).read() if cfg.get("read_file") else None,  # a relative path, like data/
        "lingua": getattr(importlib.util.find_spec("lingua"), "origin", None),  # where `import lingua` would load
    })
    print(f"[fake_train] rank {rank}/{world} restart {restart} job {job_id}: steps {start}..{steps - 1}", flush=True)
    # Like init_process_group: nobody trains (or writes the final checkpoint) before every rank has started.
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{dump_dir}/ranks/restart{restart}_rank{k}.json") for k in range(world)):
        if time.monotonic() > deadline:
            print(f"[fake_train] rank {rank}: not all {world} ranks started within 60 s", flush=True)
            return 1
        time.sleep(0.02)

    for step in range(start, steps):
        if step == wait_at and restart == 0 and not _signalled:
            if rank == 0:
                open(f"{dump_dir}/waiting_for_signal", "w").close()
            deadline = time.monotonic() + 60
            while not _signalled and time.monotonic() < deadline:
                time.sleep(0.05)
        if _signalled:
            return preempted(rank, step - 1, ckpt, job_id, dump_dir)
        time.sleep(step_time)
        if rank == 0:
            with open(f"{dump_dir}/metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_at(step), "restart": restart, "world_size": world}) + "\n")

    if rank == 0:
        write_json(ckpt, {"step": steps - 1})
        write_json(f"{dump_dir}/done.json", {"final_step": steps - 1, "final_loss": loss_at(steps - 1),
                                              "restart": restart, "job_id": job_id, "world_size": world})
    print(f"[fake_train] rank {rank} done", flush=True)
    return 0


def preempted(rank: int, last_step: int, ckpt: str, job_id: str | None, dump_dir: str) -> int:
    print(f"[fake_train] rank {rank}: SIGUSR2 after step {last_step}", flush=True)
    if rank != 0:
        return wait_to_be_killed(rank)
    write_json(ckpt, {"step": last_step})
    if not job_id:
        print("[fake_train] checkpointed; no SLURM job to requeue", flush=True)
        return 0
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    print(f"[fake_train] checkpointed step {last_step}, scontrol requeue {job_id}: rc {proc.returncode} "
          f"{proc.stdout.strip()} {proc.stderr.strip()}", flush=True)
    return wait_to_be_killed(rank) if proc.returncode == 0 else 1


def wait_to_be_killed(rank: int) -> int:
    # The requeue ends this job; exiting early could let srun report success for a run that did not finish.
    time.sleep(60)
    print(f"[fake_train] rank {rank}: still alive 60 s after the requeue", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
