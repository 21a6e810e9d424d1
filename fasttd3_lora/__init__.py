"""fasttd3-lora: FastTD3 and SAC with SimbaV2, Sparse and hyperspherical-LoRA critics."""

__version__ = "0.1.0"
