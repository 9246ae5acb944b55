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
                 n_experts=0, num_experts_per_tok=2, moe_intermediate_size=None, n_shared_experts=0, gate="softmax", route_norm=True,
                 **kwargs):
        if mlp not in ("swiglu", "relu2"):
            raise ValueError(f"mlp={mlp!r} is not one of swiglu, relu2")
        if gate not in ("softmax", "sigmoid"):
            raise ValueError(f"gate={gate!r} is not one of softmax, sigmoid")
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
        # mixture of experts (apps/moe) when n_experts > 0: SwiGLU experts moe_intermediate_size wide, the
        # num_experts_per_tok (not `top_k`, which generate would read as a sampling setting) chosen by softmax or
        # sigmoid scores plus a per-expert selection bias that never weights; n_shared_experts always-on ones as one
        # SwiGLU n_shared_experts times as wide; route_norm: the chosen gates sum to 1
        self.n_experts, self.num_experts_per_tok = n_experts, num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.n_shared_experts, self.gate, self.route_norm = n_shared_experts, gate, route_norm
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class LinguaMoEConfig(LinguaConfig):
    """The same class for apps/moe's models (n_experts > 0), under its own model_type so lingua reads it back as one."""

    model_type = "lingua_moe"

    def __init__(self, **kwargs):  # its own __init__: transformers 5 would otherwise make the class a dataclass
        super().__init__(**kwargs)


class LinguaRNNConfig(PretrainedConfig):
    """apps/fastRNN's recurrent models (minGRU, minLSTM, Hawk): pre-norm blocks of a recurrent mixer and a SwiGLU."""

    model_type = "lingua_rnn"

    def __init__(self, vocab_size=32000, hidden_size=512, num_hidden_layers=8, intermediate_size=1536, cell="mingru",
                 lru_dim=512, num_heads=1, conv_size=4, rms_norm_eps=1e-5, max_position_embeddings=1024,
                 initializer_range=0.02, tie_word_embeddings=False, use_cache=False, logit_softcap=None, **kwargs):
        if cell not in ("mingru", "minlstm", "hawk"):
            raise ValueError(f"cell={cell!r} is not one of mingru, minlstm, hawk")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.intermediate_size, self.cell, self.lru_dim = intermediate_size, cell, lru_dim
        self.num_heads, self.conv_size, self.rms_norm_eps = num_heads, conv_size, rms_norm_eps
        self.max_position_embeddings, self.initializer_range = max_position_embeddings, initializer_range
        self.logit_softcap = logit_softcap  # logits = c * tanh(logits / c); None: off
        # no inference state in transformers' cache: generate re-runs the sequence (exact, quadratic)
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
