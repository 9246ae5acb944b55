"""Multi-token prediction (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction").

A shared trunk of `n_layers` transformer blocks, then `n_future_head` heads, each one more transformer block followed
by the shared final norm and unembedding. Head k (k = 0 .. n_future_head - 1) predicts token t + k + 1 from the trunk's
state at t; the training loss is the sum over heads of each head's mean cross-entropy. Head 0 is the ordinary
next-token head: evaluation and generation use it alone, so with n_future_head = 1 the model *is* the main app's
transformer with n_layers + 1 layers (same parameter names, same init, same loss).

    trunk:   tokens -> tok_embeddings -> layers[0] ... layers[n_layers - 1] -> h
    head k:  h -> layers[n_layers + k] -> norm -> output -> logits for token t + k + 1

`model.layers` holds every block, trunk then heads, so FSDP, activation checkpointing and compile wrap the heads as
they wrap any block. The extra heads also serve as a free drafter for self-speculative decoding (speculative.py).
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua.errors import ConfigError, LinguaError
from lingua.transformer import (
    KVCache,
    RMSNorm,
    TransformerArgs,
    TransformerBlock,
    _trunc_normal_,
    attention_mask,
    check_args,
    depth_factor,
    flops_per_token as transformer_flops_per_token,
    rope_frequencies,
)


@dataclass
class MTPArgs(TransformerArgs):
    n_future_head: int = 1  # heads; head k predicts token t + k + 1. Train with data.n_views = n_future_head + 1


def check_mtp_args(args: MTPArgs) -> None:
    check_args(args)
    if args.n_future_head < 1:
        raise ConfigError(f"model.n_future_head must be >= 1 (got {args.n_future_head})")
    if args.vocab_size <= 0:
        raise ConfigError(f"model.vocab_size must be > 0 (got {args.vocab_size}): set it to the tokenizer's")


class MTPCache(KVCache):
    """The transformer KV cache over the trunk and the first `n_heads` heads (their blocks attend too, so each keeps
    its own keys and values). Layer i < n_layers is trunk block i; layer n_layers + k is head k. `len` may be moved
    back to drop positions (speculative decoding discards rejected drafts this way)."""

    def __init__(self, args: MTPArgs, n_heads: int, bs: int, max_len: int, pad=None, device=None,
                 dtype=torch.float32):
        if not 1 <= n_heads <= args.n_future_head:
            raise LinguaError(f"a cache for {n_heads} heads: the model has n_future_head={args.n_future_head}")
        super().__init__(dataclasses.replace(args, n_layers=args.n_layers + n_heads), bs, max_len, pad, device, dtype)
        self.n_heads = n_heads


class MTPTransformer(nn.Module):
    def __init__(self, args: MTPArgs):
        super().__init__()
        check_mtp_args(args)
        _, _, head_dim = check_args(args)
        self.args = args
        self.n_trunk = args.n_layers
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers + args.n_future_head))
        self.norm = RMSNorm(args.dim, args.norm_eps)  # shared by every head, as in the paper
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # shared unembedding
        if args.weight_tying:
            self.output.weight = self.tok_embeddings.weight
        freq_cos, freq_sin = rope_frequencies(head_dim, args.max_seqlen, args.rope_theta)
        self.register_buffer("freq_cos", freq_cos, persistent=False)  # recomputed by init_weights
        self.register_buffer("freq_sin", freq_sin, persistent=False)

    # ------------------------------------------------------------ training and scoring

    def _trunk(self, tokens: torch.Tensor, tok_idx: Optional[torch.Tensor]):
        """-> (trunk state (bs, seqlen, dim), freq_cos, freq_sin, mask): what every head block needs."""
        bs, seqlen = tokens.shape
        if seqlen > self.args.max_seqlen:
            raise LinguaError(f"sequence length {seqlen} exceeds model.max_seqlen={self.args.max_seqlen}")
        if tok_idx is None:
            freq_cos, freq_sin = self.freq_cos[:seqlen], self.freq_sin[:seqlen]  # (seqlen, head_dim // 2)
        else:  # packed documents restart their positions
            freq_cos, freq_sin = self.freq_cos[tok_idx], self.freq_sin[tok_idx]  # (bs, seqlen, head_dim // 2)
        doc_idx = tok_idx if self.args.mask == "block_causal" else None
        mask = attention_mask(self.args.attn_impl, doc_idx, bs, seqlen, tokens.device)
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        for i in range(self.n_trunk):
            h = self.layers[i](h, freq_cos, freq_sin, mask)
        return h, freq_cos, freq_sin, mask

    def _head_logits(self, k: int, h, freq_cos, freq_sin, mask) -> torch.Tensor:
        """Head k on the trunk state: (bs, seqlen, dim) -> logits (bs, seqlen, vocab_size) for token t + k + 1."""
        return self.output(self.norm(self.layers[self.n_trunk + k](h, freq_cos, freq_sin, mask)))

    def forward(self, tokens: torch.Tensor, target=None, tok_idx=None, cache: Optional[KVCache] = None):
        """tokens, tok_idx: int64 (bs, seqlen); target: (bs, seqlen) with one head, else (bs, seqlen, n_views - 1),
        view k being token t + k + 1 (lingua.data with n_views = n_future_head + 1).

        No target: the next-token head's logits (bs, seqlen, vocab_size). With a target: the sum over heads of each
        head's mean cross-entropy. With a `cache` (inference): the next-token head's logits, through the cache."""
        if cache is not None:
            h = self.forward_heads(tokens, cache)[0]
            return self.output(h)
        h, freq_cos, freq_sin, mask = self._trunk(tokens, tok_idx)
        if target is None:
            return self._head_logits(0, h, freq_cos, freq_sin, mask)
        views = target.unsqueeze(-1) if target.dim() == 2 else target  # (bs, seqlen, n_views - 1)
        if views.shape[-1] < self.args.n_future_head:
            raise LinguaError(f"model.n_future_head={self.args.n_future_head} needs data.n_views >= "
                              f"{self.args.n_future_head + 1} (the target has {views.shape[-1]} view(s))")
        loss = None
        for k in range(self.args.n_future_head):  # one head at a time: at most two heads' logits alive in forward
            logits = self._head_logits(k, h, freq_cos, freq_sin, mask)
            head_loss = F.cross_entropy(logits.flatten(0, 1).float(), views[..., k].flatten(0, 1))
            loss = head_loss if loss is None else loss + head_loss
        return loss

    # ------------------------------------------------------------ inference

    def make_cache(self, bs: int, max_len: int, pad=None, device=None, dtype=torch.float32, heads: int = 1):
        """The generator's inference state (lingua.generate): a KV cache over the trunk and the first `heads` heads.
        One head (plain decoding) costs what an (n_layers + 1)-layer transformer costs."""
        return MTPCache(self.args, heads, bs, max_len, pad, device, dtype)

    def forward_heads(self, tokens: torch.Tensor, cache: MTPCache) -> list[torch.Tensor]:
        """The next `seqlen` tokens of every row through the trunk and the cache's `n_heads` heads; advances the cache.
        Returns each head's normed state (bs, seqlen, dim): `model.output(h)` gives its logits, so a caller can project
        only the positions it needs."""
        positions, mask = cache.positions_and_mask(tokens.shape[1])  # (bs, seqlen), (bs, 1, seqlen, kv_len)
        freq_cos, freq_sin = self.freq_cos[positions], self.freq_sin[positions]  # (bs, seqlen, head_dim // 2)
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        for i in range(self.n_trunk):
            h = self.layers[i](h, freq_cos, freq_sin, mask, cache.layer(i))
        outs = []
        for k in range(cache.n_heads):
            i = self.n_trunk + k
            outs.append(self.norm(self.layers[i](h, freq_cos, freq_sin, mask, cache.layer(i))))
        cache.len += tokens.shape[1]
        return outs

    # ------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self):
        """As lingua.transformer.Transformer.init_weights, each head initialised as the block right after the trunk
        (depth n_layers, of a path n_layers + 1 blocks deep): with one head, exactly the (n_layers + 1)-layer init."""
        args = self.args
        if args.weight_tying:  # to_empty materialises each parameter separately, which unties them
            self.output.weight = self.tok_embeddings.weight
        _, _, head_dim = check_args(args)
        freq_cos, freq_sin = rope_frequencies(head_dim, args.max_seqlen, args.rope_theta, self.freq_cos.device)
        self.freq_cos.copy_(freq_cos)
        self.freq_sin.copy_(freq_sin)
        std = args.init_base_std or args.dim**-0.5
        _trunc_normal_(self.tok_embeddings.weight, std)
        depth_of_path = args.n_layers + 1
        for i, layer in enumerate(self.layers):
            depth = min(i, args.n_layers)  # every head sits right after the trunk
            layer.init_weights(args.init_base_std, depth_factor(args.init_std_factor, depth, depth_of_path, args.dim))
        self.norm.reset_parameters()
        if not args.weight_tying:
            _trunc_normal_(self.output.weight, std)

    def reset_parameters(self):
        self.init_weights()


def flops_per_token(args: MTPArgs, seq_len: int) -> float:
    """Training FLOPs per token (see lingua.transformer.flops_per_token): the trunk and every head block count as
    layers, and each extra head runs the final norm and the output projection once more."""
    as_layers = dataclasses.replace(args, n_layers=args.n_layers + args.n_future_head)
    extra_unembed = (args.n_future_head - 1) * (args.vocab_size * args.dim + args.dim)
    return transformer_flops_per_token(as_layers, seq_len) + 6 * extra_unembed
