"""Launch the real train loop under torchrun for the distributed tests, with a few test-only instruments.

    torchrun --nproc_per_node 2 -m tests.dist_helpers [--global-batch] [--record DIR] [--exit-at STEP]
        [--hang-at STEP] [--fail-rank R] [--spec module:attr] -- key=value ...

It runs `lingua.train.loop.train` exactly as `apps.main.train` does (or the app of `--spec`), after patching the loop's
DataLoader / build_model / checkpoint load (in this process only):
  --global-batch   every data-parallel rank reads the single-process stream of global batches (batch_size x dp_size
                   rows) and keeps its own rows, so a run on N ranks sees exactly the batches a 1-process run with
                   N times the batch size sees. Without it each rank reads its own stream, as in production.
  --record DIR     writes DIR/rank<R>.json (dp/tp rank and size, pid, local parameter count, a hash per batch) and,
                   on rank 0, DIR/init.pt (the full model right after init) and DIR/loaded.pt (the full model and
                   optimizer right after a checkpoint was loaded), to compare layouts exactly.
  --exit-at/--hang-at/--stop-at STEP with --fail-rank R: rank R dies (os._exit), hangs (sleeps, sockets open) or
                   stops (SIGSTOP, the whole process frozen) when it fetches the batch of step STEP; under torchrun's
                   --max-restarts only in the first attempt, so the restarted job runs through.
  --exit-in-save STEP with --fail-rank R: rank R dies while checkpoint STEP is written (its shards are on disk, the
                   checkpoint has no COMPLETE marker yet); first attempt only.
  --slow-rank R --slow-ms MS: rank R sleeps MS before every batch (a slow GPU, a throttled host).
  --signal-at STEP with --fail-rank R: rank R alone receives SIGUSR2 (a preemption) when it fetches that batch.

The tests-side launcher (`torchrun`, `free_port`) is here too.
"""

import argparse
import copy
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, overrides: list[str], helper_flags=(), module="tests.dist_helpers", nnodes=1,
                 node_rank=0, port=None, max_restarts=0) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
           f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
           f"--max_restarts={max_restarts}", "-m", module]
    return cmd + (list(helper_flags) + ["--"] if module == "tests.dist_helpers" else []) + list(overrides)


