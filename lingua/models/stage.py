"""How a decoder splits into pipeline stages: a stage runs a contiguous range of blocks; the first stage also owns the
token embeddings, the last the final norm, the output projection and the loss.

    first:  tokens -> tok_embeddings -> layers[a:b] -> h
    middle: h -> layers[b:c] -> h
    last:   h -> layers[c:n] -> norm -> loss(labels)

A stage is the model itself, shallow-copied with what it does not own left out, so its parameter names are the whole
model's (`layers.5.attention.wq.weight` on whichever stage runs block 5) and a checkpoint loads into any pipeline
layout, or none. Plain PyTorch, no ranks: lingua/distributed/pipeline.py decides which stages a process runs.
"""

import copy
import functools
from typing import Optional

import torch
from torch import nn


class LayerSlice(nn.ModuleList):
    """Some of a model's blocks under their original indices (the parameter names), indexed by position like the
    ModuleList they came from: `stage.layers[0]` is the stage's first block, named `layers.<its index in the model>`."""

    def __init__(self, blocks: dict[int, nn.Module]):
        super().__init__()
        for i, block in blocks.items():
            self.add_module(str(i), block)

    def _get_abs_string_index(self, idx) -> str:
        return list(self._modules)[idx]  # position -> the block's name in the whole model


class AddLossGradient(torch.autograd.Function):
    """h unchanged forward; backward also seeds `loss` with gradient 1. A stage before the last adds its blocks'
    extra losses (MoE's aux losses) to the objective this way: it only sends h on, never a loss."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_dtype = loss.dtype
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=grad.device)


class DecoderStage(nn.Module):
    """The forward of a stage (mixed into the model's own class, whose block_inputs and loss it uses)."""

    def forward(self, x: torch.Tensor, tok_idx: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: tokens (bs, seqlen) on the first stage, else the previous stage's hidden state (bs, seqlen, dim);
        tok_idx (bs, seqlen): positions inside documents. Returns the hidden state, or on the last stage the mean loss
        against labels (bs, seqlen)."""
        h = x if self.tok_embeddings is None else self.tok_embeddings(x)
        inputs = self.block_inputs(tok_idx, tok_idx, None)  # block inputs need only the batch's shape and positions
        extra = None
        for block in self.layers:
            out = block(h, *inputs)
            h, aux = out if isinstance(out, tuple) else (out, None)  # MoE blocks also return their aux loss
            if aux is not None:
                extra = aux if extra is None else extra + aux
        if self.norm is None:
            if extra is None:
                return h
            self.sent_losses.append(extra.detach())  # for the logged loss: only the last stage returns one
            return AddLossGradient.apply(h, extra)
        loss = self.loss(self.norm(h), labels)
        return loss if extra is None else loss + extra


@functools.cache
def stage_class(cls: type) -> type:
    return type(f"{cls.__name__}Stage", (DecoderStage, cls), {})


def decoder_stage(model: nn.Module, layers: range) -> nn.Module:
    """The stage of `model` (a meta-device Decoder) that runs blocks `layers`; it shares its modules with `model`."""
    stage = nn.Module.__new__(stage_class(type(model)))
    # Own containers (parameters, buffers, children, hooks): what is set on one stage must not reach the model.
    stage.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in model.__dict__.items()})
    stage.layers = LayerSlice({i: model.layers[i] for i in layers})
    stage.sent_losses = []  # the extra losses a stage before the last added to the objective, per microbatch
    if layers.start > 0:
        stage.tok_embeddings = None
    if layers.stop < len(model.layers):
        stage.norm = stage.output = None
    return stage
