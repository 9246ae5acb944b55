"""A hung rank is an error, not a silent stall: every rank says where it is, a stalled one names who kept it waiting.

The train loop marks each phase of a step (`mark(step, "forward")`: three attribute writes, no I/O). A daemon thread
publishes this rank's (step, phase, heartbeat) to the process group's store every `period_s`, and when the marked
phase has not changed for `distributed.timeout_s` it reads every rank's record and exits the process with ONE line:

    rank 0: no progress for 10 s at step 3 (forward); ranks that did not arrive: 1 (not responding, last seen at
    step 3 data) (distributed.timeout_s=10)

A rank "did not arrive" when it is at an earlier step or phase, or its heartbeat stopped (a SIGSTOPped or dead
process: its record is then up to one period old). The exit is non-zero, so torchrun (--max-restarts) or stool's
batch script (max_restarts) restarts the job from its last checkpoint. A collective that the backend itself times out
or breaks gets the same line (`describe`, from DistState).

Only the phases of a train step are timed: evaluation and checkpoint writes may legitimately take longer than
timeout_s, and the backend's own timeout still covers their collectives. The first step of a process (compilation) is
not timed either: `arm` after it.
"""

import datetime
import json
import logging
import os
import threading
import time
from typing import Optional

from lingua.errors import LinguaError, print_error

logger = logging.getLogger(__name__)

PHASES = ("setup", "data", "forward", "backward", "optimizer", "log", "eval", "checkpoint")
TIMED = frozenset(("data", "forward", "backward", "optimizer", "log"))
STALL_EXIT_CODE = 1


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, timeout_s: float, period_s: Optional[float] = None):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.period_s = period_s or min(5.0, timeout_s / 10)
        self.step, self.phase, self._since, self._armed = 0, "setup", time.monotonic(), False
        self._beat, self._report = 0, threading.Lock()
        self._stop = threading.Event()
        self._store = None
        self._thread = None
        if store is not None and world_size > 1:
            # a connection of its own with a short timeout: the main thread may be blocked, the store host stopped
            self._store = store.clone()
            self._store.set_timeout(datetime.timedelta(seconds=max(1.0, 2 * self.period_s)))
            self._thread = threading.Thread(target=self._run, name="lingua-watchdog", daemon=True)
            self._thread.start()

    def mark(self, step: int, phase: str) -> None:
        self.step, self.phase, self._since = step, phase, time.monotonic()

    def arm(self) -> None:
        self._armed = True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.period_s + 5)

    def _publish(self) -> None:
        self._beat += 1
        self._store.set(f"progress/{self.rank}", json.dumps([self.step, PHASES.index(self.phase), self._beat]))

    def _run(self) -> None:
        while True:
            try:
                self._publish()
            except Exception as e:  # the store's host is gone or stopped: the stall check below still runs
                logger.debug(f"watchdog: cannot publish progress: {e}")
            stalled = time.monotonic() - self._since
            if self._armed and self.phase in TIMED and stalled > self.timeout_s:
                self._fail(f"no progress for {stalled:.0f} s")
            if self._stop.wait(self.period_s):
                return

    def _fail(self, what: str) -> None:
        """Print the line and exit; the lock is never released, so a concurrent `describe` in the main thread waits
        for the exit instead of printing a second line."""
        self._report.acquire()
        if self._stop.is_set():
            return
        print_error(LinguaError(self._line(what)))
        logging.shutdown()
        os._exit(STALL_EXIT_CODE)

    def describe(self, what: str) -> str:
        """The one line for a collective that failed in the main thread (called once, before the error is raised)."""
        with self._report:
            self._stop.set()
            return self._line(what)

    def _records(self) -> list[Optional[list]]:
        if self._store is None:
            return []
        out = []
        for r in range(self.world_size):
            try:
                out.append(json.loads(self._store.get(f"progress/{r}")) if self._store.check([f"progress/{r}"])
                           else None)
            except Exception:  # the store does not answer: nobody's record can be read
                out.append(None)
        return out

    def laggards(self) -> list[str]:
        """'R (step S phase, not responding)' for each rank behind this one or whose heartbeat stopped."""
        first = self._records()
        time.sleep(2 * self.period_s)  # a live rank beats at least once in between
        second = self._records()
        me = (self.step, PHASES.index(self.phase))
        out = []
        for r, (a, b) in enumerate(zip(first, second)):
            if r == self.rank:
                continue
            if b is None:
                out.append(f"{r} (no record)")
                continue
            where = f"step {b[0]} {PHASES[b[1]]}"
            if a is not None and a[2] == b[2]:  # its heartbeat stopped: the record is as old as one period
                out.append(f"{r} (not responding, last seen at {where})")
            elif (b[0], b[1]) < me:
                out.append(f"{r} ({where})")
        return out

    def _line(self, what: str) -> str:
        late = self.laggards() if self._store is not None else ["unknown (no store to ask)"]
        who = ", ".join(late) if late else "none found (every rank is at this step and phase)"
        return (f"rank {self.rank}: {what} at step {self.step} ({self.phase}); ranks that did not arrive: {who} "
                f"(distributed.timeout_s={self.timeout_s:g})")
