"""Fused kernels for the hyperspherical LoRA weight (Triton on CUDA, a torch reference elsewhere)."""
