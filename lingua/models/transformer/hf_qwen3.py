"""lingua's Transformer with model.qk_norm as transformers' `Qwen3ForCausalLM`: Llama plus an RMSNorm of each head's
queries and keys before RoPE, one head_dim weight shared by the heads, as ours (its weights go through the RoPE
permutation too: hf.py). No sliding window, SwiGLU, no logit soft-cap."""

from lingua.models.transformer.hf import native_mapping


def qwen3_fields(args) -> dict:
    """Every layer attends to every position: no sliding window."""
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": args.n_layers,
            "layer_types": ["full_attention"] * args.n_layers}


QWEN3 = native_mapping("Qwen3ForCausalLM", "qwen3", mlp="swiglu", qk_norm=True, extra_config=qwen3_fields)
