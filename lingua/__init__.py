"""lingua: a minimal, fast, hackable library for pretraining LLMs in PyTorch."""

__version__ = "0.1.0"
