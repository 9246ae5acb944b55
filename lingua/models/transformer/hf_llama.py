"""lingua's Transformer as transformers' `LlamaForCausalLM`: SwiGLU, no QK-norm, no logit soft-cap (the names,
RoPE layout and shared config fields are hf.py's)."""

from lingua.models.transformer.hf import native_mapping

LLAMA = native_mapping("LlamaForCausalLM", "llama", mlp="swiglu", qk_norm=False)
