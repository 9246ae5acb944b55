"""Muon for the hidden 2-D matrices and AdamW for every other parameter, as one torch optimizer.

Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon) replaces a matrix's momentum update by its
orthogonalization (a quintic Newton-Schulz iteration, torch.optim.Muon's coefficients). `MuonAdamW` is a torch
`AdamW` whose param groups flagged `muon: True` are stepped by Muon instead, so the train loop, `LambdaLR`, gradient
clipping and DCP's `get_state_dict` / `set_state_dict` see a single optimizer, with AdamW's state layout
(step/exp_avg/exp_avg_sq) for AdamW params and a `momentum_buffer` for Muon params.

What torch.optim.Muon lacks and this adds:
- DTensor parameters (FSDP2 Shard(0), TP, HSDP): Newton-Schulz needs the whole matrix. Each matrix has one owner
  rank (largest first, to the least-loaded rank): the shards are gathered to the owner only, in the Newton-Schulz
  dtype, the owner orthogonalizes it and scatters each rank its shard back. The work is split across ranks, not
  repeated (DistMuon / Dion), and a step moves about 2x the matrices' bytes (in that dtype) over the network, not
  world_size x (tests/muon_dist_check.py counts them).
- The iteration's dtype is a group option (`optim.muon_ns_dtype`): auto runs it in bf16 where bf16 matmuls are
  native (CUDA, as torch's; CPUs with AVX512-BF16 or AMX, ~2.5x fp32's speed) and in fp32 elsewhere (bf16 matmuls
  are ~70x slower on CPUs without them). The multi-process tests pin fp32, which keeps layouts comparable.
- Learning-rate matching (Moonlight, Liu et al. 2025, arXiv:2502.16982): `adjust_lr="match_rms_adamw"` scales a
  matrix's update by 0.2 * sqrt(max(m, n)), which gives it about AdamW's update RMS, so the AdamW lr (and weight
  decay) carry over without a separate search. "original" is Keller Jordan's sqrt(max(1, m / n)).
"""

import functools
import itertools
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch.optim import AdamW

from lingua.errors import LinguaError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon / Keller Jordan's quintic
ADJUST_LR = ("match_rms_adamw", "original")
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # optim.muon_ns_dtype, besides auto


def resolve_ns_dtype(setting: str, device: torch.device) -> str:
    """optim.muon_ns_dtype (auto | bf16 | fp32) -> bf16 or fp32: auto is bf16 where bf16 matmuls run natively."""
    if setting != "auto":
        return setting
    from lingua.distributed.precision import cpu_bf16_features

    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_features()) else "fp32"


def orthogonalize(g: torch.Tensor, steps: int, dtype: str = "fp32", eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz approximation of U V^T for g = U S V^T (singular values land in ~[0.5, 1.5], see torch's
    Muon), iterated in `dtype` (bf16 | fp32), in g's dtype on the result."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(NS_DTYPES[dtype])
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the short side: the Gram matrix is min(m, n) square
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


def adjusted_lr(lr: float, shape: torch.Size, how: str) -> float:
    """The lr a Muon update of a (global) `shape` matrix is applied with."""
    m, n = shape[0], shape[1]
    if how == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(m, n))
    return lr * math.sqrt(max(1.0, m / n))


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def assign_owners(sizes: list[int], n_ranks: int) -> list[int]:
    """Owner index (0..n_ranks-1) of each matrix: largest first, each to the least-loaded rank (ties: lowest index),
    so every rank computes the same assignment and the Newton-Schulz work is balanced."""
    load, owners = [0] * n_ranks, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(n_ranks), key=lambda r: (load[r], r))
        owners[i], load[r] = r, load[r] + sizes[i]
    return owners


def _check_mesh(p) -> None:
    n = p.device_mesh.size()
    if n != dist.get_world_size():
        raise LinguaError(f"Muon: a parameter lives on a device mesh of {n} of {dist.get_world_size()} ranks; "
                          "distributed Muon needs meshes that span every rank")


@functools.lru_cache(maxsize=None)
def _pieces(shape: tuple, mesh, placements: tuple) -> tuple:
    """(local shape, global offset) of every global rank's piece of a DTensor laid out so, by rank (cached: the
    layout of a parameter never changes, and the mesh is read on the host once)."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    grid = mesh.mesh.tolist()
    coords = {}
    for idx in itertools.product(*(range(n) for n in mesh.mesh.shape)):
        coords[functools.reduce(lambda g, i: g[i], idx, grid)] = list(idx)
    return tuple(_compute_local_shape_and_global_offset(shape, mesh.mesh.shape, coords[r], placements)
                 for r in range(dist.get_world_size()))


def _slices(shape, offset) -> tuple:
    return tuple(slice(o, o + s) for s, o in zip(shape, offset))


def _gather_to_owner(u, owner: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The full matrix of DTensor `u` in `dtype` on rank `owner` (None elsewhere): each rank sends its shard once."""
    if all(p.is_replicate() for p in u.placements):  # no_shard (DDP): the owner has the matrix already
        return u.to_local().to(dtype) if dist.get_rank() == owner else None
    pieces = _pieces(tuple(u.shape), u.device_mesh, tuple(u.placements))
    width = max(math.prod(shape) for shape, _ in pieces)  # shards may be uneven: pad each to the largest
    local = u.to_local().to(dtype).flatten()
    send = torch.nn.functional.pad(local, (0, width - local.numel()))
    recv = [torch.empty_like(send) for _ in pieces] if dist.get_rank() == owner else None
    dist.gather(send, recv, dst=owner)
    if recv is None:
        return None
    full = torch.empty(u.shape, dtype=dtype, device=send.device)
    for (shape, offset), flat in zip(pieces, recv):
        full[_slices(shape, offset)] = flat[:math.prod(shape)].view(shape)
    return full


