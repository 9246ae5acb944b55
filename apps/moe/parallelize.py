"""How the MoE model is parallelized (MOE_SPEC.parallelize): expert parallelism set up here, then the generic
float8 -> AC -> compile -> FSDP of lingua.distributed.parallelize, with each block's experts in their own FSDP group.

    ranks (tp_size = 1):  the data-parallel world, viewed as a (dp_mod_ep, ep) mesh
    expert weights:       DTensors [n_experts, ...] Shard(0) over `ep` (a checkpoint holds the whole tensor, so DCP
                          reshards it between EP sizes), then FSDP over `dp_mod_ep` (the ranks that hold the same
                          experts; on dim 1 when they outnumber a rank's experts); every other weight is FSDP over
                          the whole world as in any app

An expert's gradient arrives summed over the tokens of the whole ep group, where every other weight's is a mean over
data-parallel ranks: the experts' FSDP group divides by the world size instead of its own size, so both are the
gradient of the global mean loss. With ep_size = 1 on several ranks only the routing statistics become global
(MoE.stats_group): the aux loss and the bias update see the global batch, and 1 and N processes train the same model.
"""

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from lingua.distributed.mesh import DistributedArgs, resolve_mesh_shape
from lingua.distributed.parallelize import parallelize_decoder
from lingua.errors import ConfigError


def moe_modules(model: nn.Module) -> list[nn.Module]:
    """The MoE feed-forward of every block (apps/moe/model.py: MoEBlock.feed_forward)."""
    return [block.feed_forward for block in model.layers]


def shard_experts(moe: nn.Module, ep_mesh) -> None:
    """Shard `moe.experts` (meta device, before materialisation) over ep_mesh["ep"]."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep = ep_mesh["ep"]
    for name, p in list(moe.experts.named_parameters(recurse=False)):
        moe.experts.register_parameter(name, nn.Parameter(distribute_tensor(p, ep, [Shard(0)])))
    moe.ep_group, moe.ep_size = ep.get_group(), ep.size()


def shard_expert_groups(block: nn.Module, fsdp_mesh, world: int, **fsdp_kwargs) -> None:
    """A block's experts get their own FSDP group over the ranks that hold the same experts; their gradient is a sum
    over the ep group's tokens, so it is divided by the whole world."""
    from torch.distributed.fsdp import fully_shard

    experts = block.feed_forward.experts
    fully_shard(experts, mesh=fsdp_mesh, shard_placement_fn=expert_placement(experts, fsdp_mesh.size()),
                **fsdp_kwargs)
    experts.set_gradient_divide_factor(world)


def expert_placement(experts: nn.Module, fsdp_size: int):
    """FSDP2's shard_placement_fn for a rank's experts: dim 0 (whole experts) when there are at least as many as
    ranks to shard them over, else dim 1 (torchtitan's choice): FSDP2 pads dim 0 to a multiple of the ranks, so one
    expert over 8 ranks would be stored and gathered as 8. None (FSDP's Shard(0)) when dim 1 does not divide."""
    from torch.distributed.tensor import Shard

    local = experts.w1.to_local() if hasattr(experts.w1, "to_local") else experts.w1
    even = all(p.shape[1] % fsdp_size == 0 for p in experts.parameters())
    if local.shape[0] >= fsdp_size or not even:
        return None
    return lambda param: Shard(1)


def data_parallel_group(mesh):
    """This rank's data-parallel replicas (its pipeline stage, cp and tp coordinates fixed), or None when alone."""
    rep, shard = mesh["dp_replicate"].size(), mesh["dp_shard"].size()
    if rep * shard == 1:
        return None
    if rep == 1 or shard == 1:
        return mesh["dp_shard" if shard > 1 else "dp_replicate"].get_group()
    return mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group()


def larger_ep(args, world_size: int) -> list[dict]:
    """MOE_SPEC.plan_candidates: when a plan does not fit, the next distributed.ep_size that divides both
    model.n_experts and the data-parallel ranks (each rank then holds fewer experts); none past n_experts."""
    shape, n = resolve_mesh_shape(args.distributed, world_size), args.model.n_experts
    dp = shape.dp_replicate * shape.dp_shard
    ep = next((k for k in range(args.distributed.ep_size + 1, n + 1) if n % k == 0 and dp % k == 0), None)
    return [{"distributed.ep_size": ep}] if ep else []


def parallelize_moe(model: nn.Module, mesh, args: DistributedArgs, param_dtype: torch.dtype,
                    device: torch.device) -> nn.Module:
    """Routing statistics over the world, experts over `ep`, then float8 -> AC -> compile -> FSDP2 (the experts in
    their own groups)."""
    if mesh is None:
        return parallelize_decoder(model, mesh, args, param_dtype, device, name="moe")
    if mesh["tp"].size() > 1:
        raise ConfigError("the MoE model has no tensor-parallel plan: set distributed.tp_size=1 "
                          "(distributed.ep_size shards the experts)")
    dp = mesh["dp_replicate"].size() * mesh["dp_shard"].size()
    for moe in moe_modules(model):  # the ranks that see different rows (not the other pipeline stages)
        moe.stats_group = dist.group.WORLD if dp == mesh.size() else data_parallel_group(mesh)
    shard_inner = None
    if args.ep_size > 1 and dp != mesh.size():
        raise ConfigError(f"distributed.ep_size={args.ep_size} needs every rank data-parallel (pp_size=1, cp_size=1)")
    n_experts = moe_modules(model)[0].args.n_experts
    if n_experts % args.ep_size:
        raise ConfigError(f"distributed.ep_size={args.ep_size} must divide model.n_experts={n_experts}")
    if args.ep_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        ep_mesh = init_device_mesh(torch.device(device).type, (dp // args.ep_size, args.ep_size),
                                   mesh_dim_names=("dp_mod_ep", "ep"))
        for moe in moe_modules(model):
            shard_experts(moe, ep_mesh)
        shard_inner = partial(shard_expert_groups, fsdp_mesh=ep_mesh["dp_mod_ep"], world=dp)
    return parallelize_decoder(model, mesh, args, param_dtype, device, name=f"moe, expert parallel x{args.ep_size}",
                               shard_inner=shard_inner)
