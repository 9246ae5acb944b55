"""The language-model shell every architecture shares, in reading order: the args every model has, then the
`Decoder` base that owns the token embeddings, the stack of blocks, the final norm, the output projection (tied to
the embeddings or not), the forward, the loss and the init loop.

    tokens -> tok_embeddings -> layers[0] ... layers[n-1] -> norm -> output -> logits (or the loss, given a target)

`Decoder.forward` is that line, top to bottom. An architecture subclasses `Decoder` and supplies its block
(`block_cls`) and what every block receives besides the hidden state (`block_inputs`: RoPE tables and the mask for
the transformer, document positions for the recurrent models); generation also needs `make_cache`. One whose forward
does more (MTP's extra heads, MoE's auxiliary loss) overrides `forward` outright. Plain PyTorch, no ranks or meshes:
parallelism is applied from outside, block by block over `model.layers` (lingua/distributed/parallelize.py). Build on
the meta device, then `materialize`.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lingua.errors import ConfigError, LinguaError
from lingua.kernels.loss import cross_entropy, linear_cross_entropy
from lingua.models.init import INIT_STD_FACTORS, depth_factor, trunc_normal_
from lingua.models.layers import RMSNorm


def check_positive(args, *keys: str) -> None:
    """Each of `keys` of the model args is > 0 (None passes: "not set")."""
    for key in keys:
        value = getattr(args, key)
        if value is not None and not value > 0:  # NaN fails too
            raise ConfigError(f"model.{key} must be > 0 (got {value})")


def check_choice(args, key: str, allowed: tuple) -> None:
    if getattr(args, key) not in allowed:
        raise ConfigError(f"model.{key}={getattr(args, key)!r} is not one of {', '.join(allowed)}")


@dataclass
class DecoderArgs:
    """The `model:` section every architecture shares; an architecture's args subclass it. Constructing one checks
    every value, next to the field (`__post_init__`: a ConfigError naming the key). Sizes derived from several fields
    (heads, feed-forward width) are properties of the args, computed in one place and never fields: config.yaml and
    params.json keep only what was set, so a reloaded or edited config (another dim, say) derives them again instead
    of carrying stale ones."""

    dim: int = 512  # model width: the size of the token embeddings and of every block's input and output
    n_layers: int = 8  # blocks
    vocab_size: int = -1  # -1: the tokenizer's (the train loop fills it in)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_base_std: Optional[float] = None  # std of the input projections and embeddings; None: dim ** -0.5
    # residual output projections' std is the base std divided by: disabled (1) | current_depth | global_depth |
    # dim_ratio | zero (they start at 0: every block starts as the identity)
    init_std_factor: str = "disabled"
    max_seqlen: int = 1024  # the longest sequence training, evaluation and generation may feed the model
    weight_tying: bool = False  # the output projection is the embedding table
    fused_loss: bool = True  # training loss in chunks with its gradient, never the whole logits (lingua.kernels.loss)
    logit_softcap: Optional[float] = None  # logits = c * tanh(logits / c) (Gemma 2, modded-nanogpt); null: off

    def __post_init__(self):
        check_positive(self, "dim", "n_layers", "max_seqlen", "norm_eps", "init_base_std", "logit_softcap")
        check_choice(self, "init_std_factor", INIT_STD_FACTORS)


class Decoder(nn.Module):
    """Subclasses supply their block (`block_cls`, or `make_block(layer_id)`), and where they need them
    `block_inputs`, `init_buffers`, `init_block` and `make_cache`; an architecture whose forward does more (extra
    heads, an auxiliary loss) overrides `forward` outright. Every block is called as `block(h, *block_inputs)` in
    training and evaluation, and `block(h, *block_inputs, cache=cache.layer(i))` when decoding with an inference
    cache."""

    block_cls: Optional[type] = None  # built from the model args, once per layer

    def __init__(self, args: DecoderArgs, n_blocks: Optional[int] = None):
        super().__init__()
        if args.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be > 0 (got {args.vocab_size}): set it to the tokenizer's")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(self.make_block(i) for i in range(args.n_layers if n_blocks is None else n_blocks))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()

    @classmethod
    def build(cls, args: DecoderArgs, device="cpu", seed: int = 42) -> "Decoder":
        """A randomly initialised model on `device` (meta-device construction, then `materialize`), for research code
        and tests; the train loop parallelizes between the two steps, evaluation loads weights instead of the init."""
        with torch.device("meta"):
            model = cls(args)
        return materialize(model, device, seed)

    # ------------------------------------------------------------ the forward

    def forward(self, tokens: torch.Tensor, target: Optional[torch.Tensor] = None,
                tok_idx: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        """tokens, tok_idx: int64 (bs, seqlen); tok_idx is each token's position inside its document (packed
        documents). Returns logits (bs, seqlen, vocab_size), or the mean loss when a target is given: (bs, seqlen), or
        (bs, seqlen, n_views - 1) of which view 0 (the next token) is scored.

        With a `cache` (inference): tokens are the next `seqlen` tokens of every row; the cache advances."""
        self.check_length(tokens, cache)
        inputs = self.block_inputs(tokens, tok_idx, cache)  # computed once, read by every block
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        for i, block in enumerate(self.layers):
            h = block(h, *inputs) if cache is None else block(h, *inputs, cache=cache.layer(i))
        if cache is not None:
            cache.len += tokens.shape[1]
        h = self.norm(h)
        if target is None:
            return self.logits(h)
        return self.loss(h, next_token(target))

    def check_length(self, tokens: torch.Tensor, cache) -> None:
        if cache is None and tokens.shape[1] > self.args.max_seqlen:
            raise LinguaError(f"sequence length {tokens.shape[1]} exceeds model.max_seqlen={self.args.max_seqlen}")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection of final-normed hidden states, soft-capped when model.logit_softcap is set."""
        logits = self.output(h)
        cap = self.args.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def loss(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the output projection of final-normed h (bs, seqlen, dim) against target (bs,
        seqlen): the fused chunked form when training, through the logits otherwise (and under tensor parallelism,
        whose vocab-sharded output projection computes the loss on sharded logits)."""
        weight = self.output.weight
        if self.args.fused_loss and torch.is_grad_enabled() and not hasattr(weight, "device_mesh"):
            return linear_cross_entropy(h, weight, target, softcap=self.args.logit_softcap)
        return cross_entropy(self.logits(h), target)

    # ------------------------------------------------------------ what an architecture supplies

    def make_block(self, layer_id: int) -> nn.Module:
        return self.block_cls(self.args)

    def block_inputs(self, tokens: torch.Tensor, tok_idx: Optional[torch.Tensor], cache) -> tuple:
        """What every block gets after the hidden state; default: the positions inside documents (bs, seqlen)."""
        return (tok_idx,)

    def make_cache(self, bs: int, max_len: int, pad=None, device=None, dtype=torch.float32):
        """The inference state lingua.eval.generate decodes with (a KV cache, recurrent states): an object with
        `layer(i)` (what block i reads and updates) and `len` (slots filled; the forward advances it)."""
        raise LinguaError(f"{type(self).__name__} has no inference cache: it cannot generate")

    def init_buffers(self) -> None:
        """Recompute derived buffers (a meta-device build leaves them empty), e.g. RoPE tables."""

    def init_block(self, depth: int, block: nn.Module) -> None:
        block.init_weights(self.args.init_base_std, self.residual_factor(depth, self.args.n_layers))

    def residual_factor(self, depth: int, n_layers: int) -> float:
        """What block `depth` divides its residual output projections' std by (model.init_std_factor; zero:
        infinity, a zero init)."""
        return depth_factor(self.args.init_std_factor, depth, n_layers, self.args.dim)

    # ------------------------------------------------------------ init

    def tie_weights(self) -> None:
        if self.args.weight_tying:  # one matrix reads tokens in and writes them out; to_empty unties, so re-tie
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in place after `to_empty`, from the global RNG (the train loop
        seeds it with TrainArgs.seed), sharding-independently (lingua.models.init). Truncated normals at +-3 std of
        init_base_std (default dim ** -0.5); draw order: embeddings, blocks in order, final norm, output."""
        self.tie_weights()
        self.init_buffers()
        std = self.args.init_base_std or self.args.dim**-0.5
        trunc_normal_(self.tok_embeddings.weight, std)
        for depth, block in enumerate(self.layers):
            self.init_block(depth, block)
        self.norm.reset_parameters()
        if not self.args.weight_tying:
            trunc_normal_(self.output.weight, std)

    def reset_parameters(self) -> None:
        self.init_weights()


