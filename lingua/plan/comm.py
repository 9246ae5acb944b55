"""Bytes per collective kind, counted where the collectives are issued: a dispatch mode that sees the c10d ops FSDP2
calls and the functional collectives DTensor (TP, loss parallel) and the MoE dispatch call, the same set torch's
CommDebugMode counts. A collective's size is its full buffer (all-gather: the gathered output; reduce-scatter: the
unreduced input; all-reduce: the tensor; all-to-all: what this rank sends; send_recv: each buffer sent plus each one
received, as batch_isend_irecv issues them for pipeline stages and the context-parallel ring), with its group's ranks,
so the time model (lingua/plan/estimate.py) can apply ring factors and pick NVLink or the inter-node link."""

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv")

# op name (the overload packet's name, without namespace) -> (kind, index of the buffer argument)
_OPS = {
    "_allgather_base_": ("all_gather", 0), "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "allgather_": ("all_gather", 0), "all_gather_into_tensor": ("all_gather", 0),
    "all_gather_into_tensor_coalesced": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1), "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1), "reduce_scatter_tensor": ("reduce_scatter", 0),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0), "all_reduce": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "alltoall_base_": ("all_to_all", 1), "alltoall_": ("all_to_all", 1), "all_to_all_single": ("all_to_all", 0),
    "send": ("send_recv", 0), "recv_": ("send_recv", 0), "recv_any_source_": ("send_recv", 0),
}
# functional collectives that return the gathered output (its size is what we count, not the input's)
_OUTPUT_SIZED = {"all_gather_into_tensor", "all_gather_into_tensor_coalesced"}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _group_ranks(args, kwargs) -> tuple:
    """The collective's group, as global ranks: a ProcessGroup argument (c10d ops) or a group name (functional)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in list(args) + list(kwargs.values()):
        group = None
        if isinstance(a, dist.ProcessGroup):
            group = a
        elif isinstance(a, torch.ScriptObject):
            with contextlib.suppress(Exception):  # some other script object
                group = dist.ProcessGroup.unbox(a)
        elif isinstance(a, str):
            with contextlib.suppress(Exception):  # a string that is not a group name
                group = _resolve_process_group(a)
        if group is not None:
            return tuple(dist.get_process_group_ranks(group))
    return (dist.get_rank(),)


@dataclass
class CommCounts:
    """bytes[(kind, group ranks)] and calls[kind] of one step."""

    bytes: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))

    def by_kind(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for (kind, _), n in self.bytes.items():
            out[kind] += n
        return out


class CommCounter(TorchDispatchMode):
    """Counts every collective issued under it into `self.counts` (a CommCounts)."""

    def __init__(self):
        super().__init__()
        self.counts = CommCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor lower to local ops (and its collectives) first; we see those
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in _OPS and func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            kind, i = _OPS[name]
            buf = out if name in _OUTPUT_SIZED else args[i]
            self.counts.bytes[(kind, _group_ranks(args, kwargs))] += _nbytes(buf)
            self.counts.calls[kind] += 1
        return out
