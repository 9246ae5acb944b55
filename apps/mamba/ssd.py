"""The state-space duality (SSD) scan of Mamba-2 (Dao & Gu, 2024) in plain PyTorch: a chunked parallel form for
training and prefill, and a one-token recurrent step for decoding. Both run on CPU; `apps.mamba.model` swaps in the
fused `mamba_ssm` kernels on CUDA when they are installed.

Per head h, with a scalar decay a_t = exp(dt_t * A_h) (A_h < 0) shared by the whole (head_dim x d_state) state:

    state_t = a_t * state_{t-1} + dt_t * x_t B_t^T        state: (head_dim, d_state)
    y_t     = state_t C_t                                  y: (head_dim,)

A document boundary resets the state: at a reset position the log-decay dt_t * A_h is -inf, so a_t = 0 and nothing
of the previous document survives (`log_decay`, used as is by the step). The chunked form applies the same -inf as a
mask: inside a chunk the decay from s to l is exp(cs_l - cs_s) (cs: the cumulative log-decay from the chunk start,
bounded by the chunk length, as in the fused kernels) where no reset lies in (s, l], and 0 where one does; between
chunks the chunk totals (-inf for a chunk holding a reset) go through `segsum`, a masked cumsum that never subtracts.
No -inf - -inf ever happens: resets are exact and the gradients stay finite.

The chunked form ("minimal SSD", Listing 1 of the paper) splits the sequence in chunks of Q positions:
1. inside a chunk, y = (C B^T * L) (dt x), a masked attention-like product where L[i, j] = a_{j+1} ... a_i;
2. each chunk's own contribution to the state at its end;
3. a scan over chunks carries the states from chunk to chunk (the only sequential part, n_chunks long);
4. each position reads the carried-in state through C, decayed to its position.
Cost per token: O(Q * (d_state + head_dim)) for 1 and O(head_dim * d_state) for 2-4, against O(seq_len) attention.
"""

import torch
import torch.nn.functional as F


def segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) log-decays -> (..., T, T) with out[..., i, j] = x[j+1] + ... + x[i] for i >= j (0 on the diagonal) and
    -inf above it: the log of the decay from position j to position i. Built by a masked cumsum, without subtracting
    cumsums, so -inf entries (resets) stay exact."""
    T = x.shape[-1]
    x = x[..., :, None].expand(*x.shape, T)  # (..., T, T): x[..., i, j] = x_i
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(x, dim=-2)  # out[i, j] = sum_{j < k <= i} x_k
    lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def _heads(t: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    """Groups -> heads: each of the n_groups B (or C) vectors serves n_heads // n_groups consecutive heads."""
    return t.repeat_interleave(n_heads // t.shape[dim], dim=dim) if t.shape[dim] != n_heads else t


def log_decay(dt: torch.Tensor, A: torch.Tensor, reset: torch.Tensor = None) -> torch.Tensor:
    """dt (..., n_heads) > 0, A (n_heads,) < 0 -> dt * A, with -inf where `reset` (...) is True (state forgotten)."""
    dA = dt * A
    return dA if reset is None else dA.masked_fill(reset[..., None], float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size: int, reset=None, initial_state=None):
    """The parallel (chunked) scan, in fp32.

    x: (bs, seqlen, n_heads, head_dim); dt: (bs, seqlen, n_heads), the step sizes after softplus; A: (n_heads,) < 0;
    B, C: (bs, seqlen, n_groups, d_state); reset: (bs, seqlen) bool, True where the state restarts (document starts);
    initial_state: (bs, n_heads, head_dim, d_state) or None (zeros).
    Returns y: (bs, seqlen, n_heads, head_dim) (no D skip) and the final state (bs, n_heads, head_dim, d_state).

    Heads are laid out as (n_groups, heads per group) so B and C are never copied per head. Inside a chunk the decay
    from s to l is exp(cs_l - cs_s), cs the cumulative log-decay from the chunk start, where no reset lies in (s, l];
    the -inf of a reset is applied as a mask on the segment numbers rather than carried through the cumsum."""
    bs, seqlen, n_heads, head_dim = x.shape
    n_groups, d_state = B.shape[-2:]
    per_group = n_heads // n_groups
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    dA = dt * A  # (bs, seqlen, n_heads)
    if reset is None:
        reset = torch.zeros(bs, seqlen, dtype=torch.bool, device=x.device)
    pad = -seqlen % chunk_size
    if pad:  # trailing positions with x = 0 and decay 1 change neither the outputs nor the final state
        x, dt, dA = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, dA))
        B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (B, C))
        reset = F.pad(reset, (0, pad))
    n_chunks, Q = x.shape[1] // chunk_size, chunk_size
    shape = (bs, n_chunks, Q, n_groups, per_group)
    X = (x * dt[..., None]).view(*shape, head_dim)  # (b, c, l, g, r, p): dt folded into the input
    B, C = B.view(bs, n_chunks, Q, n_groups, d_state), C.view(bs, n_chunks, Q, n_groups, d_state)  # (b, c, l, g, n)
    reset = reset.view(bs, n_chunks, Q)
    dA = dA.view(bs, n_chunks, Q, n_heads).masked_fill(reset[..., None], 0.0)  # a reset's own decay is masked below
    dA = dA.view(shape).permute(0, 1, 3, 4, 2)  # (b, c, g, r, l)
    cs = torch.cumsum(dA, dim=-1)  # (b, c, g, r, l): log decay from the chunk start through l
    seg = torch.cumsum(reset, dim=-1)  # (b, c, l): resets in the chunk up to l; equal numbers = no reset between
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    same = (seg[..., :, None] == seg[..., None, :]) & causal  # (b, c, l, s)
    inf = float("-inf")

    # 1. within each chunk: y_l = sum_{s <= l} (C_l . B_s) decay(s -> l) X_s
    decay = (cs[..., :, None] - cs[..., None, :]).masked_fill(~same[:, :, None, None], inf).exp()  # (b, c, g, r, l, s)
    scores = torch.einsum("bclgn,bcsgn->bcgls", C, B)[:, :, :, None] * decay  # (b, c, g, r, l, s)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores, X)

    # 2. each chunk's contribution to the state at its end: decays from each position to the chunk's last one
    last = seg[..., -1:]  # (b, c, 1)
    to_end = (cs[..., -1:] - cs).masked_fill((seg != last)[:, :, None, None], inf).exp()  # (b, c, g, r, l)
    states = torch.einsum("bclgn,bclgrp->bcgrpn", B, X * to_end.permute(0, 1, 4, 2, 3)[..., None])

    # 3. carry the states across chunks: state entering chunk z = sum_{c < z} decay(c -> z) * chunk c's state
    if initial_state is None:
        initial_state = torch.zeros(bs, n_heads, head_dim, d_state, device=x.device, dtype=torch.float32)
    initial_state = initial_state.float().view(bs, 1, n_groups, per_group, head_dim, d_state)
    states = torch.cat([initial_state, states], dim=1)  # (b, c + 1, g, r, p, n)
    chunk_log = cs[..., -1].masked_fill((last[..., 0] > 0)[:, :, None, None], inf)  # (b, c, g, r): -inf if reset
    between = segsum(F.pad(chunk_log.permute(0, 2, 3, 1), (1, 0))).exp()  # (b, g, r, c + 1, c + 1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", between, states)  # (b, c + 1, g, r, p, n)
    carried, final_state = states[:, :-1], states[:, -1].reshape(bs, n_heads, head_dim, d_state)

    # 4. what the carried-in state adds at each position: C_l . state, decayed from the chunk start through l
    from_start = cs.masked_fill((seg > 0)[:, :, None, None], inf).exp().permute(0, 1, 4, 2, 3)  # (b, c, l, g, r)
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", C, carried) * from_start[..., None]
    return y.reshape(bs, n_chunks * Q, n_heads, head_dim)[:, :seqlen], final_state


def ssd_step(state, x, dt, A, B, C, reset=None):
    """One recurrent step, in fp32: state (bs, n_heads, head_dim, d_state), x (bs, n_heads, head_dim),
    dt (bs, n_heads) after softplus, A (n_heads,), B, C (bs, n_groups, d_state), reset (bs,) bool or None.
    Returns y (bs, n_heads, head_dim) (no D skip) and the new state."""
    n_heads = x.shape[1]
    x, dt, B, C = x.float(), dt.float(), _heads(B.float(), n_heads, 1), _heads(C.float(), n_heads, 1)
    decay = log_decay(dt, A.float(), reset).exp()  # (bs, n_heads)
    state = state.float() * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y, state


def ssd_sequential(x, dt, A, B, C, reset=None, initial_state=None):
    """The recurrence itself, one position at a time with `ssd_step`: the reference the chunked form must equal.
    Same arguments and results as `ssd_chunked`."""
    bs, seqlen, n_heads, head_dim = x.shape
    state = initial_state
    if state is None:
        state = torch.zeros(bs, n_heads, head_dim, B.shape[-1], device=x.device, dtype=torch.float32)
    ys = []
    for t in range(seqlen):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], None if reset is None else reset[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state
