"""One run per dump_dir: rank 0 holds an exclusive `fcntl.flock` on `<dump_dir>/run.lock` while it trains.

Two runs on one dump_dir would both train, interleave metrics.jsonl and fail at the first save. The kernel drops a
flock when its holder exits, however it exits (kill -9 included), so a lock is never stale; the file's text (pid and
host of the holder) is only for the message.
"""

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from lingua.errors import LinguaError

LOCK_NAME = "run.lock"


class RunLock:
    """`with RunLock(dump_dir):` holds the lock or raises one LinguaError naming the holder."""

    def __init__(self, dump_dir: str | os.PathLike):
        self.path = Path(dump_dir) / LOCK_NAME
        self._fd = None

    def __enter__(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LinguaError(f"cannot write to dump_dir '{self.path.parent}': {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LinguaError(f"dump_dir '{self.path.parent}' is in use by another run ({holder}; lock "
                              f"{self.path}): wait for it to finish or choose another dump_dir") from None
        self._fd = fd
        try:  # only for the message: a full disk (whose stale temp dirs the run removes next) must not stop it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
