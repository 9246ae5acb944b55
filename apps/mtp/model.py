"""Multi-token prediction (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction").

A shared trunk of `n_layers` transformer blocks, then `n_future_head` heads, each one more transformer block followed
by the shared final norm and unembedding. Head k (k = 0 .. n_future_head - 1) predicts token t + k + 1 from the trunk's
state at t; the training loss is the sum over heads of each head's mean cross-entropy. Head 0 is the ordinary
next-token head: evaluation and generation use it alone, so with n_future_head = 1 the model *is* the main app's
transformer with n_layers + 1 layers (same parameter names, same init, same loss).

    trunk:   tokens -> tok_embeddings -> layers[0] ... layers[n_layers - 1] -> h
    head k:  h -> layers[n_layers + k] -> norm -> output -> logits for token t + k + 1

`model.layers` holds every block, trunk then heads, so FSDP, activation checkpointing, compile and the transformer's
tensor-parallel plan wrap the heads as they wrap any block. The extra heads also serve as a free drafter for
self-speculative decoding (speculative.py). MTP_SPEC at the end is what the train loop, eval and generate take.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from apps.mtp.hf import MTP_HF
from lingua.errors import ConfigError, LinguaError
from lingua.models.kv_cache import KVCache
from lingua.models.spec import ModelSpec
from lingua.models.transformer.model import Transformer, TransformerArgs
from lingua.models.transformer.model import flops_per_token as transformer_flops
from lingua.models.transformer.parallelize import parallelize_transformer
from lingua.models.transformer.spec import describe_attention


@dataclass
class MTPArgs(TransformerArgs):
    n_future_head: int = 1  # heads; head k predicts token t + k + 1. Train with data.n_views = n_future_head + 1

    def __post_init__(self):
        super().__post_init__()
        if self.n_future_head < 1:
            raise ConfigError(f"model.n_future_head must be >= 1 (got {self.n_future_head})")


def check_train_args(train_args) -> None:
    """The data loader gives head k its target through data.n_views = model.n_future_head + 1."""
    n_views, heads = train_args.data.n_views, train_args.model.n_future_head
    if n_views != heads + 1:
        raise ConfigError(f"data.n_views={n_views} must be model.n_future_head + 1 = {heads + 1} "
                          "(one target view per head)")


class MTPCache(KVCache):
    """The transformer KV cache over the trunk and the first `n_heads` heads (their blocks attend too, so each keeps
    its own keys and values). Layer i < n_layers is trunk block i; layer n_layers + k is head k. `len` may be moved
    back to drop positions (speculative decoding discards rejected drafts this way)."""

    def __init__(self, args: MTPArgs, n_heads: int, bs: int, max_len: int, pad=None, device=None,
                 dtype=torch.float32):
        if not 1 <= n_heads <= args.n_future_head:
            raise LinguaError(f"a cache for {n_heads} heads: the model has n_future_head={args.n_future_head}")
        if max_len > args.max_seqlen:
            raise LinguaError(f"KV cache of {max_len} tokens exceeds model.max_seqlen={args.max_seqlen}")
        _, n_kv_heads, head_dim = args.heads
        super().__init__(args.n_layers + n_heads, n_kv_heads, head_dim, bs, max_len, pad, device, dtype)
        self.n_heads = n_heads


class MTPTransformer(Transformer):
    """`layers` holds the trunk's blocks then one block per head; the final norm and the unembedding are shared."""

    def __init__(self, args: MTPArgs):
        super().__init__(args, n_blocks=args.n_layers + args.n_future_head)
        self.n_trunk = args.n_layers

    # ------------------------------------------------------------ training and scoring

    def trunk(self, tokens: torch.Tensor, inputs: tuple, cache: Optional[MTPCache] = None) -> torch.Tensor:
        """Embeddings through the trunk's blocks: (bs, seqlen, dim), not normed (the heads' blocks read it)."""
        h = self.tok_embeddings(tokens)
        for i in range(self.n_trunk):
            h = self.layers[i](h, *inputs) if cache is None else self.layers[i](h, *inputs, cache=cache.layer(i))
        return h

    def head_state(self, k: int, h: torch.Tensor, inputs: tuple) -> torch.Tensor:
        """Head k on the trunk state: (bs, seqlen, dim) -> its normed state, whose output projection gives the logits
        for token t + k + 1."""
        return self.norm(self.layers[self.n_trunk + k](h, *inputs))

    def forward(self, tokens: torch.Tensor, target=None, tok_idx=None, cache: Optional[MTPCache] = None):
        """tokens, tok_idx: int64 (bs, seqlen); target: (bs, seqlen) with one head, else (bs, seqlen, n_views - 1),
        view k being token t + k + 1 (lingua.data.loader with n_views = n_future_head + 1).

        No target: the next-token head's logits (bs, seqlen, vocab_size). With a target: the sum over heads of each
        head's mean cross-entropy. With a `cache` (inference): the next-token head's logits, through the cache."""
        if cache is not None:
            return self.logits(self.forward_heads(tokens, cache)[0])
        self.check_length(tokens, None)
        inputs = self.block_inputs(tokens, tok_idx, None)  # RoPE angles and the mask
        h = self.trunk(tokens, inputs)
        if target is None:
            return self.logits(self.head_state(0, h, inputs))
        views = target.unsqueeze(-1) if target.dim() == 2 else target  # (bs, seqlen, n_views - 1)
        if views.shape[-1] < self.args.n_future_head:
            raise LinguaError(f"model.n_future_head={self.args.n_future_head} needs data.n_views >= "
                              f"{self.args.n_future_head + 1} (the target has {views.shape[-1]} view(s))")
        head_losses = []
        for k in range(self.args.n_future_head):  # one head at a time: at most one head's activations in flight
            head_losses.append(self.loss(self.head_state(k, h, inputs), views[..., k]))
        if self.training:
            self._record_head_losses(head_losses)
        return sum(head_losses[1:], head_losses[0])

    @torch.compiler.disable  # a side effect on the module: kept out of a compiled forward's graph
    def _record_head_losses(self, head_losses: list) -> None:
        """Add each head's loss (this rank, detached) to the sums `take_head_losses` reads at log steps."""
        local = torch.stack([loss.detach().to_local() if hasattr(loss, "to_local") else loss.detach()
                             for loss in head_losses])
        sums, n = getattr(self, "_head_loss_sums", (None, 0))
        self._head_loss_sums = (local if sums is None else sums + local, n + 1)

    def take_head_losses(self) -> Optional[torch.Tensor]:
        """Each head's mean loss over this rank's forwards since the last call (None if none), and reset."""
        sums, n = getattr(self, "_head_loss_sums", (None, 0))
        self._head_loss_sums = (None, 0)
        return None if sums is None else sums / n

    # ------------------------------------------------------------ inference

    def make_cache(self, bs: int, max_len: int, pad=None, device=None, dtype=torch.float32, heads: int = 1):
        """The generator's inference state (lingua.eval.generate): a KV cache over the trunk and the first `heads` heads.
        One head (plain decoding) costs what an (n_layers + 1)-layer transformer costs."""
        return MTPCache(self.args, heads, bs, max_len, pad, device, dtype)

    def forward_heads(self, tokens: torch.Tensor, cache: MTPCache) -> list[torch.Tensor]:
        """The next `seqlen` tokens of every row through the trunk and the cache's `n_heads` heads; advances the cache.
        Returns each head's normed state (bs, seqlen, dim): `model.logits(h)` gives its logits, so a caller can project
        only the positions it needs."""
        inputs = self.block_inputs(tokens, None, cache)  # positions and mask from the cache
        h = self.trunk(tokens, inputs, cache)
        outs = [self.norm(self.layers[i](h, *inputs, cache=cache.layer(i)))
                for i in range(self.n_trunk, self.n_trunk + cache.n_heads)]
        cache.len += tokens.shape[1]
        return outs

    # ------------------------------------------------------------ init

    def init_block(self, depth: int, block) -> None:
        """Each head is initialised as the block right after the trunk (depth n_layers, of a path n_layers + 1 blocks
        deep): with one head, exactly the (n_layers + 1)-layer transformer's init."""
        a = self.args
        block.init_weights(a.init_base_std, self.residual_factor(min(depth, a.n_layers), a.n_layers + 1))


def flops_per_token(args: MTPArgs, seq_len: int) -> float:
    """Training FLOPs per token (see lingua.models.transformer.model.flops_per_token): the trunk and every head block count as
    layers, and each extra head runs the final norm and the output projection once more."""
    extra_unembed = (args.n_future_head - 1) * (args.vocab_size * args.dim + args.dim)
    return transformer_flops(args, seq_len, n_layers=args.n_layers + args.n_future_head) + 6 * extra_unembed


def head_metrics(model: MTPTransformer) -> dict:
    """`loss/head_k` for the metrics row: head k's mean loss over the micro-batches since the last log step,
    averaged over ranks (tensor-parallel ranks hold the same value, so the world mean is the data-parallel mean)."""
    means = model.take_head_losses()
    if means is None:
        return {}
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(means)
        means = means / dist.get_world_size()
    return {f"loss/head_{k}": v for k, v in enumerate(means.tolist())}


MTP_SPEC = ModelSpec(name="mtp", path="apps.mtp.model:MTP_SPEC", args_cls=MTPArgs, build=MTPTransformer,
                     flops_per_token=flops_per_token, parallelize=parallelize_transformer, describe=describe_attention,
                     check_train_args=check_train_args, step_metrics=head_metrics, hf=MTP_HF)
