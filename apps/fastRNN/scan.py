"""The linear recurrence h_t = a_t * h_{t-1} + b_t behind every fastRNN cell: parallel scans and the step form.

A document start (tok_idx == 0) resets the state: a_t = 0 there, so h_t = b_t and nothing of the previous document
leaks in. Positions marked invalid (the left padding of a generation batch) have b_t = 0: with a zero initial state the
state stays exactly zero through them. Everything runs in fp32 whatever the activation dtype.

Parallel forms, for training, evaluation and prompt prefill (all take (bs, seqlen, hidden) coefficients):
- `log_scan` (minGRU, minLSTM: a_t in (0, 1), b_t > 0): in log space, as Feng et al. (2024) train them, so products of
  many gates never underflow. impl="odd_even" (default) combines (log a, log b) pairs with logaddexp in an odd-even
  parallel scan; impl="heinsen" is the paper's own formula (Heinsen 2023),
      log h_t = a*_t + logcumsumexp_{s <= t}(log b_s - a*_s),   a*_t = sum_{r <= t} log a_r,
  which cannot express a reset (a* would be -inf from there on), so it scans each document of a row separately.
  Measured on one CPU core (8 x 256 x 512, forward + backward): odd_even 45 ms and 6e-7 max relative error against
  an fp64 loop; heinsen 410 ms and 3e-5 (a* grows with the position, and so does its rounding error); a Python loop
  over time 380 ms.
- `linear_scan` (Hawk's RG-LRU: b_t of any sign): the same odd-even scan in linear space; no division, so it is as
  stable as the loop.
The odd-even scan does O(seqlen) work in log2(seqlen) rounds of whole-tensor ops, which is what makes it fast in
eager PyTorch: a Python loop over time would issue seqlen tiny ops.

Step form, for generation: `step` advances a (bs, hidden) state by one token. minGRU and minLSTM compute its a_t, b_t
from the recurrent equations as the paper writes them (no logs), so the tests comparing both forms check the log-space
math too; Hawk shares its gate code between the two forms.

Hawk's short causal convolution is lingua.models.layers.causal_conv; its one-token form `conv_step` is here, with the same
reset.
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

SCANS = ("odd_even", "heinsen")


# ---------------------------------------------------------------- the positive activation of minGRU / minLSTM


def g(x: torch.Tensor) -> torch.Tensor:
    """Feng et al.'s g: x + 1/2 for x >= 0, sigmoid(x) below; continuous, positive, so h~ lives in log space."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log g(x), computed without forming g(x) where it is tiny: log sigmoid(x) = -softplus(-x)."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


# ---------------------------------------------------------------- the odd-even parallel scan


def _log_combine(la1, lb1, la2, lb2):
    """(a1, b1) then (a2, b2) is (a1 a2, a2 b1 + b2); here in log space."""
    return la1 + la2, torch.logaddexp(la2 + lb1, lb2)


def _linear_combine(a1, b1, a2, b2):
    return a1 * a2, torch.addcmul(b2, a2, b1)


def odd_even_scan(a: torch.Tensor, b: torch.Tensor, combine: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along dim 1 of the pairs (a_t, b_t) under the associative `combine(earlier, later)`.

    Combine neighbours (0, 1), (2, 3), ... into a sequence half as long, scan it recursively (that gives the prefixes
    ending at the odd positions), then each even position 2k is the prefix ending at 2k - 1 combined with item 2k."""
    n = a.shape[1]
    if n == 1:
        return a, b
    m = n // 2
    pa, pb = combine(a[:, 0:2 * m:2], b[:, 0:2 * m:2], a[:, 1:2 * m:2], b[:, 1:2 * m:2])  # (bs, m, ...)
    odd_a, odd_b = odd_even_scan(pa, pb, combine)  # prefixes ending at 1, 3, ..., 2m - 1
    even_a, even_b = combine(odd_a[:, :n - m - 1], odd_b[:, :n - m - 1], a[:, 2::2], b[:, 2::2])  # ending at 2, 4, ...
    out_a, out_b = torch.empty_like(a), torch.empty_like(b)
    for out, first, odd, even in ((out_a, a[:, :1], odd_a, even_a), (out_b, b[:, :1], odd_b, even_b)):
        out[:, :1], out[:, 1::2], out[:, 2::2] = first, odd, even
    return out_a, out_b


class _Recurrence(torch.autograd.Function):
    """h (bs, seqlen, hidden) of h_t = a_t h_{t-1} + b_t, from (a, b) or, in log space, (log a, log b).

    The backward is written out because the gradient of a linear recurrence is the same recurrence run backwards,
        g_t = dL/dh_t + a_{t+1} g_{t+1},   dL/db_t = g_t,   dL/da_t = g_t h_{t-1}
    (times b_t and a_t for the logs): one more odd-even scan, in linear space since gradients have any sign, instead of
    autograd's graph of log2(seqlen) rounds of strided slices, which made the whole model 3x slower on CPU."""

    @staticmethod
    def forward(ctx, a, b, log_space: bool):
        if log_space:
            h = odd_even_scan(a, b, _log_combine)[1].exp()
            ctx.save_for_backward(a, b, h)
        else:
            h = odd_even_scan(a, b, _linear_combine)[1]
            ctx.save_for_backward(a, h)
        ctx.log_space = log_space
        return h

    @staticmethod
    def backward(ctx, dh):
        if ctx.log_space:
            log_a, log_b, h = ctx.saved_tensors
            a = log_a.exp()
        else:
            a, h = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)  # a_{t+1}; nothing after the last token
        g = odd_even_scan(a_next.flip(1), dh.flip(1), _linear_combine)[1].flip(1)  # (bs, seqlen, hidden)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        grad_a = g * h_prev
        if ctx.log_space:
            return grad_a * a, g * log_b.exp(), None
        return grad_a, g, None


