"""Checksums of every file of a checkpoint, recorded in its COMPLETE marker and verified before it is loaded.

A checkpoint whose bytes changed after it was written (a flipped bit, a truncated copy) otherwise loads silently and
trains on garbage. Each rank hashes the files it wrote itself (its `__<rank>_*.distcp` shards and train state; rank 0
also `.metadata`), rank 0 gathers them into COMPLETE:

    {"step": 1000, "sha256": {".metadata": "...", "__0_0.distcp": "...", "params.json": "...", ...}}

Checkpoints written before checksums existed have a COMPLETE holding only the step; they load unverified.
"""

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from lingua.errors import LinguaError

COMPLETE = "COMPLETE"
_CHUNK = 1 << 22


class CorruptCheckpoint(LinguaError):
    """A file of a checkpoint does not match the checksum recorded when it was written."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def own_files(folder: Path, rank: int) -> list[Path]:
    """The files this rank wrote into a checkpoint folder (DCP names shards `__<rank>_<k>.distcp`)."""
    files = sorted(folder.glob(f"__{rank}_*.distcp")) + sorted(folder.glob(f"train_state_{rank:05d}.json"))
    if rank == 0 and (folder / ".metadata").is_file():
        files.append(folder / ".metadata")
    return files


def hash_own_files(folder: Path, rank: int) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in own_files(folder, rank)}


def gather_checksums(folder: Path, rank: int, known: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Every rank hashes its own files (but those in `known`, hashed already off the main thread); rank 0 gets the
    union (other ranks get {}). A collective."""
    known = known or {}
    mine = {p.name: known.get(p.name) or file_sha256(p) for p in own_files(folder, rank)}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if rank == 0 else {}


def write_complete(folder: Path, step: int, checksums: dict[str, str]) -> None:
    """The marker, written last: the rank-0-only files (params.json, kinds.json) are hashed here."""
    for name in ("params.json", "kinds.json"):
        if (folder / name).is_file():
            checksums[name] = file_sha256(folder / name)
    (folder / COMPLETE).write_text(json.dumps({"step": step, "sha256": dict(sorted(checksums.items()))}, indent=1) + "\n")


def recorded_checksums(folder: Path) -> Optional[dict[str, str]]:
    """The checksums in a checkpoint's COMPLETE marker; None for a checkpoint from before checksums."""
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return marker.get("sha256") if isinstance(marker, dict) else None


def _first_bad(folder: Path, names: list[str], sums: dict[str, str]) -> Optional[str]:
    for name in names:
        p = folder / name
        if not p.is_file():
            return f"{p} is missing"
        if file_sha256(p) != sums[name]:
            return f"{p} does not match the checksum recorded when it was saved"
    return None


def verify(folder: Path) -> bool:
    """Raise CorruptCheckpoint (one line naming the file) unless every recorded file matches its checksum; False for
    an old checkpoint without checksums. Under a process group each rank hashes a share of the files and every rank
    reaches the same verdict."""
    sums = recorded_checksums(folder)
    if sums is None:
        return False
    names = sorted(sums)
    if dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        verdicts = [None] * world
        dist.all_gather_object(verdicts, _first_bad(folder, names[rank::world], sums))
        bad = next((v for v in verdicts if v), None)
    else:
        bad = _first_bad(folder, names, sums)
    if bad:
        raise CorruptCheckpoint(f"corrupt checkpoint: {bad}")
    return True
