"""DCP checkpoints in lingua's layout, atomic, with keep-N retention, resume and consolidation.

    <dump_dir>/checkpoints/0000001000/
        .metadata, __*.distcp        model + optimizer (torch.distributed.checkpoint, any layout loads into any other)
        params.json                  the run's config, and `model_spec`: where the model's ModelSpec lives
        train_state_00000.json       per rank: step, scheduler, data loader state, RNG states
        COMPLETE                     written last, by rank 0, after every rank finished: no marker, no checkpoint;
                                     it holds a sha256 of every file above (lingua/checkpoint/integrity.py)

A save goes to `0000001000.tmp/` and is renamed when complete, so a killed save is never resumed from. Every load
verifies the checksums first: a changed file is one error naming it, never silently wrong weights. With
`checkpoint.async_save` the shards are written by DCP's async_save from a staged CPU copy while training goes on;
COMPLETE is written only once every rank's write finished (`poll`/`wait`).
"""

import base64
import concurrent.futures
import copy
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)

from lingua.checkpoint.integrity import (
    COMPLETE,
    CorruptCheckpoint,
    gather_checksums,
    hash_own_files,
    recorded_checksums,
    verify,
    write_complete,
)
from lingua.checkpoint.weights import (
    check_dcp_shapes,
    dcp_load,
    last_line,
    single_process_is_fine,
)
from lingua.errors import LinguaError
from lingua.files import read_json, write_json_atomic

logger = logging.getLogger(__name__)

CKPT_NAME = "{:010d}"


@dataclass
class SaveEvery:
    every: int = 1000  # save every N steps; 0: never
    keep: int = 0  # keep the N most recent; 0 keeps all


@dataclass
class CheckpointArgs:
    dump: SaveEvery = field(default_factory=SaveEvery)
    eval: SaveEvery = field(default_factory=lambda: SaveEvery(every=0))
    path: Optional[str] = None  # default <dump_dir>/checkpoints
    init_ckpt_path: Optional[str] = None  # start from these weights (model only): DCP, consolidated or HF dir
    # a resume whose latest checkpoint fails its checksums: false stops with one line; true sets it aside
    # (renamed to <step>.corrupt, never deleted) and resumes from the previous complete one that verifies
    fallback_on_corrupt: bool = False
    # the save after the last step; false keeps nothing of a run that needs no checkpoint (a throughput benchmark:
    # a 1B model's final save writes ~15 GB). A preemption's save and the periodic ones happen either way.
    save_at_end: bool = True
    # write with DCP's async_save: a CPU copy of the state is staged, the files are written in a background thread
    # while training goes on; COMPLETE and checksums come once every rank finished. One save in flight at a time;
    # the final and preemption saves wait. (`async` itself is a Python keyword.)
    async_save: bool = False


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    steps = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and is_complete(p)]
    return sorted(steps, key=lambda p: int(p.name))


