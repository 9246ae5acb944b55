"""The MoE's model args and their checks, apart from the model so that the model (apps/moe/model.py) and its Hugging
Face mapping (apps/moe/hf_mixtral.py) both read them without importing each other."""

from dataclasses import dataclass
from typing import Optional

from lingua.errors import ConfigError
from lingua.models.layers import ffn_hidden_dim
from lingua.models.transformer.model import TransformerArgs, check_args

GATES = ("softmax", "sigmoid")
GROUPED_MM = ("auto", "true", "false")


@dataclass
class MoEArgs(TransformerArgs):
    n_experts: int = 8
    top_k: int = 2
    moe_hidden_dim: Optional[int] = None  # each expert's SwiGLU width; None: the dense FFN width / top_k
    n_shared_experts: int = 0  # always-on experts (DeepSeekMoE), one SwiGLU n_shared_experts * moe_hidden_dim wide
    gate: str = "softmax"  # softmax | sigmoid (DeepSeek-V3) of the router logits
    route_norm: bool = True  # the top_k gates of a token sum to 1 (Mixtral, DeepSeek-V3)
    aux_loss_coef: float = 0.01  # Switch Transformer load-balancing loss; 0: off
    z_loss_coef: float = 0.001  # router z-loss, mean logsumexp(logits)^2 (ST-MoE); 0: off
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing step (DeepSeek-V3 uses 0.001); 0: off
    grouped_mm: str = "auto"  # auto | true | false: torch._grouped_mm, or a loop of matmuls over the experts


def expert_hidden_dim(args: MoEArgs) -> int:
    dense = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier, args.mlp)
    return args.moe_hidden_dim or max(1, dense // args.top_k)


def check_moe_args(args: MoEArgs) -> None:
    check_args(args)
    if args.n_experts < 1 or not 1 <= args.top_k <= args.n_experts:
        raise ConfigError(f"model.top_k={args.top_k} must be in 1..model.n_experts={args.n_experts}")
    for key in ("n_shared_experts", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        if getattr(args, key) < 0:
            raise ConfigError(f"model.{key} must be >= 0 (got {getattr(args, key)})")
    if args.moe_hidden_dim is not None and args.moe_hidden_dim <= 0:
        raise ConfigError(f"model.moe_hidden_dim must be > 0 or null (got {args.moe_hidden_dim})")
    for key, allowed in (("gate", GATES), ("grouped_mm", GROUPED_MM)):
        if str(getattr(args, key)).lower() not in allowed:
            raise ConfigError(f"model.{key}={getattr(args, key)!r} is not one of {', '.join(allowed)}")
    if args.mlp != "swiglu":
        raise ConfigError(f"model.mlp={args.mlp!r}: the MoE's experts are SwiGLU (model.mlp=swiglu)")
