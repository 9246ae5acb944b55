"""Multi-token prediction (Gloeckle et al. 2024) on the shared train loop: model.py, train.py, eval.py, generate.py,
speculative.py (self-speculative greedy decoding with the extra heads)."""
