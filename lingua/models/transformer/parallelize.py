"""How the transformer is parallelized (its ModelSpec's `parallelize`): the generic float8 -> TP -> AC -> compile ->
FSDP of lingua.distributed.parallelize, with the tensor-parallel plan that lives here, next to the parameter names it
shards: Megatron-style colwise q/k/v and w1/w3, rowwise wo and w2, sequence-parallel norms (activations between
blocks are sharded over the sequence), and a vocab-sharded output projection for loss_parallel. Any model whose
blocks are lingua.models.transformer.model.TransformerBlock (the main app, MTP) uses it."""

import torch
from torch import nn

from lingua.distributed.context_parallel import shard_sequence
from lingua.distributed.mesh import DistributedArgs
from lingua.distributed.parallelize import gather_sequence, parallelize_decoder
from lingua.errors import ConfigError
from lingua.kernels.attention.ring import RingAttention


def apply_transformer_tp(model: nn.Module, tp_mesh, loss_parallel: bool) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    if model.output is not None and model.output.weight is getattr(model.tok_embeddings, "weight", None):
        raise ConfigError("model.weight_tying=true cannot be combined with distributed.tp_size > 1")
    if hasattr(model.layers[0].attention, "q_norm"):  # its weights would see only the local heads' gradients
        raise ConfigError("model.qk_norm=true cannot be combined with distributed.tp_size > 1 yet")
    attn = model.layers[0].attention
    n_heads, n_kv_heads = attn.wq.out_features // attn.head_dim, attn.wk.out_features // attn.head_dim
    hidden = model.layers[0].feed_forward.w1.out_features
    for what, n in (("model.n_heads", n_heads), ("model.n_kv_heads", n_kv_heads), ("the feed-forward width", hidden)):
        if n % tp:
            raise ConfigError(f"distributed.tp_size={tp} does not divide {what} ({n})")
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }  # a pipeline stage has only some of these (lingua/models/stage.py)
    parallelize_module(model, tp_mesh, {k: v for k, v in plan.items() if getattr(model, k) is not None})
    for block in model.layers:
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": gather_sequence(),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": gather_sequence(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            **({"feed_forward.w3": ColwiseParallel()} if hasattr(block.feed_forward, "w3") else {}),
        })


def apply_transformer_cp(model: nn.Module, cp_mesh) -> None:
    """Context parallel: every attention layer rings over the cp group (one shared kernel, which also builds the
    mask), and the model runs on this rank's two chunks of every sequence."""
    if model.args.attn_impl not in ("auto", "sdpa"):  # auto (the kernels' own choice): the ring replaces it
        raise ConfigError(f"model.attn_impl={model.args.attn_impl} cannot ring over distributed.cp_size="
                          f"{cp_mesh.size()} ranks: context parallelism runs ring attention on SDPA's kernels "
                          "(set model.attn_impl=sdpa)")
    kernel = RingAttention(cp_mesh.get_group())
    model.kernel = kernel
    for block in model.layers:
        block.attention.kernel = kernel
    shard_sequence(model, cp_mesh)


def parallelize_transformer(model: nn.Module, mesh, args: DistributedArgs, param_dtype: torch.dtype,
                            device: torch.device) -> nn.Module:
    """float8 -> tensor parallel -> context parallel (the plans above) -> AC -> compile -> FSDP2/HSDP/DDP."""
    return parallelize_decoder(model, mesh, args, param_dtype, device, name="transformer",
                               tp_plan=apply_transformer_tp, cp_plan=apply_transformer_cp)