def torchrun(nproc: int, overrides: list[str], helper_flags=(), timeout=600, check=True, **kw):
    """Run one torchrun job to completion in the repo root; returns the CompletedProcess (stdout+stderr merged)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run(torchrun_cmd(nproc, overrides, helper_flags, **kw), cwd=ROOT, env=env, timeout=timeout,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"torchrun exited {out.returncode}:\n{out.stdout[-6000:]}")
    return out


# ---------------------------------------------------------------- inside the launched processes


def _flat(sd: dict, prefix="") -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            out.update(_flat(dict(enumerate(v)), f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fake_world_build(world: int, overrides: list[str]) -> None:
    """Build and initialise the model as rank 0 of a `world`-rank FSDP job, in this one process: torch's fake
    process group makes every collective a no-op, so only the sharding (what this rank allocates) is real. Prints
    {"total", "local", "peak_rss_mb_before", "peak_rss_mb_after"} as JSON."""
    import resource

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lingua.args import load_config
    from lingua.distributed.mesh import DistEnv, DistState
    from lingua.models.transformer.spec import TRANSFORMER_SPEC
    from lingua.train.loop import TrainArgs, build_model

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    args = load_config(TrainArgs, overrides + [f"distributed.dp_shard={world}"])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh("cpu", (1, 1, world, 1, 1), mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"))
    state = DistState(DistEnv("torchrun", 0, world), torch.device("cpu"), mesh, 0, world, 1)
    before = rss_mb()
    model = build_model(args, TRANSFORMER_SPEC, state, torch.float32)
    params = list(model.parameters())
    print(json.dumps({"total": sum(p.numel() for p in params), "local": sum(p.to_local().numel() for p in params),
                      "peak_rss_mb_before": before, "peak_rss_mb_after": rss_mb()}))
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    if "--" in argv:
        i = argv.index("--")
        flags, overrides = argv[:i], argv[i + 1:]
    else:
        flags, overrides = [], argv
    p = argparse.ArgumentParser()
    p.add_argument("--global-batch", action="store_true")
    p.add_argument("--record")
    p.add_argument("--exit-at", type=int)
    p.add_argument("--hang-at", type=int)
    p.add_argument("--signal-at", type=int)
    p.add_argument("--stop-at", type=int)
    p.add_argument("--exit-in-save", type=int)
    p.add_argument("--fail-rank", type=int, default=1)
    p.add_argument("--slow-rank", type=int)
    p.add_argument("--slow-ms", type=float, default=0.0)
    p.add_argument("--fake-world", type=int)
    p.add_argument("--spec", default="lingua.models.transformer.spec:TRANSFORMER_SPEC", help="the ModelSpec to train (module:attr)")
    opts = p.parse_args(flags)
    if opts.fake_world:
        return fake_world_build(opts.fake_world, overrides)

    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    import lingua.train.loop as loop
    from lingua.args import run_cli
    from lingua.checkpoint.manager import CheckpointManager
    from lingua.models.spec import get_spec

    rank = int(os.environ.get("RANK", 0))
    failing = rank == opts.fail_rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    record = {"rank": rank, "pid": os.getpid(), "batches": []}
    out_dir = Path(opts.record) if opts.record else None

    class Loader(loop.DataLoader):
        def __init__(self, args, dp_rank=0, dp_size=1, grad_acc_steps=1):
            record.update(dp_rank=dp_rank, dp_size=dp_size)
            self.rows = None
            if opts.global_batch and dp_size > 1:
                b = args.batch_size
                self.rows = slice(dp_rank * b, (dp_rank + 1) * b)
                args = copy.deepcopy(args)
                args.batch_size = b * dp_size
                dp_rank, dp_size = 0, 1
            super().__init__(args, dp_rank, dp_size, grad_acc_steps)

        def __next__(self):
            step = len(record["batches"]) + 1
            if failing and opts.exit_at == step:
                print(f"[test] rank {rank} exits at step {step}", flush=True)
                os._exit(3)
            if failing and opts.stop_at == step:
                print(f"[test] rank {rank} stops at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)
            if rank == opts.slow_rank:
                time.sleep(opts.slow_ms / 1000)
            if failing and opts.hang_at == step:
                print(f"[test] rank {rank} hangs at step {step}", flush=True)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's teardown must still kill it at once
                while True:
                    time.sleep(1)
            if rank == opts.fail_rank and opts.signal_at == step:
                os.kill(os.getpid(), signal.SIGUSR2)
            batch = super().__next__()
            if self.rows is not None:
                batch = {k: v[self.rows] for k, v in batch.items()}
            record["batches"].append(hashlib.sha1(batch["input"].tobytes()).hexdigest())
            return batch

    def build_model(args, spec, dist_state, dtype):
        model = orig_build(args, spec, dist_state, dtype)
        record.update(tp_rank=dist_state.tp_rank, tp_size=dist_state.tp_size, world_size=dist_state.world_size,
                      local_numel=sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters()))
        if out_dir is not None:
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            if dist_state.is_main:
                torch.save({k: v.clone() for k, v in sd.items()}, out_dir / "init.pt")
        return model

    def load(self, path, model, optimizer):
        states = orig_load(self, path, model, optimizer)
        if out_dir is not None:
            msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
            if int(os.environ.get("RANK", 0)) == 0:
                torch.save({"model": msd, "optim": _flat(osd)}, out_dir / "loaded.pt")
        return states

    def finish(self, step, tmp, *a, **kw):
        if failing and opts.exit_in_save == step:
            print(f"[test] rank {rank} exits while saving step {step}", flush=True)
            os._exit(3)
        return orig_finish(self, step, tmp, *a, **kw)

    orig_build, orig_load, orig_finish = loop.build_model, CheckpointManager.load, CheckpointManager._finish
    loop.DataLoader, loop.build_model, CheckpointManager.load = Loader, build_model, load
    CheckpointManager._finish = finish
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"pid{rank}").write_text(str(os.getpid()))
    try:
        spec = get_spec(opts.spec)
        run_cli(lambda cfg: loop.train(cfg, spec), loop.train_args_cls(spec), overrides)
    finally:
        if out_dir is not None:
            (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
