"""lingua's Transformer with model.mlp=relu2 as transformers' `ArceeForCausalLM`: Llama whose MLP is
down_proj(relu(up_proj x)²) (`hidden_act: relu2`), our ReLU2FeedForward with w1 = up_proj, w2 = down_proj. It has
no QK-norm and no logit soft-cap."""

from lingua.models.transformer.hf import native_mapping

ARCEE = native_mapping("ArceeForCausalLM", "arcee", mlp="relu2", qk_norm=False)
