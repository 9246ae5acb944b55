"""A slow rank is visible: at logging steps, one all-gather of each rank's own step time; a warning when one rank
stays slower than the others.

A rank's "own" time is what it spent on its own, not waiting for the others: its wait for batches (wall time) plus
the CPU time of its forward, backward and update. Wall time would not do: in a synchronous step every rank waits in
the collectives for the slowest one, so all their wall times come out equal. On CPU (gloo) a rank blocked in a
collective uses no CPU time of its main thread. On a GPU the step's kernels run asynchronously, so the CPU time only
covers launching them: there a slow GPU shows in the backend's timings, not here (CUDA events would be the next step).
"""

import logging
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def gather_rank_times(own_ms: float, device: torch.device) -> list[float]:
    """Every rank's own step time, in rank order (one small all-gather; all ranks call it at the same step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [own_ms]
    mine = torch.tensor([own_ms], dtype=torch.float64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.item() for t in out]


class SlowRankMonitor:
    """Turns the gathered times into metrics and warns once a rank has been `factor` times slower than the median of
    the others at `patience` consecutive logging steps (one slow step is noise; a rank that stays slow is not)."""

    def __init__(self, factor: float, patience: int = 3):
        self.factor, self.patience = factor, patience
        self._suspect: Optional[int] = None
        self._count = 0

    def metrics(self, step: int, times_ms: list[float]) -> dict:
        if len(times_ms) == 1:
            return {}
        slowest = max(range(len(times_ms)), key=times_ms.__getitem__)
        self._check(step, slowest, times_ms)
        return {"rank_ms_max": times_ms[slowest], "rank_ms_min": min(times_ms), "slowest_rank": slowest}

    def _check(self, step: int, slowest: int, times_ms: list[float]) -> None:
        others = sorted(t for r, t in enumerate(times_ms) if r != slowest)
        median = others[len(others) // 2]
        slow = self.factor > 0 and times_ms[slowest] > self.factor * median
        self._count = self._count + 1 if slow and slowest == self._suspect else int(slow)
        self._suspect = slowest if slow else None
        if self._count == self.patience:
            logger.warning(f"rank {slowest} is slow: {times_ms[slowest]:.0f} ms of its own per step against a median "
                           f"of {median:.0f} ms on the other ranks, at {self.patience} logging steps in a row up to "
                           f"step {step} (logging.slow_rank_factor={self.factor:g})")
