"""The generic parallelisms, applied to a model from outside: float8, activation checkpointing, torch.compile, data
parallel (FSDP2 `fully_shard`, HSDP when both dp dims > 1, or `replicate` for fsdp_type=no_shard).

A model package owns how its model is parallelized (its ModelSpec's `parallelize`, torchtitan's order: TP -> AC ->
compile -> FSDP): lingua/models/transformer/parallelize.py adds its tensor-parallel plan, apps/moe/parallelize.py its
expert parallelism, by calling `parallelize_decoder` here. A model whose blocks live in `model.layers` and that needs
nothing else (apps/fastRNN, apps/mamba) takes `parallelize_decoder` as it is.
"""

import importlib.util
import logging
import os
import shutil
import sysconfig
from typing import Callable, Optional

import torch
from torch import nn

from lingua.distributed.mesh import DistributedArgs
from lingua.errors import ConfigError, LinguaError

logger = logging.getLogger(__name__)


def gather_sequence():
    """A ParallelStyle for a module whose first input arrives sharded over the sequence (Shard(1), from a
    sequence-parallel norm) and which needs the whole sequence (Replicate, as a plain tensor), e.g. attention; the
    other inputs (RoPE tables, mask, KV cache) pass through. PrepareModuleInput would need one layout per input."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ParallelStyle

    class GatherSequence(ParallelStyle):
        def _apply(self, module: nn.Module, mesh) -> nn.Module:
            def hook(_module, args):
                x = args[0]
                if not isinstance(x, DTensor):
                    x = DTensor.from_local(x, mesh, (Shard(1),), run_check=False)
                return (x.redistribute(mesh, (Replicate(),)).to_local(), *args[1:])

            module.register_forward_pre_hook(hook)
            return module

    return GatherSequence()


def _sac_policy():
    """Selective AC: keep the outputs of matmuls, attention, TP's reduce-scatters and EP's all-to-alls (not sent
    again); recompute pointwise ops."""
    from torch.utils.checkpoint import CheckpointPolicy

    names = ["aten.mm.default", "aten.addmm.default", "aten.bmm.default",
             "aten._scaled_dot_product_flash_attention.default",
             "aten._scaled_dot_product_efficient_attention.default",
             "aten._scaled_dot_product_cudnn_attention.default",  # SDPA's choice on H100 for some shapes
             "aten._scaled_dot_product_flash_attention_for_cpu.default",
             "_c10d_functional.reduce_scatter_tensor.default",
             "_c10d_functional.all_to_all_single.default"]  # the MoE's dispatch under EP (torchtitan saves it too)
    save = set()
    for name in names:
        ns, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, ns), op, None)
        if packet is not None:
            save.add(getattr(packet, overload))
    try:  # flex attention runs as a higher-order op, not an aten one
        from torch._higher_order_ops.flex_attention import flex_attention

        save.add(flex_attention)
    except ImportError:
        pass

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _sac_ignore_profiler_ops() -> None:
    """Selective AC replays a recomputed block op by op, matched by each op's call count, profiler annotations
    included. FSDP2 annotates one more call when it recomputes a module it wraps inside a checkpointed block (the
    MoE's experts under expert parallelism: FSDP::root_pre_forward), so the counts differ and the backward fails
    ("invocation index 2 ... not found in storage"). Annotations compute nothing: SAC skips them here, as
    pytorch/pytorch#196862 proposes for torch itself."""
    import torch.utils.checkpoint as checkpoint

    profiler = torch.ops.profiler
    checkpoint.SAC_IGNORED_OPS.update({profiler._record_function_enter_new.default,
                                       profiler._record_function_exit._RecordFunction})


def apply_ac(model: nn.Module, selective: bool) -> None:
    """Wrap each block: full recomputation, or selective (save matmul outputs, recompute the rest)."""
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs = {"preserve_rng_state": False}  # no dropout: recomputation needs no RNG replay
    if selective:
        _sac_ignore_profiler_ops()
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _sac_policy())
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, **kwargs)


