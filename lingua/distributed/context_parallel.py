"""Context parallelism (distributed.cp_size): every sequence of a batch split over the cp ranks of the mesh.

The cp ranks of one data-parallel replica read the same batch (their dp_rank is the same). A hook on the model's
forward cuts tokens, targets and tok_idx into 2 x cp chunks and keeps this rank's two (chunks r and 2cp-1-r: causal
load balancing, lingua/kernels/attention/ring.py), so RoPE sees global positions and the attention kernel (set by the
model package's context-parallel plan, e.g. lingua/models/transformer/parallelize.py) rings over the group for the
rest of the sequence. On the way out the loss becomes the mean over every token of the global sequence (the gradient
stays this rank's: FSDP averages it over dp_shard x cp), and logits (evaluation) are gathered back into sequence
order. Parameters are the same on every cp rank, so FSDP shards over dp_shard x cp (lingua/distributed/parallelize.py).
"""

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_gather  # differentiable
from torch.distributed.tensor import DTensor

from lingua.errors import ConfigError, LinguaError
from lingua.kernels.attention.ring import local_positions


def check_context_parallel(args) -> None:
    """TrainArgs -> a one-line ConfigError when the sequences cannot be cut into 2 x cp_size equal chunks."""
    cp = args.distributed.cp_size
    for key, seq_len in (("data.seq_len", args.data.seq_len), ("eval.seq_len", args.eval.seq_len)):
        if cp > 1 and seq_len is not None and seq_len % (2 * cp):
            raise ConfigError(f"{key}={seq_len} is not divisible by 2 x distributed.cp_size = {2 * cp}: context "
                              "parallelism cuts every sequence into 2 x cp_size equal chunks")


def shard_sequence(model: nn.Module, cp_mesh) -> None:
    """Install the hooks that run `model` on this rank's part of every sequence (see the module docstring)."""
    group = cp_mesh.get_group()
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    signature = inspect.signature(model.forward)

    def before(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        if a.get("cache") is not None:
            raise LinguaError("decoding with a KV cache under distributed.cp_size > 1 is not supported: generate with "
                              "one process")
        tokens = a["tokens"]
        bs, seqlen = tokens.shape[:2]
        if seqlen % (2 * cp):
            raise LinguaError(f"sequence length {seqlen} is not divisible by 2 x distributed.cp_size = {2 * cp}")
        mine = local_positions(rank, cp, seqlen // cp, tokens.device)
        if a.get("tok_idx") is None:  # one document per row: positions are RoPE's angles, global ones
            a["tok_idx"] = torch.arange(seqlen, device=tokens.device).expand(bs, seqlen)
        for key in ("tokens", "target", "tok_idx"):
            if a.get(key) is not None:
                a[key] = a[key][:, mine]
        return bound.args, bound.kwargs

    def after(module, args, kwargs, output):
        if output.dim() == 0:  # the loss
            return _global_mean(output, group, cp)
        return _gather_sequence(output, group, rank, cp)

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)


def _global_mean(loss: torch.Tensor, group, cp: int) -> torch.Tensor:
    """The value: the mean over the cp ranks' losses (equal token counts: the global mean). The gradient: this
    rank's own, as for a data-parallel rank (FSDP averages gradients over dp_shard x cp)."""
    local = loss.to_local() if isinstance(loss, DTensor) else loss  # replicated under tensor parallel's loss_parallel
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    correction = total / cp - local.detach()
    if isinstance(loss, DTensor):
        correction = DTensor.from_local(correction, loss.device_mesh, loss.placements)
    return loss + correction


def _gather_sequence(x: torch.Tensor, group, rank: int, cp: int) -> torch.Tensor:
    """This rank's (bs, 2c, ...) part of every sequence -> the whole (bs, 2 x cp x c, ...) in sequence order."""
    if isinstance(x, DTensor):  # tensor parallel: vocab-sharded logits
        x = x.full_tensor()
    parts = all_gather(x.contiguous(), group=group)
    order = torch.cat([local_positions(r, cp, x.shape[1], x.device) for r in range(cp)])
    out = torch.empty((x.shape[0], x.shape[1] * cp, *x.shape[2:]), dtype=x.dtype, device=x.device)
    out[:, order] = torch.cat(parts, dim=1)
    return out
