"""The code snapshot stool puts in <dump_dir>/code: what a queued or requeued job runs, whatever happens to the working
tree after submission (lingua/tools/stool.py)."""

import os
import shutil
import subprocess
from pathlib import Path

# Directory names never copied into the snapshot when the code is not in git.
SKIP_DIRS = {".git", ".venv", "venv", "env", "__pycache__", ".pytest_cache", "data", "checkpoints", "dumps", "runs",
             "wandb", "node_modules", ".mypy_cache", ".ruff_cache"}


def snapshot_code(src: str, dst: str, exclude: str) -> tuple[int, list[str]]:
    """Copy the code in src to dst, then link the top-level entries that were not copied (data/, tokenizers/,
    anything git ignores) so that relative paths in a config resolve from dst as they do from src.
    `exclude` (the dump_dir) is never copied nor linked. Returns (files copied, names linked)."""
    src_path, dst_path, exclude_path = Path(src).resolve(), Path(dst), Path(exclude).resolve()
    files = _git_files(src_path)
    if files is None:
        files = []
        for root, dirs, names in os.walk(src_path):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(root, n), src_path) for n in names]
    n = 0
    for rel in files:
        path = src_path / rel
        if exclude_path == path or exclude_path in path.parents:
            continue
        if not (path.is_symlink() or path.is_file()):
            continue  # deleted but still tracked, or a submodule
        target = dst_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target, follow_symlinks=False)
        n += 1
    dst_path.mkdir(parents=True, exist_ok=True)
    linked = []
    for entry in sorted(src_path.iterdir()):
        if entry.name == ".git" or (dst_path / entry.name).exists() or (dst_path / entry.name).is_symlink():
            continue
        if entry == exclude_path or entry in exclude_path.parents:
            continue  # holds the dump_dir itself: a link would make code/ contain itself
        (dst_path / entry.name).symlink_to(entry)
        linked.append(entry.name)
    return n, linked


def _git_files(src: Path) -> list[str] | None:
    """Tracked plus untracked-but-not-ignored files under src, or None when src is not in a git work tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=src, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sorted({f for f in out.decode().split("\0") if f})
