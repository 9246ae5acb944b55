"""Expert-parallel dispatch for apps/moe: each of the `ep` ranks of a group holds n_experts / ep experts; tokens
travel to their experts' rank and back with two all-to-alls (torch.distributed, gloo and nccl alike). How the experts
are sharded is apps/moe/parallelize.py. The layout and the gradient scaling are described there.
"""

import torch
import torch.distributed as dist
from torch import nn


def _to_ranks(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    from torch.distributed._functional_collectives import (
        all_to_all_single_autograd,
        wait_tensor,
    )

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def expert_parallel_compute(moe: nn.Module, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """rows (n, dim) sorted by their (global) expert ids (n,) -> each row through its expert, in the same order.

    Send: rows for the experts of rank r go to r (they are contiguous: ids are sorted). Receive: rows ordered by
    (source rank, local expert), regrouped by local expert for the grouped matmul, then sent back the same way."""
    ep, n_local = moe.ep_size, moe.args.n_experts // moe.ep_size
    counts = torch.bincount(expert_ids, minlength=moe.args.n_experts)  # (n_experts,)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=moe.ep_group)  # recv[src * n_local + e]: src's rows for local e
    send_splits = counts.view(ep, n_local).sum(1).tolist()  # the host sync every EP step pays
    recv = recv.view(ep, n_local)
    recv_splits = recv.sum(1).tolist()
    got = _to_ranks(rows, recv_splits, send_splits, moe.ep_group)  # (sum recv, dim)
    local_ids = torch.repeat_interleave(torch.arange(n_local, device=rows.device).repeat(ep), recv.flatten())
    order = local_ids.argsort(stable=True)  # (source, expert) -> (expert, source)
    out = moe.experts(got[order], recv.sum(0))[order.argsort()]  # back to (source, expert) order
    return _to_ranks(out, send_splits, recv_splits, moe.ep_group)
