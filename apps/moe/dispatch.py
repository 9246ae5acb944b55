"""Expert-parallel dispatch for apps/moe: each of the `ep` ranks of a group holds n_experts / ep experts; tokens
travel to their experts' rank and back with two all-to-alls (torch.distributed, gloo and nccl alike). How the experts
are sharded is apps/moe/parallelize.py. The layout and the gradient scaling are described there.

The all-to-all's split sizes are data: each rank counts its rows per expert and reads the counts on the host. The
planner (lingua.plan) runs the step on fake tensors, which have no data, so MOE_SPEC.simulate_context is
`balanced_routing()`: under it, a fake step sizes the exchange as if every expert received the same number of rows.
The seam is one function the context swaps, and it counts real tensors for real: a real step is the same with or
without the context.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn


def _to_ranks(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    from torch.distributed._functional_collectives import (
        all_to_all_single_autograd,
        wait_tensor,
    )

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def exchange_counts(expert_ids: torch.Tensor, n_experts: int, group) -> tuple[torch.Tensor, list[int], list[int]]:
    """(rows this rank receives per (source rank, local expert) (ep, n_local), rows it sends to each rank, rows it
    receives from each rank): the counts' all-to-all, then the host sync every EP step pays."""
    ep = dist.get_world_size(group)
    counts = torch.bincount(expert_ids, minlength=n_experts)  # (n_experts,)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)  # recv[src * n_local + e]: src's rows for local e
    recv = recv.view(ep, -1)
    return recv, counts.view(ep, -1).sum(1).tolist(), recv.sum(1).tolist()


def balanced_counts(expert_ids: torch.Tensor, n_experts: int, group) -> tuple[torch.Tensor, list[int], list[int]]:
    """exchange_counts for a fake tensor, under balanced routing: of its n rows a rank sends n / ep to every rank
    (n / n_experts per expert) and, every rank routing alike, receives as many from each. The counts' all-to-all is
    still issued (the real step's, for its bytes). A real tensor is counted for real: the context cannot change a
    real step."""
    from torch._subclasses.fake_tensor import is_fake

    if not is_fake(expert_ids):
        return exchange_counts(expert_ids, n_experts, group)
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    counts = torch.empty(n_experts, dtype=torch.long, device=expert_ids.device)  # fake: the values are never read
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)
    base, extra = divmod(expert_ids.numel(), ep)  # the rows of a non-multiple go to the first ranks
    send = [base + (r < extra) for r in range(ep)]
    return recv.view(ep, -1), send, [send[rank]] * ep


# What expert_parallel_compute counts rows with: exchange_counts, or balanced_counts under balanced_routing(). A
# module global rather than a ContextVar: autograd may recompute a checkpointed forward on another thread.
_counts = exchange_counts


@contextlib.contextmanager
def balanced_routing():
    """MOE_SPEC.simulate_context: fake steps under it size the EP all-to-all as balanced routing would."""
    global _counts
    _counts = balanced_counts
    try:
        yield
    finally:
        _counts = exchange_counts


def expert_parallel_compute(moe: nn.Module, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """rows (n, dim) sorted by their (global) expert ids (n,) -> each row through its expert, in the same order.

    Send: rows for the experts of rank r go to r (they are contiguous: ids are sorted). Receive: rows ordered by
    (source rank, local expert), regrouped by local expert for the grouped matmul, then sent back the same way."""
    ep, n_local = moe.ep_size, moe.args.n_experts // moe.ep_size
    recv, send_splits, recv_splits = _counts(expert_ids, moe.args.n_experts, moe.ep_group)
    got = _to_ranks(rows, recv_splits, send_splits, moe.ep_group)  # (sum recv, dim)
    local_ids = torch.repeat_interleave(torch.arange(n_local, device=rows.device).repeat(ep), recv.flatten(),
                                        output_size=got.shape[0])  # the size known on the host: no second sync
    order = local_ids.argsort(stable=True)  # (source, expert) -> (expert, source)
    out = moe.experts(got[order], recv.sum(0))[order.argsort()]  # back to (source, expert) order
    return _to_ranks(out, send_splits, recv_splits, moe.ep_group)
