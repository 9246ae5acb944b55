"""Mixture-of-experts decoder on the shared train loop: model.py (routed SwiGLU experts, MOE_SPEC), parallel.py
(expert parallelism), hf_mixtral.py (export as MixtralForCausalLM), train.py. Eval and generation use apps/main's
entry points."""