def next_token(target: torch.Tensor) -> torch.Tensor:
    """The next-token target (bs, seqlen) of a batch's target: with data.n_views > 2 it is (bs, seqlen, n_views - 1),
    view 0 being the next token."""
    return target[..., 0] if target.dim() == 3 else target


def materialize(model: nn.Module, device, seed: Optional[int] = None) -> nn.Module:
    """Allocate a meta-device (possibly parallelized) model on `device`. With a seed: a random init from that seed
    (the global RNG is reseeded). Without: buffers and tied weights only, for a model whose weights are loaded next."""
    model.to_empty(device=device)
    with torch.no_grad():
        if seed is None:
            model.tie_weights()
            model.init_buffers()
        else:
            torch.manual_seed(seed)
            model.init_weights()
    return model


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Parameters, each counted once (a tied output projection is the embedding table). exclude_embedding drops the
    token embedding table, and with it a tied output projection."""
    n = sum(p.numel() for p in model.parameters())
    return n - model.tok_embeddings.weight.numel() if exclude_embedding else n


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token embedding and the output projection (tied or not), each counted once: the size
    architectures are compared at (benchmarks/arch_compare.py)."""
    seen = {id(p): p.numel() for name, p in model.named_parameters()
            if not name.startswith(("tok_embeddings.", "output."))}
    return sum(seen.values())
