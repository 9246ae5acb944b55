"""The MoE's model args and their checks, apart from the model so that the model (apps/moe/model.py) and its Hugging
Face mapping (apps/moe/hf_mixtral.py) both read them without importing each other."""

from dataclasses import dataclass
from typing import Optional

from lingua.errors import ConfigError
from lingua.models.decoder import check_choice, check_positive
from lingua.models.transformer.model import TransformerArgs

GATES = ("softmax", "sigmoid")
GROUPED_MM = ("auto", "true", "false")


@dataclass
class MoEArgs(TransformerArgs):
    n_experts: int = 8  # routed experts per layer
    top_k: int = 2  # experts each token is routed to
    moe_hidden_dim: Optional[int] = None  # each expert's SwiGLU width; None: the dense FFN width / top_k
    n_shared_experts: int = 0  # always-on experts (DeepSeekMoE), one SwiGLU n_shared_experts * moe_hidden_dim wide
    gate: str = "softmax"  # softmax | sigmoid (DeepSeek-V3) of the router logits
    route_norm: bool = True  # the top_k gates of a token sum to 1 (Mixtral, DeepSeek-V3)
    aux_loss_coef: float = 0.01  # Switch Transformer load-balancing loss; 0: off
    z_loss_coef: float = 0.001  # router z-loss, mean logsumexp(logits)^2 (ST-MoE); 0: off
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing step (DeepSeek-V3 uses 0.001); 0: off
    grouped_mm: str = "auto"  # auto | true | false: torch._grouped_mm, or a loop of matmuls over the experts

    def __post_init__(self):
        super().__post_init__()
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"model.top_k={self.top_k} must be in 1..model.n_experts={self.n_experts}")
        for key in ("n_shared_experts", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0 (got {getattr(self, key)})")
        check_positive(self, "moe_hidden_dim")
        check_choice(self, "gate", GATES)
        if str(self.grouped_mm).lower() not in GROUPED_MM:  # YAML's true arrives as "True"
            raise ConfigError(f"model.grouped_mm={self.grouped_mm!r} is not one of {', '.join(GROUPED_MM)}")
        if self.mlp != "swiglu":
            raise ConfigError(f"model.mlp={self.mlp!r}: the MoE's experts are SwiGLU (model.mlp=swiglu)")

    @property
    def expert_dim(self) -> int:
        """Each expert's SwiGLU width: model.moe_hidden_dim, or the dense feed-forward width / top_k."""
        return self.moe_hidden_dim or max(1, self.ffn_dim // self.top_k)
