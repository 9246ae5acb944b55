"""Ring attention: causal (or block-causal) attention over a sequence split across the ranks of a context-parallel
group (distributed.cp_size), exact up to fp32 rounding (Liu et al., "Ring Attention with Blockwise Transformers").

Layout (causal load balancing, as Megatron and torchtitan): the global sequence is cut into 2 x cp chunks of C
tokens; rank r holds chunks r and 2cp-1-r, so every rank has the same share of the causal triangle. The queries stay
put; the K/V shards travel around the ring (rank r sends to r+1), and at ring step s rank r attends to the shard of
rank r-s. For a (query chunk a, key chunk b) pair: b > a is skipped, b == a is causal, b < a is full. Block-causal
masks need no extra messages: a key at global position p is visible to a query whose document starts at `start`
iff start <= p <= query, so the queries' document starts (from tok_idx) and the chunk number of the travelling shard
say everything (`block_plans`, once per forward). Each block's (out, log-sum-exp) is merged into the running result
with a log-sum-exp; the backward recomputes each block from the merged out and lse (as flash attention does), and
the K/V gradients travel around the ring behind their K/V, arriving home after cp steps.

Block kernels: aten's CPU flash attention on CPU, the memory-efficient kernel on CUDA (it takes a mask and returns
the log-sum-exp; that path is not exercised by the CPU tests).
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from lingua.kernels.attention.base import AttentionKernel

NEG_INF = float("-inf")


def chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two global chunks (of 2 * cp) that context-parallel rank `rank` holds."""
    return rank, 2 * cp - 1 - rank


def local_positions(rank: int, cp: int, local_len: int, device=None) -> torch.Tensor:
    """(local_len,) global positions of rank `rank`'s tokens: its two chunks, in order."""
    c = local_len // 2
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device) for a in chunk_ids(rank, cp)])


# ---------------------------------------------------------------- one (query chunk, key chunk) block


def _block_plan(a: int, b: int, c: int, doc_start: torch.Tensor):
    """For query chunk a against key chunk b (c tokens each): None when nothing is visible, else (is_causal, allowed)
    with allowed None (no document mask needed) or bool (bs, 1, c, c). doc_start: the queries' document starts
    (bs, c), global positions."""
    if b > a:
        return None
    keys = torch.arange(b * c, (b + 1) * c, device=doc_start.device)
    if is_fake(doc_start):  # lingua.plan's fake tensors hold no positions: every block runs with its mask (the most)
        return b == a, (doc_start[:, :, None] <= keys[None, None, :]).unsqueeze(1)
    if bool((doc_start > keys[-1]).all()):  # every query's document starts after this chunk
        return None
    if bool((doc_start <= keys[0]).all()):  # every query's document covers this chunk
        return b == a, None
    return b == a, (doc_start[:, :, None] <= keys[None, None, :]).unsqueeze(1)


def block_plans(doc_start: torch.Tensor, rank: int, cp: int) -> dict:
    """{(a, b): plan} of rank `rank`'s query chunks a against every key chunk b, for the document starts doc_start
    (bs, 2c) of its queries (global positions): built once per forward and shared by every layer, so the layers
    neither rebuild the masks nor wait on the device to decide which blocks to skip."""
    c = doc_start.shape[1] // 2
    return {(a, b): _block_plan(a, b, c, doc_start[:, i * c: (i + 1) * c])
            for i, a in enumerate(chunk_ids(rank, cp)) for b in range(2 * cp)}


