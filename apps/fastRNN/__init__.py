"""minGRU, minLSTM and Hawk language models trained by lingua's shared loop (see model.py and scan.py)."""
