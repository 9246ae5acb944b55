"""The configuration of lingua's Transformer in transformers (model_type `lingua`). This file is copied into every
export whose model no native transformers class computes exactly; it needs transformers only. Its source is
lingua/hf/remote/ in lingua, whose lingua/models/transformer/hf_lingua.py writes these fields from a checkpoint."""

from transformers import PretrainedConfig


class LinguaConfig(PretrainedConfig):
    model_type = "lingua"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=None, head_dim=None, mlp="swiglu", qk_norm=False,
                 logit_softcap=None, attention_scale=None, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=1024, initializer_range=0.02, use_cache=True, tie_word_embeddings=False,
                 **kwargs):
        if mlp not in ("swiglu", "relu2"):
            raise ValueError(f"mlp={mlp!r} is not one of swiglu, relu2")
        kwargs.pop("rope_parameters", None)  # rope_theta alone says it: lingua has no RoPE scaling
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.mlp = mlp  # swiglu: down(silu(gate x) * up x); relu2: down(relu(up x)^2)
        self.qk_norm = qk_norm  # RMSNorm of each head's queries and keys (one head_dim weight) before RoPE
        self.logit_softcap = logit_softcap  # logits = c * tanh(logits / c); None: off
        self.attention_scale = attention_scale or self.head_dim**-0.5
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