def _bias(allowed: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    if allowed is None:
        return None
    # CUDA's memory-efficient kernel wants the key dim of its mask 16-aligned: pad, then view the real part
    pad = -allowed.shape[-1] % 16 if allowed.is_cuda else 0
    bias = torch.zeros((*allowed.shape[:-1], allowed.shape[-1] + pad), dtype=dtype, device=allowed.device)
    bias = bias[..., : allowed.shape[-1]]
    return bias.masked_fill_(~allowed, NEG_INF)


def _forward_block(q, k, v, allowed, is_causal):
    """(out, lse) of softmax attention of q (bs, h, c, d) over k, v (bs, h, c, d) where allowed; lse (bs, h, c)
    fp32, -inf for a query that sees nothing here."""
    bias = _bias(allowed, q.dtype)
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, is_causal)[:2]
        lse = lse[..., : q.shape[-2]]  # the kernel pads it
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=bias)
    if allowed is not None:  # aten reports lse 0 (not -inf) for a fully masked row
        lse = lse.masked_fill(~allowed.any(-1), NEG_INF)
    return out, lse


def _backward_block(do, q, k, v, out, lse, allowed, is_causal):
    """(dq, dk, dv) of one block, from the merged out and lse of the whole attention."""
    bias = _bias(allowed, q.dtype)
    if q.is_cuda:
        lse = F.pad(lse, (0, -lse.shape[-1] % 32))
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            do, q, k, v, bias, out, lse, zero, zero, 0.0, [True, True, True, False], is_causal)[:3]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, is_causal, attn_mask=bias)


def _pairs(q_chunks, kv_chunks, c, plans: Optional[dict]):
    """(query slice, key slice, is_causal, allowed) of every visible block between local chunks and a K/V shard;
    plans from `block_plans`, None for plain causal attention."""
    for i, a in enumerate(q_chunks):
        qs = slice(i * c, (i + 1) * c)
        for j, b in enumerate(kv_chunks):
            plan = ((b == a, None) if b <= a else None) if plans is None else plans[a, b]
            if plan is not None:
                yield qs, slice(j * c, (j + 1) * c), *plan


def _expand(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bs, n_kv_heads, c, d) -> (bs, n_kv_heads * n_rep, c, d): each K/V head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attend_shard(q, kv, q_chunks, kv_chunks, plans, out, lse) -> None:
    """Merge into out (fp32) and lse (fp32, -inf where nothing was seen yet) the attention of the local queries q
    (bs, h, 2c, d) over one K/V shard kv = stack(k, v) (2, bs, h_kv, 2c, d) holding chunks kv_chunks; plans from
    `block_plans` (block-causal) or None (causal)."""
    c, n_rep = q.shape[-2] // 2, q.shape[1] // kv.shape[2]
    for qs, ks, causal, allowed in _pairs(q_chunks, kv_chunks, c, plans):
        o_b, lse_b = _forward_block(q[..., qs, :], _expand(kv[0][..., ks, :], n_rep), _expand(kv[1][..., ks, :], n_rep),
                                    allowed, causal)
        new = torch.logaddexp(lse[..., qs], lse_b)
        keep = torch.exp(lse[..., qs] - new).nan_to_num_(0.0)  # -inf - -inf: nothing seen on either side
        add = torch.exp(lse_b - new).nan_to_num_(0.0)
        out[..., qs, :] = out[..., qs, :] * keep.unsqueeze(-1) + o_b.to(out.dtype) * add.unsqueeze(-1)
        lse[..., qs] = new


def grad_shard(do, q, kv, out, lse, q_chunks, kv_chunks, plans, dq, dkv) -> None:
    """Add into dq (like q, fp32) and dkv (like kv, fp32) the gradients of the blocks between the local queries and
    one K/V shard; out (q's dtype) and lse are the merged results of the forward."""
    c, n_kv = q.shape[-2] // 2, kv.shape[2]
    n_rep = q.shape[1] // n_kv
    for qs, ks, causal, allowed in _pairs(q_chunks, kv_chunks, c, plans):
        gq, gk, gv = _backward_block(do[..., qs, :], q[..., qs, :], _expand(kv[0][..., ks, :], n_rep),
                                     _expand(kv[1][..., ks, :], n_rep), out[..., qs, :], lse[..., qs].contiguous(),
                                     allowed, causal)
        dq[..., qs, :] += gq.to(dq.dtype)
        for i, g in enumerate((gk, gv)):  # sum the gradients of a K/V head over the query heads it served
            dkv[i][..., ks, :] += g.to(dkv.dtype).unflatten(1, (n_kv, n_rep)).sum(2)


