"""Kernels the models call: attention (SDPA, flex, xformers; the compiled-bf16 CPU backward) and the fused loss."""