class CheckpointManager:
    """The train loop's checkpoints: `clean_incomplete` + `latest` + `load` when it starts, `kinds_due` + `save`
    after each step. `spec_path` (the ModelSpec's "module:attr") goes into params.json so that evaluation,
    generation and export find the model's code again."""

    def __init__(self, args: CheckpointArgs, dump_dir: str, spec_path: Optional[str] = None):
        self.args = args
        self.spec_path = spec_path
        self.folder = Path(args.path or os.path.join(dump_dir, "checkpoints"))
        self._pending: Optional[_PendingSave] = None
        # async writes run collectives from a background thread: on a group of their own, never the training one
        self._async_group = dist.new_group(backend="gloo") if args.async_save and dist.is_initialized() else None
        # poll's agreement runs on the main thread, on host memory: no device sync (NCCL) while a save is in flight
        self._poll_group = dist.new_group(backend="gloo") if self._async_group is not None else None
        self._staging = None  # DCP's stager, made at the first async save
        # hashes the shards of an async save once they are written, off the training thread
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash")

    def clean_incomplete(self) -> None:
        """Remove what killed saves left behind (a `.tmp` dir, a step dir without COMPLETE); rank 0 only."""
        if _rank() != 0 or not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or (p.name.isdigit() and not is_complete(p))):
                logger.warning(f"removing incomplete checkpoint {p}")
                shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        done = list_checkpoints(self.folder)
        return done[-1] if done else None

    def latest_verified(self) -> Optional[Path]:
        """The latest complete checkpoint whose files match their checksums. One that does not stops the run, or
        with `fallback_on_corrupt` is renamed to `<step>.corrupt` (kept for inspection) and the previous one tried."""
        for path in reversed(list_checkpoints(self.folder)):
            try:
                verify(path)
                return path
            except CorruptCheckpoint as e:
                if not self.args.fallback_on_corrupt:
                    raise CorruptCheckpoint(f"{e} (checkpoint.fallback_on_corrupt=true resumes from the previous "
                                            "complete checkpoint)") from None
                logger.warning(f"{e}: setting it aside as {path.name}.corrupt, trying the previous checkpoint")
                _barrier()  # every rank has verified before rank 0 renames
                if _rank() == 0:
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                _barrier()
        return None

    def kinds_due(self, step: int, last: bool = False) -> list[str]:
        kinds = [k for k in ("dump", "eval") if getattr(self.args, k).every and step % getattr(self.args, k).every == 0]
        if last and "dump" not in kinds:
            kinds.append("dump")
        return kinds

    def save(self, step: int, model: nn.Module, optimizer, train_state: dict, config: dict, kinds=("dump",),
             wait: bool = True) -> Path:
        """Write checkpoint `step`. With checkpoint.async_save and wait=False it returns once the state is staged;
        `poll` (every step) or the next save completes it."""
        final = self.folder / CKPT_NAME.format(step)
        if is_complete(final):
            return final
        self.wait()  # at most one save in flight
        tmp = self._prepare(step)
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            if not self.args.async_save:
                with single_process_is_fine():
                    dcp.save(state, checkpoint_id=str(tmp))
                return self._finish(step, tmp, train_state, config, kinds)
            written = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group,
                                     no_dist=not dist.is_initialized(), async_stager=self._stager())
            future = self._hasher.submit(_hash_when_written, written, tmp, _rank())
        except (Exception, dcp.api.CheckpointException) as e:  # DCP wraps a rank's failure in a BaseException
            raise self._failed(step, tmp, e) from None
        # the train state is a snapshot now: the loader and scheduler move on while the files are written
        self._pending = _PendingSave(future, step, tmp, json.loads(json.dumps(train_state)), config, list(kinds))
        if wait:
            self.wait()
        return final

    def _stager(self):
        """DCP's stager with pinned host memory and non-blocking device-to-host copies where CUDA is (torch's default
        copies into pageable memory, synchronously); kept, so the pinned buffers are reused by every save."""
        if self._staging is None:
            from torch.distributed.checkpoint.staging import (
                DefaultStager,
                StagingOptions,
            )

            cuda = torch.cuda.is_available()
            self._staging = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                         use_async_staging=False, use_non_blocking_copy=cuda))
        return self._staging

    def poll(self) -> None:
        """Complete an async save whose files are written on every rank (a small collective while one is in flight,
        so that every rank completes it at the same step)."""
        if self._pending is None:
            return
        done = self._pending.future.done()
        if self._poll_group is not None and dist.get_world_size() > 1:
            host = np.array([float(done)], dtype=np.float32)  # read back through numpy: no torch op, no sync
            dist.all_reduce(torch.from_numpy(host), op=dist.ReduceOp.MIN, group=self._poll_group)
            done = bool(host[0] > 0)
        if done:
            self.wait()

    def wait(self) -> None:
        """Block until the async save in flight (if any) is written, then write its COMPLETE marker."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            hashed = pending.future.result()  # the shards' checksums, computed by the hashing thread
            self._finish(pending.step, pending.tmp, pending.train_state, pending.config, pending.kinds, hashed)
        except (Exception, dcp.api.CheckpointException) as e:
            raise self._failed(pending.step, pending.tmp, e) from None

    def _prepare(self, step: int) -> Path:
        tmp = self.folder / (CKPT_NAME.format(step) + ".tmp")
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # the leftovers of a save that was killed
            tmp.mkdir(parents=True)
        _barrier()
        return tmp

    def _finish(self, step: int, tmp: Path, train_state: dict, config: dict, kinds, hashed=None) -> Path:
        """After every rank's shards are on disk: train states, checksums, COMPLETE, the rename, retention."""
        final = self.folder / CKPT_NAME.format(step)
        write_json_atomic(tmp / f"train_state_{_rank():05d}.json", train_state)
        checksums = gather_checksums(tmp, _rank(), hashed)  # also the barrier: every rank wrote its shards and state
        if _rank() == 0:
            write_json_atomic(tmp / "params.json", {**config, "model_spec": self.spec_path} if self.spec_path else config)
            write_json_atomic(tmp / "kinds.json", list(kinds))
            write_complete(tmp, step, checksums)
            if final.exists():
                shutil.rmtree(final)  # an incomplete dir of the same step (no COMPLETE marker)
            os.replace(tmp, final)
            self._clean_up()
        _barrier()
        logger.info(f"saved checkpoint {final}")
        return final

    def _failed(self, step: int, tmp: Path, e: BaseException) -> LinguaError:
        """A failed save as one line (a full disk named as such); its temp dir is removed so a rerun can start."""
        full = _disk_full(tmp, e)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = self.latest()
        why = f"no space left on device in {self.folder}" if full else f"cannot write {tmp}: {last_line(e)}"
        return LinguaError(f"checkpoint step {step}: {why}; the last complete checkpoint is "
                           f"{int(latest.name) if latest else 'none'}")

    def _clean_up(self) -> None:
        """Delete what neither the dump nor the eval retention keeps; only complete checkpoints are counted, and only
        those older than the newest one with checksums (hashed from disk after its write) go."""
        done = list_checkpoints(self.folder)
        newest_checked = max((i for i, p in enumerate(done) if recorded_checksums(p) is not None), default=-1)
        keep = set(done[newest_checked:]) if newest_checked >= 0 else set(done)
        for kind in ("dump", "eval"):
            of_kind = [p for p in done if kind in read_json(p / "kinds.json", default=["dump"])]
            n = getattr(self.args, kind).keep
            keep |= set(of_kind if n <= 0 else of_kind[-n:])
        for p in done:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer) -> list[dict]:
        """Restore model + optimizer into whatever layout they have now; returns every rank's saved train state."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        meta = check_dcp_shapes(model_sd, path)
        state = {"model": model_sd, "optim": optim_sd}
        if not _same_param_groups(meta, optim_sd):
            # e.g. a checkpoint from before the param groups split (lingua/train/optim.py): its moments load by parameter
            # name; the groups' hyperparameters come from this run's config (the lr from the loaded schedule)
            logger.warning(f"{path}: the optimizer's param groups changed since this checkpoint; loading its state "
                           "per parameter, group settings from the config")
            state["optim"] = {"state": optim_sd["state"]}
        ours = copy.deepcopy(optim_sd["param_groups"])
        dcp_load(state, path)
        if [g["params"] for g in optim_sd["param_groups"]] != [g["params"] for g in ours]:
            optim_sd["param_groups"] = ours  # saved by a rank that holds other parameters (another pipeline stage)
        set_state_dict(model, optimizer, model_state_dict=model_sd,
                       optim_state_dict={"state": state["optim"]["state"], "param_groups": optim_sd["param_groups"]})
        states = [_read_train_state(p) for p in sorted(path.glob("train_state_*.json"))]
        if not states:
            raise LinguaError(f"checkpoint '{path}' has no train_state_*.json")
        return states


@dataclass
class _PendingSave:
    """An async save whose files are being written; COMPLETE comes in `CheckpointManager.wait`."""

    future: object  # concurrent.futures.Future: DCP's write, then this rank's shard checksums
    step: int
    tmp: Path
    train_state: dict
    config: dict
    kinds: list


def _hash_when_written(written, folder: Path, rank: int) -> dict[str, str]:
    """In the hashing thread: wait for DCP's write, then hash this rank's files (its train state comes later)."""
    written.result()
    return hash_own_files(folder, rank)


def _disk_full(path: Path, e: BaseException) -> bool:
    """torch's zip writer reports a full disk as 'unexpected pos', without the errno: ask the file system too."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
        return True
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


TRAIN_STATE_KEYS = ("step", "tokens_seen", "scheduler", "data", "rng")


def _read_train_state(path: Path) -> dict:
    """One rank's train state, or one line naming the file when it is not JSON or lacks a key."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LinguaError(f"cannot read train state '{path}': {type(e).__name__}: {str(e).splitlines()[0]}") from None
    missing = [k for k in TRAIN_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise LinguaError(f"train state '{path}' has no '{missing[0]}' (a damaged checkpoint)")
    return state


def _same_param_groups(meta, optim_sd: dict) -> bool:
    """Whether the checkpoint's optimizer param groups have the keys (group count and settings) the optimizer has."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    want = set(flatten_state_dict({"optim": {"param_groups": optim_sd["param_groups"]}})[0])
    return want == {k for k in meta.state_dict_metadata if k.startswith("optim.param_groups.")}


if __name__ == "__main__":  # `python -m lingua.checkpoint.manager consolidate ...`, the command's older spelling
    import sys

    from lingua.checkpoint.weights import main

    main(sys.argv[1:])
