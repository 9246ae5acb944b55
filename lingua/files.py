"""Files written so that a reader never sees half of one: write a temporary sibling, then rename it over the target
(a rename within one directory is atomic on POSIX file systems)."""

import json
import os
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)` to produce the file, then move it to `path` in one step; the temporary file is removed
    if `write` fails, so a failed write leaves the previous file (or none) in place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default
