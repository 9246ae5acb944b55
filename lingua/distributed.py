"""Who am I, on what device, in which mesh; and how the model is parallelized (applied from outside the model).

Launchers: torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*), SLURM srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master
from the job's first host), or one plain process with no process group at all. Device and backend are picked at run
time: CUDA -> nccl, CPU -> gloo. Nothing here touches CUDA unless a GPU is present.
"""

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from lingua.errors import ConfigError, LinguaError

logger = logging.getLogger(__name__)


@dataclass
class DistributedArgs:
    dp_shard: int = 1  # FSDP shard group size
    dp_replicate: int = 1  # replicas (DDP, or HSDP's outer dim); inferred from the world size when left at 1
    tp_size: int = 1
    fsdp_type: str = "full_shard"  # full_shard (FSDP2) | no_shard (DDP-style replicate)
    model_dtype: str = "auto"  # auto | bf16 | fp32: auto takes bf16 only where the hardware runs it natively
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # full AC of every block
    selective_activation_checkpointing: bool = False  # save matmul outputs, recompute the rest
    float8_recipe: Optional[str] = None  # torchao float8 (GPU only)
    matmul_allow_tf32: bool = False
    fsdp_reshard_after_forward: bool = True
    loss_parallel: bool = True  # with TP: keep logits sharded over the vocabulary for the loss
    device: str = "auto"  # auto | cpu | cuda
    backend: Optional[str] = None  # override: gloo | nccl
    timeout_s: int = 600  # a collective that waits longer (e.g. a dead peer) raises instead of hanging


@dataclass
class DistEnv:
    launcher: str  # single | torchrun | slurm
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def _slurm_master_addr(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def detect_env(environ=None) -> DistEnv:
    """Read the launcher's variables; torchrun wins over SLURM (torchrun inside an allocation)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            "torchrun",
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        job_id = int(env["SLURM_JOB_ID"])
        return DistEnv(
            "slurm",
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or _slurm_master_addr(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
        )
    return DistEnv("single")


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"distributed.device must be auto, cpu or cuda, got '{requested}'")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LinguaError("distributed.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_backend(device: torch.device, override: Optional[str]) -> str:
    if override:
        return override
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class DistState:
    env: DistEnv
    device: torch.device
    mesh: Optional["torch.distributed.device_mesh.DeviceMesh"]
    dp_rank: int
    dp_size: int
    tp_size: int

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or `op`) over every rank; a no-op on one process."""
        if dist.is_initialized():
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def resolve_mesh_shape(args: DistributedArgs, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp): dp_replicate is inferred when left at 1; anything else must multiply to the world."""
    for key in ("dp_shard", "dp_replicate", "tp_size"):
        if getattr(args, key) < 1:
            raise ConfigError(f"distributed.{key} must be >= 1, got {getattr(args, key)}")
    rep, shard, tp = args.dp_replicate, args.dp_shard, args.tp_size
    if rep == 1 and world_size % (shard * tp) == 0:
        rep = world_size // (shard * tp)
    if rep * shard * tp != world_size:
        raise ConfigError(
            f"world size {world_size} does not factor into dp_replicate={args.dp_replicate} x "
            f"dp_shard={args.dp_shard} x tp_size={args.tp_size}"
        )
    if args.fsdp_type not in ("full_shard", "no_shard"):
        raise ConfigError(f"distributed.fsdp_type must be full_shard or no_shard, got '{args.fsdp_type}'")
    if args.fsdp_type == "no_shard" and shard > 1:
        raise ConfigError(f"distributed.fsdp_type=no_shard needs dp_shard=1 (got dp_shard={shard}); use dp_replicate")
    return rep, shard, tp


def init_distributed(args: DistributedArgs, environ=None) -> DistState:
    env = detect_env(environ)
    device = pick_device(args.device, env.local_rank)
    rep, shard, tp = resolve_mesh_shape(args, env.world_size)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.matmul_allow_tf32
        torch.backends.cudnn.allow_tf32 = args.matmul_allow_tf32
    if env.world_size == 1:
        return DistState(env, device, None, 0, 1, 1)
    os.environ.setdefault("MASTER_ADDR", env.master_addr or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(env.master_port or 29500))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=pick_backend(device, args.backend),
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=args.timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (rep, shard, tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    # The data loader's rank counts over both data-parallel dims, never over tp (lingua issue #58).
    dp_rank = mesh.get_local_rank("dp_replicate") * shard + mesh.get_local_rank("dp_shard")
    return DistState(env, device, mesh, dp_rank, rep * shard, tp)


# ---------------------------------------------------------------- parallelization, applied in torchtitan's order


def apply_tp(model: nn.Module, tp_mesh, loss_parallel: bool) -> None:
    """Megatron-style plan for our block convention: colwise q/k/v and w1/w3, rowwise wo and w2, sequence-parallel norms."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    if getattr(model, "output", None) is not None and model.output.weight is model.tok_embeddings.weight:
        raise ConfigError("model.weight_tying=true cannot be combined with distributed.tp_size > 1")
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(
                input_layouts=Shard(1),
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
        },
    )
    for block in model.layers:
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
        parallelize_module(block, tp_mesh, plan)


