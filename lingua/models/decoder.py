"""The language-model shell every architecture shares, in reading order: args, then the `Decoder` base that owns the
token embeddings, the stack of blocks, the final norm, the output projection (tied to the embeddings or not), the
sequence-length check, the init loop and the loss.

    tokens -> tok_embeddings -> layers[0] ... layers[n-1] -> norm -> output -> logits (or the loss, given a target)

An architecture subclasses `Decoder` and supplies its block (`make_block`) and what every block receives besides the
hidden state (`block_inputs`: RoPE tables and the mask for the transformer, document positions for the recurrent
models); generation also needs `make_cache`. Plain PyTorch, no ranks or meshes: parallelism is applied from outside,
block by block over `model.layers` (lingua/distributed/parallelize.py). Build on the meta device, then `materialize`.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from lingua.errors import ConfigError, LinguaError
from lingua.kernels.loss import cross_entropy, linear_cross_entropy
from lingua.models.init import INIT_STD_FACTORS, depth_factor, trunc_normal_
from lingua.models.layers import RMSNorm


@dataclass
class DecoderArgs:
    dim: int = 512
    n_layers: int = 8
    vocab_size: int = -1  # -1: the tokenizer's (the train loop fills it in)
    norm_eps: float = 1e-5
    init_base_std: Optional[float] = None  # None: dim ** -0.5
    init_std_factor: str = "disabled"  # residual output projections' std / : disabled | current_depth | global_depth | dim_ratio
    max_seqlen: int = 1024  # the longest sequence training, evaluation and generation may feed the model
    weight_tying: bool = False  # the output projection is the embedding table
    fused_loss: bool = True  # training loss in chunks with its gradient, never the whole logits (lingua.kernels.loss)
    logit_softcap: Optional[float] = None  # logits = c * tanh(logits / c) (Gemma 2, modded-nanogpt); null: off
    zero_init_proj: bool = False  # residual output projections start at zero: every block starts as the identity


def check_decoder_args(args: DecoderArgs) -> None:
    for key in ("dim", "n_layers", "max_seqlen"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"model.{key} must be > 0 (got {getattr(args, key)})")
    if args.norm_eps <= 0:
        raise ConfigError(f"model.norm_eps must be > 0 (got {args.norm_eps})")
    if args.init_base_std is not None and args.init_base_std <= 0:
        raise ConfigError(f"model.init_base_std must be > 0 or null (got {args.init_base_std})")
    if args.init_std_factor not in INIT_STD_FACTORS:
        raise ConfigError(f"model.init_std_factor={args.init_std_factor!r} is not one of {', '.join(INIT_STD_FACTORS)}")
    if args.logit_softcap is not None and args.logit_softcap <= 0:
        raise ConfigError(f"model.logit_softcap must be > 0 or null (got {args.logit_softcap})")


class Decoder(nn.Module):
    """Subclasses supply their block (`block_cls`, or `make_block(layer_id)`), and where they need them `check_args`,
    `block_inputs`, `init_buffers`, `init_block` and `make_cache`. Every block is called as `block(h, *block_inputs)`
    in training and evaluation, and `block(h, *block_inputs, cache=cache.layer(i))` when decoding with an inference
    cache."""

    block_cls: Optional[type] = None  # built from the model args, once per layer
    check_args: Optional[Callable] = None  # staticmethod(args -> None): the architecture's own validation

    def __init__(self, args: DecoderArgs, n_blocks: Optional[int] = None):
        super().__init__()
        check_decoder_args(args)
        if self.check_args is not None:
            self.check_args(args)
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

    # ------------------------------------------------------------ what an architecture supplies

    def make_block(self, layer_id: int) -> nn.Module:
        return self.block_cls(self.args)

    def block_inputs(self, tokens: torch.Tensor, tok_idx: Optional[torch.Tensor], cache) -> tuple:
        """What every block gets after the hidden state; default: the positions inside documents (bs, seqlen)."""
        return (tok_idx,)

    def make_cache(self, bs: int, max_len: int, pad=None, device=None, dtype=torch.float32):
        """The inference state lingua.eval.generate decodes with (a KV cache, recurrent states): an object with
        `layer(i)` (what block i reads and updates) and `len` (slots filled; this class advances it)."""
        raise LinguaError(f"{type(self).__name__} has no inference cache: it cannot generate")

    def extra_loss(self, inputs: tuple) -> Optional[torch.Tensor]:
        """What training adds to the cross-entropy once the blocks have run on `inputs` (MoE: the aux losses)."""
        return None

    def init_buffers(self) -> None:
        """Recompute derived buffers (a meta-device build leaves them empty), e.g. RoPE tables."""

    def init_block(self, depth: int, block: nn.Module) -> None:
        block.init_weights(self.args.init_base_std, self.residual_factor(depth, self.args.n_layers))

    def residual_factor(self, depth: int, n_layers: int) -> float:
        """What block `depth` divides its residual output projections' std by: model.init_std_factor's depth factor,
        or infinity (a zero init) with model.zero_init_proj."""
        a = self.args
        return math.inf if a.zero_init_proj else depth_factor(a.init_std_factor, depth, n_layers, a.dim)

    # ------------------------------------------------------------ the shared forward

    def forward(self, tokens: torch.Tensor, target: Optional[torch.Tensor] = None,
                tok_idx: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        """tokens, tok_idx: int64 (bs, seqlen); tok_idx is each token's position inside its document (packed
        documents). Returns logits (bs, seqlen, vocab_size), or the mean loss when a target is given: (bs, seqlen), or
        (bs, seqlen, n_views - 1) of which view 0 (the next token) is scored.

        With a `cache` (inference): tokens are the next `seqlen` tokens of every row; the cache advances."""
        h = self.hidden(tokens, tok_idx, cache)
        if target is None:
            return self.logits(h)
        return self.loss(h, target)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection of final-normed hidden states, soft-capped when model.logit_softcap is set."""
        logits = self.output(h)
        cap = self.args.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def hidden(self, tokens: torch.Tensor, tok_idx: Optional[torch.Tensor] = None, cache=None,
               layers: Optional[range] = None) -> torch.Tensor:
        """Embeddings through the blocks in `layers` (default: all), then the final norm: (bs, seqlen, dim)."""
        return self.norm(self.run_blocks(self.tok_embeddings(tokens), self.prepare(tokens, tok_idx, cache), cache,
                                         layers))

    def prepare(self, tokens: torch.Tensor, tok_idx: Optional[torch.Tensor], cache) -> tuple:
        """The sequence-length check, then `block_inputs`: called once per forward, shared by every block."""
        if cache is None and tokens.shape[1] > self.args.max_seqlen:
            raise LinguaError(f"sequence length {tokens.shape[1]} exceeds model.max_seqlen={self.args.max_seqlen}")
        return self.block_inputs(tokens, tok_idx, cache)

    def run_blocks(self, h: torch.Tensor, inputs: tuple, cache=None, layers: Optional[range] = None) -> torch.Tensor:
        """h (bs, seqlen, dim) through blocks `layers` (default: all); with a cache, each block reads its own slot,
        and the cache advances by seqlen once the last block of the model has run."""
        layers = range(len(self.layers)) if layers is None else layers
        for i in layers:
            h = self.layers[i](h, *inputs) if cache is None else self.layers[i](h, *inputs, cache=cache.layer(i))
        if cache is not None and layers.stop == len(self.layers):
            cache.len += h.shape[1]
        return h

    def loss(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the final-normed hidden states h (bs, seqlen, dim)."""
        if target.dim() == 3:  # data.n_views > 2: view 0 is the next token
            target = target[..., 0]
        return self.lm_loss(h, target)

    def lm_loss(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the output projection of h (bs, seqlen, dim) against target (bs, seqlen): the fused
        chunked form when training, through the logits otherwise (and under tensor parallelism, whose vocab-sharded
        output projection computes the loss on sharded logits)."""
        weight = self.output.weight
        if self.args.fused_loss and torch.is_grad_enabled() and not hasattr(weight, "device_mesh"):
            return linear_cross_entropy(h, weight, target, softcap=self.args.logit_softcap)
        return cross_entropy(self.logits(h), target)

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
