"""On the CPU, what does one hyperspherical-LoRA weight refresh cost: compiled reference vs eager reference vs
the unfused op sequence, and what does writing W_eff in place save? (DESIGN §3 "The fused kernel"; the Triton
kernel itself needs a GPU, see lora_weight_gpu.py.)

One refresh = project B (Eq. 13 root per row, B <- diag(c) B) and produce W_eff = W0 + s B A, for the SAC
critic's block matrices, r = 96, alpha = 96: base (512x2048, 2048x512) and large (1024x4096, 4096x1024).

* unfused: the plain sequence the LoRA layer ran before the op existed (`projection_factors` on
  `lora_delta`, `B.mul_`, then `W0 + lora_delta` again in the next forward), no custom-op dispatch;
* eager reference: `fasttd3_lora.kernels.lora_weight(..., backend="torch")`, the op in eager mode;
* eager in place: the same with `out=` a preallocated W_eff, as `SphericalLoRALinear` refreshes its `w_eff` buffer in
  training (no fresh (out, in) tensor per call: page faults on fresh large allocations are costly on VMs);
* compiled reference: the same call under `torch.compile(fullgraph=True)`; Inductor sees the op's body
  (it is a `triton_op`) and fuses its elementwise work around the two matmuls.

The variants are timed round-robin (one call of each per repetition, the first one rotating), so a change in
the load of a shared machine hits them all alike; the header prints the load average. Prints the median over
repetitions and each variant's speed-up over "unfused".

    .venv/bin/python benchmarks/lora_weight_cpu.py [--reps 15] [--rank 96]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from fasttd3_lora.kernels import lora_weight
from fasttd3_lora.adapters import lora_delta
from fasttd3_lora.lora_projection import projection_factors

SHAPES = {"base": [(512, 2048), (2048, 512)], "large": [(1024, 4096), (4096, 1024)]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(out_f: int, in_f: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(out_f, in_f, generator=g), dim=-1) * 0.5**0.5
    lora_A = torch.randn(rank, in_f, generator=g) / rank**0.5
    lora_B = torch.randn(out_f, rank, generator=g) / rank**0.5
    return base.to(dtype), lora_A.to(dtype), lora_B.to(dtype)


def unfused(base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    c = projection_factors(base, lora_delta(lora_A.float(), lora_B.float(), scale))
    lora_B.mul_(c.unsqueeze(-1))
    return base + lora_delta(lora_A, lora_B, scale)


def median_ms(steps: list[Callable[[], object]], reps: int) -> list[float]:
    """Median wall time of each step, timed round-robin after 3 warm-up rounds (compilation happens there)."""
    for _ in range(3):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for rep in range(reps):
        for k in range(len(steps)):  # rotate who goes first, so no variant always follows the same one
            i = (rep + k) % len(steps)
            t0 = time.perf_counter()
            steps[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--rank", type=int, default=96)
    args = p.parse_args()
    scale = 96.0 / args.rank  # alpha = 96

    def eager(base, lora_A, lora_B, out=None):
        return lora_weight(base, lora_A, lora_B, scale, backend="torch", out=out)

    compiled = torch.compile(eager, fullgraph=True, dynamic=False)

    print(
        f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}, r={args.rank}, median of {args.reps}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| size | W (out x in) | dtype | unfused ms | eager ref ms | eager in place ms | compiled ref ms "
          "| eager / unfused | in place / unfused | compiled / unfused |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size, shapes in SHAPES.items():
        for out_f, in_f in shapes:
            for dname, dtype in DTYPES.items():
                base, lora_A, lora_B = inputs(out_f, in_f, args.rank, dtype)
                w_eff = torch.empty_like(base)
                times = median_ms(
                    [
                        lambda: unfused(base, lora_A, lora_B, scale),
                        lambda: eager(base, lora_A, lora_B),
                        lambda: eager(base, lora_A, lora_B, out=w_eff),
                        lambda: compiled(base, lora_A, lora_B),
                    ],
                    args.reps,
                )
                cells = " | ".join(f"{t:.2f}" for t in times)
                ratios = " | ".join(f"{times[0] / t:.2f}x" for t in times[1:])
                print(f"| {size} | {out_f}x{in_f} | {dname} | {cells} | {ratios} |", flush=True)
    print(f"(ratios are speed-ups over unfused: > 1 is faster; load average at the end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
