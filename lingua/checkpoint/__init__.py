"""Checkpoints: DCP save/load/keep-N/async (manager.py), sha256 integrity (integrity.py), one run per dump_dir
(lock.py). `python -m lingua.checkpoint consolidate <ckpt> <out>` writes one plain file."""