def resolve_compile(setting, device: torch.device, tp: int, cp: int = 1) -> tuple[bool, str]:
    """distributed.compile -> (compile or not, why). auto compiles wherever inductor can generate code for the device
    (a CUDA GPU with triton; a CPU with a C++ compiler), except under tensor parallelism, whose backward fails
    compiled in this torch. Measured on 2 CPU cores (benchmarks/train_throughput.py): fused elementwise work, the
    compiled chunked loss and one graph for the model are worth it once the first steps have paid for compilation."""
    if setting is not True and setting is not False:  # auto
        if tp > 1:
            return False, "off (auto): tensor parallelism"
        if cp > 1:  # the ring's point-to-point messages run eager (graph breaks); not measured compiled
            return False, "off (auto): context parallelism"
        if device.type == "cuda":
            missing = cuda_toolchain_missing(importlib.util.find_spec("triton") is not None, _c_compiler(),
                                             os.path.join(sysconfig.get_paths()["include"], "Python.h"))
            return missing is None, f"off (auto): {missing}" if missing else "on (auto): CUDA + triton + C compiler"
        if device.type == "cpu":
            cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
            return cxx is not None, "on (auto): CPU + C++ compiler" if cxx else "off (auto): no C++ compiler found"
        return False, f"off (auto): no inductor backend for {device.type}"
    return setting, f"{'on' if setting else 'off'} (distributed.compile={str(setting).lower()})"


def _c_compiler():
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def cuda_toolchain_missing(triton: bool, c_compiler, python_h: str):
    """What inductor's CUDA path lacks, as a few words, or None: triton, and the C compiler and Python headers it
    builds each kernel's launcher with (a node without them fails at the first compiled step, not here)."""
    if not triton:
        return "triton is not installed"
    if c_compiler is None:
        return "no C compiler (cc/gcc/clang, or $CC) for triton's kernel launchers"
    if not os.path.isfile(python_h):
        return f"no Python headers ({python_h}; install python3-dev) for triton's kernel launchers"
    return None


def apply_compile(model: nn.Module, whole: bool) -> None:
    """Compile in place, so parameter names stay the same and checkpoints do not see compilation: the whole model
    (one graph, loss included) when no data-parallel wrapper splits it, else each block (FSDP/replicate hooks run
    between blocks)."""
    if whole:
        model.compile(dynamic=False)
    else:
        for block in model.layers:
            block.compile(dynamic=False)


# (block, **fully_shard kwargs) -> None: shards groups inside a block that need their own FSDP mesh (MoE experts)
InnerShard = Callable[..., None]


def data_parallel_mesh(mesh, fsdp_type: str):
    """The mesh gradients are averaged over: the data-parallel dims, and cp, whose ranks hold the same weights
    (torchtitan's dp_shard_cp). full_shard: HSDP (replicate x shard) when both dims > 1; with dp_shard=1 it shards
    over the replicas' dim (lingua's semantics: full_shard means "shard over every data-parallel rank" then)."""
    rep, shard, cp = mesh["dp_replicate"].size(), mesh["dp_shard"].size(), mesh["cp"].size()
    if fsdp_type == "no_shard":
        return mesh["dp_replicate", "cp"]._flatten("dp_replicate_cp") if cp > 1 else mesh["dp_replicate"]
    if shard * cp == 1:
        return mesh["dp_replicate"]
    inner = mesh["dp_shard", "cp"]._flatten("dp_shard_cp") if cp > 1 else mesh["dp_shard"]
    if rep == 1:
        return inner
    return mesh["dp_replicate", "dp_shard_cp" if cp > 1 else "dp_shard"]


