"""The Llama-style transformer: model.py (the model, top to bottom), parallelize.py (TP -> AC -> compile -> FSDP for
it), hf.py (the LlamaForCausalLM mapping), spec.py (TRANSFORMER_SPEC, what entry points take)."""
