"""Which arithmetic a run computes in (the `precision` config key: auto | fp32 | bf16; docs/training.md).

bf16 autocast pays only where the hardware computes bf16 natively. Measured on this project's machines (one SAC
update, `benchmarks/sac_update.py --threads 1`): ~2.3x faster than fp32 on an AMD EPYC with avx512_bf16, ~6x for a
large matmul with AMX, and 16x *slower* (3.9 s against 0.25 s) on an AMD EPYC with AVX2 only, where every bf16
product is emulated. `auto` is therefore bf16 on a CUDA device that supports it and on a CPU whose flags list
`avx512_bf16` or `amx_bf16`, fp32 everywhere else (MPS included).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["AUTO", "PRECISIONS", "cpu_bf16_flags", "choose_precision"]

AUTO = "auto"
PRECISIONS = (AUTO, "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags of this CPU (`NATIVE_BF16_FLAGS` found in /proc/cpuinfo; none off Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def choose_precision(setting: str, device: str) -> tuple[str, str]:
    """(`fp32` or `bf16`, why) for the `precision` setting on `device`."""
    if setting != AUTO:
        return setting, f"precision={setting}"
    kind = torch.device(device).type
    if kind == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ("bf16", "auto: CUDA with bf16") if native else ("fp32", "auto: this CUDA device has no bf16")
    if kind == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return "bf16", f"auto: CPU computes bf16 natively ({', '.join(flags)})"
        return "fp32", "auto: this CPU has no native bf16 (no avx512_bf16 / amx_bf16), where bf16 is emulated and slow"
    return "fp32", f"auto: fp32 on {kind}"
