"""Evaluation: bits per byte (bpb.py), loading any checkpoint (load.py), generation, the lm-eval harness adapter."""
