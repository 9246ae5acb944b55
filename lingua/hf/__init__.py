"""Hugging Face interop: export/import of transformers directories (io.py); each model package has its own mapping."""