def _scatter_from_owner(full: Optional[torch.Tensor], u, owner: int, dtype: torch.dtype):
    """Each rank's piece of the owner's `full`, as a DTensor laid out as `u` (in u's dtype)."""
    from torch.distributed.tensor import DTensor

    pieces = _pieces(tuple(u.shape), u.device_mesh, tuple(u.placements))
    width = max(math.prod(shape) for shape, _ in pieces)
    recv = torch.empty(width, dtype=dtype, device=u.to_local().device)
    send = None
    if full is not None:
        send = [full[_slices(shape, offset)].flatten() for shape, offset in pieces]
        send = [torch.nn.functional.pad(t, (0, width - t.numel())) for t in send]
    dist.scatter(recv, send, src=owner)
    shape = pieces[dist.get_rank()][0]
    local = recv[:math.prod(shape)].view(shape).to(u.dtype)
    return DTensor.from_local(local, u.device_mesh, u.placements, run_check=False, shape=u.shape, stride=u.stride())


def orthogonalize_all(updates: list[torch.Tensor], steps: int, dtype: str = "fp32") -> list[torch.Tensor]:
    """Orthogonalize each matrix; DTensors are gathered to their owner, orthogonalized there, and scattered back."""
    out: list[Optional[torch.Tensor]] = [None if _is_dtensor(u) else orthogonalize(u, steps, dtype) for u in updates]
    shared = [i for i, u in enumerate(updates) if _is_dtensor(u)]
    if not shared:
        return out
    for i in shared:
        _check_mesh(updates[i])
    owners = assign_owners([updates[i].numel() for i in shared], dist.get_world_size())  # global ranks
    ns_dtype = NS_DTYPES[dtype]
    # all gathers, then each rank orthogonalizes its own matrices (in parallel across ranks), then all scatters;
    # every rank takes part in every gather and scatter, in the same order
    mine = {i: _gather_to_owner(updates[i], owner, ns_dtype) for i, owner in zip(shared, owners)}
    mine = {i: orthogonalize(full, steps, dtype).contiguous() for i, full in mine.items() if full is not None}
    for i, owner in zip(shared, owners):  # a tall matrix's result was a transpose view: contiguous to slice it
        out[i] = _scatter_from_owner(mine.pop(i, None), updates[i], owner, ns_dtype)
    return out


class MuonAdamW(AdamW):
    """AdamW over every param group, except groups with `muon: True` (2-D params only), which get Muon with the
    group's `momentum`, `nesterov`, `ns_steps`, `ns_dtype` (bf16 | fp32; default fp32) and `adjust_lr`; `lr` and `weight_decay` mean what they mean for
    AdamW (decoupled decay by lr * weight_decay, as torch.optim.Muon does)."""

    def __init__(self, param_groups: list[dict], **adamw_kwargs):
        super().__init__(param_groups, **adamw_kwargs)
        for group in self.param_groups:
            if group.get("muon"):
                for p in group["params"]:
                    if p.ndim != 2:
                        raise LinguaError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        try:  # AdamW's own step (fused/foreach kernels) over the AdamW groups only
            self.param_groups = [g for g in groups if not g.get("muon")]
            super().step()
        finally:
            self.param_groups = groups
        self._muon_step([g for g in groups if g.get("muon")])
        return loss

    def _muon_step(self, groups: list[dict]) -> None:
        params = [(p, g) for g in groups for p in g["params"] if p.grad is not None]
        updates = []
        for p, g in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                # a step count too, like AdamW's state (AdamW.__setstate__ reads every param's "step")
                state["step"], state["momentum_buffer"] = torch.tensor(0.0), torch.zeros_like(p.grad)
            state["step"] += 1
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - g["momentum"])  # elementwise: each rank on its own shard
            updates.append(p.grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf)
        how = {(g["ns_steps"], g.get("ns_dtype", "fp32")) for _, g in params}
        if len(how) > 1:
            raise LinguaError(f"Muon: param groups disagree on (ns_steps, ns_dtype): {sorted(how)}")
        ortho = orthogonalize_all(updates, *how.pop()) if params else []
        for (p, g), o in zip(params, ortho):
            p.mul_(1 - g["lr"] * g["weight_decay"])
            p.add_(o, alpha=-adjusted_lr(g["lr"], p.shape, g["adjust_lr"]))
