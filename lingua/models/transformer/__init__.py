"""The Llama-style transformer: model.py (the model, top to bottom), parallelize.py (TP -> AC -> compile -> FSDP for
it), hf.py + hf_*.py (its Hugging Face classes, one mapping a file), spec.py (TRANSFORMER_SPEC, what entry points take)."""