def apply_ac(model: nn.Module, selective: bool) -> None:
    """Wrap each block: full recomputation, or selective (keep matmul outputs, recompute pointwise ops)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs = {"preserve_rng_state": False}
    if selective:
        from functools import partial

        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        save = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

        def policy(ctx, op, *args, **kw):
            return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, policy)
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, **kwargs)


def apply_compile(model: nn.Module) -> None:
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block, fullgraph=False)


def apply_data_parallel(model: nn.Module, mesh, args: DistributedArgs, param_dtype: torch.dtype) -> None:
    if args.fsdp_type == "no_shard":
        from torch.distributed._composable.replicate import replicate

        dp_mesh = mesh["dp_replicate"]
        replicate(model, device_mesh=dp_mesh)
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rep, shard = mesh["dp_replicate"].size(), mesh["dp_shard"].size()
    # HSDP when both dims > 1: FSDP's 2D mesh shards over dp_shard and replicates over dp_replicate.
    dp_mesh = mesh["dp_replicate", "dp_shard"] if rep > 1 and shard > 1 else mesh["dp_shard" if shard > 1 else "dp_replicate"]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        # The last block is resharded by the root anyway; keeping it unsharded saves one all-gather.
        reshard = args.fsdp_reshard_after_forward and i < len(model.layers) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=args.fsdp_reshard_after_forward)


def parallelize_model(
    model: nn.Module,
    mesh,
    args: DistributedArgs,
    param_dtype: torch.dtype = torch.float32,
    tp_plan: Optional[Callable] = None,
) -> nn.Module:
    """TP -> activation checkpointing -> compile per block -> FSDP2/replicate. `mesh` is None on one process."""
    if args.float8_recipe:
        if not torch.cuda.is_available():
            raise LinguaError("distributed.float8_recipe needs a CUDA GPU (float8 matmuls have no CPU kernels)")
        from lingua.errors import require

        require("torchao", "gpu")
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(
            model,
            config=Float8LinearConfig.from_recipe_name(args.float8_recipe),
            module_filter_fn=lambda mod, fqn: fqn != "output",
        )
    if mesh is not None and mesh["tp"].size() > 1:
        (tp_plan or apply_tp)(model, mesh["tp"], args.loss_parallel)
    if args.activation_checkpointing or args.selective_activation_checkpointing:
        apply_ac(model, selective=args.selective_activation_checkpointing)
    if args.compile:
        apply_compile(model)
    if mesh is not None and mesh["dp_replicate"].size() * mesh["dp_shard"].size() > 1:
        apply_data_parallel(model, mesh, args, param_dtype)
    return model
