"""Mixture-of-experts decoder (routed SwiGLU experts, expert parallelism) on the shared train loop: model.py,
parallel.py, train.py. Eval, generation and export use apps/main's entry points."""
