"""SIGUSR2 (SLURM's warning) and SIGTERM: finish the step, save, requeue, exit; every rank at the same step.

The signal handler only sets a Python flag. Ranks agree through one tiny all-reduce per step on a gloo (CPU) group
of its own, started without waiting at the end of step k and read at the end of step k+1, by when it has long
finished: no device sync, no wait on the training collectives, and every rank stops after the same step (one step
after the signal on a multi-process run, right after it on one process).
"""

import logging
import signal
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger("lingua")


class Preemption:
    """A context manager around the loop; `should_stop()` once per step, on every rank."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.requested: Optional[str] = None
        self._old = {}
        multi = dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo") if multi else None  # every rank creates it, in the same order
        self._host = np.zeros(1, dtype=np.float32)  # this rank's flag, then the max over ranks, read without torch
        self._flag = torch.from_numpy(self._host)
        self._work = None

    def __enter__(self):
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        logger.warning(f"received {self.requested}: will checkpoint and stop after this step")

    def should_stop(self) -> bool:
        """Whether any rank was asked to stop (as of the previous step's end on a multi-process run)."""
        if self._group is None:
            return self.requested is not None
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._host[0] > 0)
        self._host[0] = float(self.requested is not None)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._work is not None and exc[0] is None:  # every rank started the same all-reduces: finish the last
            self._work.wait()