# ---------------------------------------------------------------- the paper's scan (Heinsen), one document at a time


def heinsen_scan(log_a: torch.Tensor, log_b: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """log h (bs, seqlen, hidden) by the paper's cumsum + logcumsumexp, each document of a row scanned on its own.

    a*_t is taken relative to the start of t's document (its own log a never enters: h_start = b_start). The K
    documents of a row are spread over K copies of it, document k in copy k and the other positions at the most
    negative finite value (which contributes exactly nothing and, unlike -inf, keeps the gradient finite); each
    position then reads its own document's copy. Work and memory grow with K, the most documents in one row."""
    bs, seqlen, _ = log_a.shape
    doc = reset.long().cumsum(1)  # (bs, seqlen) document number within the row; 0 before any start
    pos = torch.arange(seqlen, device=reset.device)
    start = torch.where(reset, pos, 0).cummax(dim=1).values  # (bs, seqlen) where t's document starts
    a_star = log_a.masked_fill(reset[..., None], 0.0).cumsum(1)
    a_star = a_star - a_star.gather(1, start[..., None].expand_as(a_star))  # sum of log a over (start, t]
    v = log_b - a_star  # (bs, seqlen, hidden)
    n_docs = int(doc.max()) + 1
    mine = doc[..., None] == torch.arange(n_docs, device=doc.device)  # (bs, seqlen, K)
    copies = v[:, :, None].masked_fill(~mine[..., None], torch.finfo(v.dtype).min)  # (bs, seqlen, K, hidden)
    acc = torch.logcumsumexp(copies, dim=1)
    own = acc.gather(2, doc[:, :, None, None].expand(-1, -1, 1, v.shape[-1])).squeeze(2)  # (bs, seqlen, hidden)
    return a_star + own


# ---------------------------------------------------------------- what the cells call


def log_scan(log_a: torch.Tensor, log_b: torch.Tensor, reset: torch.Tensor, valid: Optional[torch.Tensor] = None,
             h0: Optional[torch.Tensor] = None, impl: str = "odd_even") -> torch.Tensor:
    """h (bs, seqlen, hidden), fp32, of h_t = a_t h_{t-1} + b_t from log a_t <= 0 and log b_t.

    reset, valid: bool (bs, seqlen), True at document starts / at real tokens (None: all real). h0: (bs, hidden) >= 0,
    the state before position 0 (None: zero), which a reset at position 0 discards."""
    log_a, log_b = log_a.float(), log_b.float()
    if valid is not None:
        log_b = log_b.masked_fill(~valid[..., None], -math.inf)
    if h0 is not None:  # fold the carried state into the first item: b_0 + a_0 h0
        carried = torch.logaddexp(log_b[:, :1], log_a[:, :1] + torch.log(h0.float())[:, None])
        log_b = torch.cat([torch.where(reset[:, :1, None], log_b[:, :1], carried), log_b[:, 1:]], dim=1)
    if impl == "heinsen":
        return heinsen_scan(log_a, log_b, reset).exp()
    if impl != "odd_even":
        raise ValueError(f"unknown scan '{impl}' (one of {', '.join(SCANS)})")
    return _Recurrence.apply(log_a.masked_fill(reset[..., None], -math.inf), log_b, True)


def linear_scan(a: torch.Tensor, b: torch.Tensor, reset: torch.Tensor, valid: Optional[torch.Tensor] = None,
                h0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h (bs, seqlen, hidden), fp32, of h_t = a_t h_{t-1} + b_t for any sign of b; arguments as in `log_scan`."""
    a = a.float().masked_fill(reset[..., None], 0.0)
    b = b.float()
    if valid is not None:
        b = b * valid[..., None]
    if h0 is not None:
        b = torch.cat([torch.addcmul(b[:, :1], a[:, :1], h0.float()[:, None]), b[:, 1:]], dim=1)
    return _Recurrence.apply(a, b, False)


def step(a: torch.Tensor, b: torch.Tensor, reset: torch.Tensor, valid: Optional[torch.Tensor],
         h: torch.Tensor) -> torch.Tensor:
    """One token of the recurrence: a, b (bs, hidden), reset/valid (bs,) bool, h the (bs, hidden) state -> new state."""
    a = a.float().masked_fill(reset[:, None], 0.0)
    b = b.float() if valid is None else b.float() * valid[:, None]
    return a * h + b


# ---------------------------------------------------------------- Hawk's causal convolution


def conv_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, reset: torch.Tensor,
              history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of `causal_conv`: x (bs, hidden), history (bs, width - 1, hidden), forgotten at a document start."""
    history = history.to(x.dtype) * ~reset[:, None, None]
    window = torch.cat([history, x[:, None]], dim=1)  # (bs, width, hidden), oldest first
    out = bias.to(x.dtype) + (window * weight.t()).sum(1)
    return out, window[:, 1:]
