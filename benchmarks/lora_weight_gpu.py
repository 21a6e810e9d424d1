"""On a CUDA GPU, how fast is the fused Triton hyperspherical-LoRA kernel against the torch reference, eager
and compiled, and how close does it get to the device's memory bandwidth? (DESIGN §3 "The fused kernel")

One refresh = project B (Eq. 13 root per row, B <- diag(c) B) and write W_eff = W0 + s B A, r = 96, alpha = 96,
for the critic's block matrices: base (512x2048, 2048x512), large (1024x4096, 4096x1024), and the twin-critic
stack (E=2) of the large ones, in bf16 and fp32:

* triton: `lora_weight(..., backend="triton")`, one launch (autotuned: the first call tunes);
* eager ref: `lora_weight(..., backend="torch")`;
* compiled ref: the torch reference under `torch.compile(fullgraph=True)`.

Before timing, each case checks Triton against the reference (max relative error of W_eff and c).
Bandwidth counts the bytes a single pass must move (read W0, A, B; write W_eff, B, c); the kernel reads W0
twice (once per pass), so "% of peak" is a lower bound on its real traffic. Peak = 2 x memory clock x bus
width. Times are `triton.testing.do_bench` medians. Exits with one line when no CUDA device is present.

    python benchmarks/lora_weight_gpu.py [--rank 96]
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = [
    ("base", 1, 512, 2048),
    ("base", 1, 2048, 512),
    ("large", 1, 1024, 4096),
    ("large", 1, 4096, 1024),
    ("large twin", 2, 1024, 4096),
    ("large twin", 2, 4096, 1024),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def peak_bandwidth_gbs(props) -> float:  # noqa: ANN001 (torch's device-properties type)
    """Theoretical DRAM bandwidth: double data rate x memory clock (kHz) x bus width (bits) / 8."""
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9


def main() -> None:
    if not torch.cuda.is_available():
        print("lora_weight_gpu: no CUDA device here, nothing measured (run it on a machine with an NVIDIA GPU)")
        sys.exit(0)
    import triton.testing

    from fasttd3_lora.kernels import lora_weight
    from fasttd3_lora.kernels import triton_lora

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=96)
    args = p.parse_args()
    scale = 96.0 / args.rank
    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth_gbs(props)

    def ref(base, lora_A, lora_B):
        return lora_weight(base, lora_A, lora_B, scale, backend="torch")

    compiled = torch.compile(ref, fullgraph=True, dynamic=False)
    print(f"# {props.name}, peak {peak:.0f} GB/s, torch {torch.__version__}, triton {triton.__version__}, r={args.rank}")
    print(
        "| size | E x out x in | dtype | triton us | eager ref us | compiled ref us | triton GB/s | % of peak "
        "| eager / triton | compiled / triton | max rel err W, c | tiling |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for size, ens, out_f, in_f in SHAPES:
        for dname, dtype in DTYPES.items():
            g = torch.Generator(device="cuda").manual_seed(0)
            lead = (ens,) if ens > 1 else ()
            base = torch.randn(*lead, out_f, in_f, device="cuda", generator=g)
            base = (torch.nn.functional.normalize(base, dim=-1) * 0.5**0.5).to(dtype)
            lora_A = (torch.randn(*lead, args.rank, in_f, device="cuda", generator=g) / args.rank**0.5).to(dtype)
            lora_B = (torch.randn(*lead, out_f, args.rank, device="cuda", generator=g) / args.rank**0.5).to(dtype)

            b_tri, b_ref = lora_B.clone(), lora_B.clone()
            w_tri, c_tri = lora_weight(base, lora_A, b_tri, scale, backend="triton")
            w_ref, c_ref = ref(base, lora_A, b_ref)
            err_w = ((w_tri.float() - w_ref.float()).abs().max() / w_ref.float().abs().max()).item()
            err_c = ((c_tri - c_ref).abs() / c_ref).max().item()

            def triton_call():
                return lora_weight(base, lora_A, lora_B, scale, backend="triton")

            t_tri, t_eager, t_comp = (
                triton.testing.do_bench(fn, return_mode="median") * 1e3
                for fn in (triton_call, lambda: ref(base, lora_A, lora_B), lambda: compiled(base, lora_A, lora_B))
            )
            elt = base.element_size()
            moved = ens * (2 * out_f * in_f * elt + args.rank * in_f * elt + 2 * out_f * args.rank * elt + 4 * out_f)
            gbs = moved / (t_tri * 1e-6) / 1e9
            best = triton_lora._hyperspherical_lora_kernel.best_config
            print(
                f"| {size} | {ens}x{out_f}x{in_f} | {dname} | {t_tri:.1f} | {t_eager:.1f} | {t_comp:.1f} | {gbs:.0f} "
                f"| {100 * gbs / peak:.0f}% | {t_eager / t_tri:.2f}x | {t_comp / t_tri:.2f}x | {err_w:.1e}, {err_c:.1e} "
                f"| {best.kwargs} w{best.num_warps} s{best.num_stages} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
