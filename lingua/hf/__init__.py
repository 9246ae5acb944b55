"""Hugging Face interop: export/import of transformers directories (io.py), which class an export takes
(mapping.py: `HFMapping`, `choose`), and lingua's own remote-code classes copied into exports (remote/, package data).
Each model package has its mappings beside it (lingua/models/transformer/hf_*.py, apps/<app>/hf*.py)."""
