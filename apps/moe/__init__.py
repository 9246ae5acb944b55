"""Mixture-of-experts decoder on the shared train loop: model.py (routed SwiGLU experts, MOE_SPEC), args.py (MoEArgs),
parallelize.py (expert parallelism) and dispatch.py (all-to-all), hf_mixtral.py and hf_lingua_moe.py (Hugging Face
export: MixtralForCausalLM where exact, else lingua's remote code), train.py. Eval and generation use apps/main's
entry points."""