def apply_data_parallel(model: nn.Module, mesh, args: DistributedArgs, param_dtype: torch.dtype,
                        shard_inner: Optional[InnerShard] = None) -> None:
    """FSDP2 per block then on the root (full_shard; HSDP when both dp dims > 1), or replicate (no_shard).
    `shard_inner(block, **kwargs)` runs before each block is sharded, with the block's own kwargs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs=False: FSDP would cast every float input of a block to param_dtype, the fp32 RoPE cos/sin
    # included (bf16 angles lose ~3 digits); the hidden state is already in param_dtype (a bf16 embedding's output)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    dp_mesh = data_parallel_mesh(mesh, args.fsdp_type)
    if args.fsdp_type == "no_shard":
        # DDP built on FSDP2's machinery: parameters are replicated DTensors, gradients all-reduced per block.
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for block in model.layers:
            replicate(block, mesh=dp_mesh, mp_policy=mp)
        replicate(model, mesh=dp_mesh, mp_policy=mp)
        return
    for i, block in enumerate(model.layers):
        # The root reshards the last block right away anyway; keeping it unsharded saves one all-gather.
        reshard = args.fsdp_reshard_after_forward and i < len(model.layers) - 1
        if shard_inner is not None:
            shard_inner(block, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    # The root holds the embedding, the final norm and the output (tied weights stay one parameter in one group).
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=args.fsdp_reshard_after_forward)


def apply_float8(model: nn.Module, args: DistributedArgs, tp_size: int) -> None:
    if args.device == "cpu" or not torch.cuda.is_available():
        raise LinguaError(f"distributed.float8_recipe={args.float8_recipe} needs a CUDA GPU (float8 matmuls have no "
                          "CPU kernels): set distributed.float8_recipe=null")
    if torch.cuda.get_device_capability() < (8, 9):
        raise LinguaError(f"distributed.float8_recipe needs compute capability >= 8.9 (H100, L4, RTX 40xx); "
                          f"{torch.cuda.get_device_name()} has {torch.cuda.get_device_capability()}")
    if tp_size > 1:
        raise ConfigError("distributed.float8_recipe is not supported with distributed.tp_size > 1 here")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise LinguaError(f"distributed.float8_recipe needs torchao ({e}): pip install torchao") from None
    convert_to_float8_training(
        model,
        config=Float8LinearConfig.from_recipe_name(args.float8_recipe),
        module_filter_fn=float8_filter,
    )


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """Which Linears become float8: not the vocab projection (kept in high precision), and only those whose in and
    out features are multiples of 16, which _scaled_mm requires (the MoE router's dim -> n_experts is not)."""
    if not isinstance(module, nn.Linear) or fqn == "output":
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def parallelize_decoder(model: nn.Module, mesh, args: DistributedArgs, param_dtype: torch.dtype = torch.float32,
                        device: torch.device = torch.device("cpu"), *, name: Optional[str] = None,
                        tp_plan: Optional[Callable] = None, shard_inner: Optional[InnerShard] = None,
                        cp_plan: Optional[Callable] = None) -> nn.Module:
    """float8 -> TP (`tp_plan(model, tp_mesh, loss_parallel)`) -> CP (`cp_plan(model, cp_mesh)`) -> activation
    checkpointing -> compile (whole model, or per block under data parallelism) -> FSDP2/replicate. `mesh` is None on
    one process. Called on the meta-device model, before `lingua.models.decoder.materialize` (see
    lingua.train.loop.build_model)."""
    tp, cp = (mesh["tp"].size(), mesh["cp"].size()) if mesh is not None else (1, 1)
    name = name or type(model).__name__
    if args.ep_size > 1 and shard_inner is None:
        raise ConfigError(f"distributed.ep_size={args.ep_size} needs a model with experts (apps/moe); {name} has none")
    applied = []
    if args.float8_recipe:
        apply_float8(model, args, tp)
        applied.append(f"float8 {args.float8_recipe}")
    if tp > 1:
        if tp_plan is None:
            raise ConfigError(f"{name} has no tensor-parallel plan: set distributed.tp_size=1 (FSDP/DDP work)")
        tp_plan(model, mesh["tp"], args.loss_parallel)
        applied.append(f"tensor parallel x{tp} (sequence parallel{', loss parallel' if args.loss_parallel else ''})")
    if cp > 1:
        if cp_plan is None:
            raise ConfigError(f"{name} has no context-parallel plan (no attention to ring): set distributed.cp_size=1")
        cp_plan(model, mesh["cp"])
        applied.append(f"context parallel x{cp} (ring attention, load-balanced chunks)")
    if args.ac != "none":
        apply_ac(model, selective=args.ac == "selective")
        applied.append(f"{args.ac} AC")
    rep, shard = (mesh["dp_replicate"].size(), mesh["dp_shard"].size()) if mesh is not None else (1, 1)
    dp = rep * shard * cp  # cp ranks hold the same weights: their gradients are averaged like data parallel ones
    compile, why = resolve_compile(args.compile, torch.device(device), tp, cp)
    if compile:
        apply_compile(model, whole=dp == 1)
    applied.append(f"compile {'of the whole model ' if compile and dp == 1 else 'per block ' if compile else ''}"
                   f"{why}")
    if dp > 1:
        apply_data_parallel(model, mesh, args, param_dtype, shard_inner)
        if args.fsdp_type == "no_shard":
            applied.append(f"replicate (DDP) x{rep * cp}")
        else:
            applied.append(f"FSDP2 {'HSDP ' + str(rep) + ' x ' if rep > 1 and shard * cp > 1 else ''}full_shard x{dp}"
                           f"{' (dp_shard x cp)' if cp > 1 else ''}")
    logger.info(f"parallelism ({name}): " + " | ".join(applied))
    return model
