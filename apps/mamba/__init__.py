"""Mamba-2 (SSD) language model on the shared train loop: model.py, ssd.py (the scan), train/eval/generate apps."""
