"""The language-modelling loss every model, the train loop and evaluation share: cross-entropy over the vocabulary
with an fp32 softmax, targets equal to IGNORE_INDEX (-1, evaluation's padding) left out.

Two forms with the same value:
- `cross_entropy(logits, target)`: from logits, for evaluation and any caller that needs the logits.
- `linear_cross_entropy(h, weight, target)`: from the final hidden states and the output projection, for training. It
  works through the tokens in chunks and computes the gradients of h and of the projection during the forward, so the
  fp32 (tokens, vocab) logits never exist whole: per chunk, logits -> log-sum-exp -> softmax minus the one-hot target
  -> the two gradient matmuls, while the chunk is still in cache. The output projection is a quarter of the debug
  model's FLOPs, and on a CPU its big logits tensor costs more in memory traffic than in arithmetic.
"""

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1
CHUNK_TOKENS = 1024  # rows of logits per chunk: 16 MB of fp32 at a 4k vocabulary, measured fastest on 2 CPU cores


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits (..., vocab), target (...) int64 -> the mean (or sum) NLL in nats over targets that are not ignored."""
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def _chunk_loss_and_grad(logits: torch.Tensor, target: torch.Tensor,
                         softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (n, vocab) of one chunk -> (sum of its NLLs, d(sum)/d(logits) = softmax - one_hot(target)), with
    ignored targets contributing nothing. With a soft cap c the loss is of c * tanh(logits / c), and the gradient is
    carried back through the tanh."""
    capped = None
    if softcap is not None:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    valid = (target != IGNORE_INDEX)[:, None]
    safe = target.clamp(min=0)[:, None]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    nll = ((lse - logits.gather(1, safe)) * valid).sum()
    grad = _softmax_minus_one_hot(logits, lse, safe, valid)
    return nll, grad if capped is None else grad.mul_(1 - capped * capped)


def _softmax_minus_one_hot(logits: torch.Tensor, lse: torch.Tensor, safe: torch.Tensor,
                           valid: torch.Tensor) -> torch.Tensor:
    """(softmax(logits) - one_hot(target)) * valid, the same numbers two ways. Compiled: one pointwise expression,
    which inductor fuses into a single pass over the chunk (the one-hot is a comparison with the column index);
    eager: in place, since an eager one-hot would be a whole (n, vocab) tensor of its own. The compiled form took
    a third less time than the in-place one in the debug model's step (its loss kernels 6.3 ms against 9.8 ms)."""
    if torch.compiler.is_compiling():
        one_hot = torch.arange(logits.shape[1], device=logits.device) == safe
        return (torch.exp(logits - lse) - one_hot.to(logits.dtype)) * valid
    grad = logits.sub_(lse).exp_()  # the softmax, in place of the logits
    grad.scatter_add_(1, safe, -valid.to(grad.dtype))
    return grad.mul_(valid)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, compute_dtype, chunk, softcap):
        """h (n, dim), weight (vocab, dim), target (n,) -> the mean NLL; the gradients are kept for backward."""
        hc_all, w = h.to(compute_dtype), weight.to(compute_dtype)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        total, grad_h = torch.zeros((), dtype=torch.float32, device=h.device), []
        for start in range(0, h.shape[0], chunk):
            hc, tc = hc_all[start: start + chunk], target[start: start + chunk]
            nll, grad = _chunk_loss_and_grad((hc @ w.t()).float(), tc, softcap)  # (rows, vocab) logits, their grad
            total = total + nll
            grad = grad.to(compute_dtype)
            grad_h.append(grad @ w)  # (rows, dim)
            grad_w = grad_w + (grad.t() @ hc).float()  # (vocab, dim), summed over the chunks in fp32
        count = (target != IGNORE_INDEX).sum().clamp(min=1)
        ctx.save_for_backward(torch.cat(grad_h), grad_w, count)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_output / count
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * scale).to(h_dtype), (grad_w * scale).to(w_dtype), None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int = CHUNK_TOKENS,
                         softcap: Optional[float] = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T (soft-capped: c * tanh(. / c)) against target, never
    materialising them (see the module docstring). h (..., dim), weight (vocab, dim), target (...). Under autocast
    the matmuls run in its dtype, as nn.Linear's would; the softmax is fp32 either way."""
    compute = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h.flatten(0, -2), weight, target.flatten(), compute, chunk, softcap)
