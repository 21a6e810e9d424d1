"""Fused kernels for the hyperspherical LoRA weight (Triton on CUDA, a torch reference elsewhere).

`lora_weight(base, lora_A, lora_B, scale, *, project=True, backend="auto") -> (W_eff, c)` is the public
entry point (see `ops.py`); `cached_lora_weight` makes a previously computed W_eff differentiable in A and B.
"""

from fasttd3_lora.kernels.ops import BACKENDS, cached_lora_weight, lora_weight, lora_weight_backward

__all__ = ["BACKENDS", "cached_lora_weight", "lora_weight", "lora_weight_backward"]
