"""Loss spikes: optionally skip the update of a step whose loss is `optim.spike_factor` times the running median of the
last `optim.spike_window` step losses (off by default).

The loss it judges is the global one (the step's all-reduced mean), which every rank holds bit for bit, so every rank
takes the same decision from the same window without another collective. The window is part of the train state, so a
resumed run skips exactly the steps the uninterrupted one skips. Judging a loss before the update costs one host sync
per step (only when enabled). A skipped step still consumes its batches and advances the lr schedule; its loss joins
the window, so a lasting rise of the loss (new data) is accepted after about half a window.
"""

import statistics
from collections import deque

import torch


class SpikeGuard:
    def __init__(self, factor: float = 0.0, window: int = 100):
        self.factor, self.window = factor, window
        self.losses: deque[float] = deque(maxlen=window)
        self.skipped = 0  # steps whose update was skipped, over every resume

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def skip(self, loss: torch.Tensor) -> bool:
        """Whether to skip this step's update (False until the window is full)."""
        if not self.enabled:
            return False
        value = loss.item()
        spike = len(self.losses) == self.window and value > self.factor * statistics.median(self.losses)
        self.losses.append(value)
        self.skipped += spike
        return spike

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.skipped = state.get("skipped", 0)
