"""The language-modelling loss every model, the train loop and evaluation share: cross-entropy over the vocabulary
with an fp32 softmax, targets < 0 ignored (evaluation marks padding with -1)."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits (..., vocab), target (...) int64 -> the mean (or sum) NLL in nats over targets that are not ignored."""
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)