# ---------------------------------------------------------------- the ring


class _Ring:
    """Point-to-point over the context-parallel group: a tensor goes to rank r+1 while one arrives from r-1."""

    def __init__(self, group):
        self.group, self.rank, self.size = group, dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def pass_on(self, send: torch.Tensor):
        """Start sending `send` on; returns (wait, received): call wait() before reading received."""
        recv = torch.empty_like(send)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, self.group),
                                        dist.P2POp(dist.irecv, recv, self.prev, self.group)])
        return lambda: [w.wait() for w in works], recv

    def source_chunks(self, step: int) -> tuple[int, int]:
        """The chunks of the K/V shard this rank holds at ring step `step`: rank r-step's."""
        return chunk_ids((self.rank - step) % self.size, self.size)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, group):
        ring = _Ring(group)
        mine = chunk_ids(ring.rank, ring.size)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # bf16 attention accumulates in fp32
        lse = torch.full(q.shape[:-1], NEG_INF, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])  # (2, bs, n_kv_heads, 2c, head_dim): one message per step
        for step in range(ring.size):
            if step + 1 < ring.size:  # the next shard travels while this one is computed
                wait, incoming = ring.pass_on(kv)
            attend_shard(q, kv, mine, ring.source_chunks(step), plans, out, lse)
            if step + 1 < ring.size:
                wait()
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.group = plans, group
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        mine = chunk_ids(ring.rank, ring.size)
        kv = torch.stack([k, v])
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # travels with its K/V shard
        do = do.contiguous()
        for step in range(ring.size):
            if step + 1 < ring.size:
                wait_kv, next_kv = ring.pass_on(kv)
            grad_shard(do, q, kv, out, lse, mine, ring.source_chunks(step), ctx.plans, dq, dkv)
            wait_dkv, dkv = ring.pass_on(dkv)  # after cp passes, each shard's gradient is back home
            wait_dkv()
            if step + 1 < ring.size:
                wait_kv()
                kv = next_kv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


@torch.compiler.disable  # point-to-point messages and data-dependent block skipping
def ring_attention(xq, xk, xv, plans: Optional[dict], group) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence of the context-parallel `group`.

    xq: (bs, 2c, n_heads, head_dim), xk, xv: (bs, 2c, n_kv_heads, head_dim), this rank's two chunks (`chunk_ids`);
    plans: None (causal) or `block_plans` of the queries' document starts (block-causal).
    Returns (bs, 2c, n_heads, head_dim)."""
    q, k, v = (t.transpose(1, 2).contiguous() for t in (xq, xk, xv))  # (bs, heads, 2c, head_dim)
    return _RingAttention.apply(q, k, v, plans, group).transpose(1, 2)


class RingAttention(AttentionKernel):
    """The kernel every attention layer of a context-parallel run holds, put there by the model package's cp plan
    (lingua/models/transformer/parallelize.py) after `place_attention`: it needs the cp group, which no config names."""

    name = "ring"
    about = "ring attention over the context-parallel group (lingua/kernels/attention/ring.py)"

    def __init__(self, group):
        super().__init__()
        self.group = group  # set from outside: the model never sees ranks

    def mask(self, tok_idx: Optional[torch.Tensor], bs: int, seqlen: int, device) -> Optional[dict]:
        """tok_idx None: causal. Else (bs, seqlen) positions inside documents -> `block_plans` of the queries'
        document starts (global positions)."""
        if tok_idx is None:
            return None
        rank, cp = dist.get_rank(self.group), dist.get_world_size(self.group)
        return block_plans(local_positions(rank, cp, seqlen, device)[None, :] - tok_idx, rank, cp)

    def forward(self, xq, xk, xv, mask):
        return ring_attention(xq, xk, xv, mask, self.group)
