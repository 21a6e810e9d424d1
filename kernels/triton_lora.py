"""The fused hyperspherical-LoRA Triton kernel (DESIGN §3, "The fused kernel"; paper Eqs. 11-13).

One launch per layer (or per stacked ensemble of layers): each program owns a block of rows of one ensemble
member and loops over the input columns twice. Pass 1 recomputes the tile ΔW = s·B·A on the fly and
accumulates the per-row a_i = ||Δw_i||², b_i = <w0_i, Δw_i> and ||w0_i||², solves Eq. 13 for c_i and writes
B_i ← c_i·B_i. Pass 2 recomputes the tile from the B it was given and writes W_eff = W0 + diag(c)·ΔW
(DESIGN §3), the torch reference's arithmetic. ΔW never touches memory: recomputing it costs 4·r flop per
element over both passes, against 6 bytes per element of W0/W_eff traffic in bf16, which keeps a bf16 launch
at r = 96 memory-bound on tensor cores (fp32 inputs use exact "ieee" dots on the CUDA cores and may be
compute-bound instead: see docs/kernels.md). Everything accumulates in float32 whatever the input dtype.
This module needs triton; `fasttd3_lora.kernels` imports it lazily.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Row-block × column-block tilings worth trying on Ampere / Hopper. Small BLOCK_M keeps enough programs
# alive for the 512-row critic layers (512 / 16 = 32 row blocks per ensemble member); wide BLOCK_N keeps
# loads coalesced. The interpreter benchmarks every config, so it gets one modest tiling that still
# exercises masked tails in both loops for odd shapes.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (16, 128, 4, 3),
        (16, 256, 4, 3),
        (32, 128, 4, 3),
        (32, 256, 8, 3),
        (64, 64, 4, 3),
        (64, 128, 4, 4),
        (64, 256, 8, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
    ]
]
_INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=1)]
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = _INTERPRET_CONFIGS if _INTERPRET else _GPU_CONFIGS


@triton.jit
def _delta_tile(b_tile, a_tile, scale, UPCAST: tl.constexpr):
    """s · B_blk A_blk in float32. fp32 inputs use "ieee" to keep 1e-5 relative accuracy (tf32 would give
    ~1e-3); bf16 inputs use the tensor cores with fp32 accumulation. UPCAST works around the interpreter's
    bf16 `tl.dot`, which multiplies raw bit patterns (triton-lang/triton#11584); bf16 products are exact
    in fp32, so the result is the same."""
    if UPCAST:
        b_tile = b_tile.to(tl.float32)
        a_tile = a_tile.to(tl.float32)
    return tl.dot(b_tile, a_tile, input_precision="ieee", out_dtype=tl.float32) * scale


# PROJECT is not in the key: the projecting and the plain launch of one shape share one tuning run.
# restore_value: benchmarking runs the kernel several times, and each run scales B in place.
@triton.autotune(configs=_CONFIGS, key=["M", "N", "R_PAD"], restore_value=["b_ptr"])
@triton.jit
def _hyperspherical_lora_kernel(
    w0_ptr, a_ptr, b_ptr, w_ptr, c_ptr,
    M, N, R, scale, eps,
    s_w0_e, s_w0_m, s_w0_n,
    s_a_e, s_a_r, s_a_n,
    s_b_e, s_b_m, s_b_r,
    s_w_e, s_w_m, s_w_n,
    s_c_e,
    PROJECT: tl.constexpr,
    R_PAD: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_e = tl.program_id(1).to(tl.int64)  # ensemble member; int64 so E·out·in offsets cannot overflow
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    rank_ok = ranks < R
    # The B row block stays in registers for both passes (BLOCK_M × R_PAD); padded ranks load as 0, so
    # they add nothing to the products.
    b_ptrs = b_ptr + pid_e * s_b_e + rows[:, None] * s_b_m + ranks[None, :] * s_b_r
    b_mask = row_ok[:, None] & rank_ok[None, :]
    b_tile = tl.load(b_ptrs, mask=b_mask, other=0.0)
    # Tile pointers at column block 0; each loop step advances them by BLOCK_N columns.
    a_ptrs0 = a_ptr + pid_e * s_a_e + ranks[:, None] * s_a_r + offs_n[None, :] * s_a_n
    w0_ptrs0 = w0_ptr + pid_e * s_w0_e + rows[:, None] * s_w0_m + offs_n[None, :] * s_w0_n

    if PROJECT:
        acc_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_w0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        a_ptrs = a_ptrs0
        w0_ptrs = w0_ptrs0
        for n0 in range(0, N, BLOCK_N):
            col_ok = offs_n < N - n0
            a_tile = tl.load(a_ptrs, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            w0 = tl.load(w0_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            delta = _delta_tile(b_tile, a_tile, scale, UPCAST_DOT)
            acc_a += tl.sum(delta * delta, axis=1)
            acc_b += tl.sum(w0 * delta, axis=1)
            acc_w0 += tl.sum(w0 * w0, axis=1)
            a_ptrs += BLOCK_N * s_a_n
            w0_ptrs += BLOCK_N * s_w0_n
        # Eq. 13: positive root of a c² + 2 b c - g = 0, g = 1 - ||w0||², in the cancellation-free form of
        # fasttd3_lora.lora.positive_root (the reference the tests compare against): g / (b + √D) for b ≥ 0,
        # the equal (√D - b) / a for b < 0, so no branch subtracts nearly equal numbers.
        g = 1.0 - acc_w0
        sqrt_d = tl.sqrt(tl.maximum(acc_b * acc_b + acc_a * g, 0.0))
        nonneg = acc_b >= 0.0
        numerator = tl.where(nonneg, g, sqrt_d - acc_b)
        denominator = tl.where(nonneg, acc_b + sqrt_d, acc_a)
        c = numerator / tl.maximum(denominator, eps)
        tl.store(c_ptr + pid_e * s_c_e + rows, c, mask=row_ok)
        tl.store(b_ptrs, (b_tile.to(tl.float32) * c[:, None]).to(b_ptr.dtype.element_ty), mask=b_mask)
    else:
        c = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)

    # Pass 2: W_eff = W0 + diag(c)·ΔW with ΔW from the B the launch was given (b_tile still holds it), the torch
    # reference's arithmetic; c = 1 without projection.
    a_ptrs = a_ptrs0
    w0_ptrs = w0_ptrs0
    w_ptrs = w_ptr + pid_e * s_w_e + rows[:, None] * s_w_m + offs_n[None, :] * s_w_n
    for n0 in range(0, N, BLOCK_N):
        col_ok = offs_n < N - n0
        tile_mask = row_ok[:, None] & col_ok[None, :]
        a_tile = tl.load(a_ptrs, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        w0 = tl.load(w0_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        w_eff = w0 + c[:, None] * _delta_tile(b_tile, a_tile, scale, UPCAST_DOT)
        tl.store(w_ptrs, w_eff.to(w_ptr.dtype.element_ty), mask=tile_mask)
        a_ptrs += BLOCK_N * s_a_n
        w0_ptrs += BLOCK_N * s_w0_n
        w_ptrs += BLOCK_N * s_w_n


def _as_stacked(t: torch.Tensor) -> torch.Tensor:
    """(rows, cols) -> (1, rows, cols) view, so one kernel signature serves plain and stacked layers."""
    return t if t.dim() == 3 else t.unsqueeze(0)


def launch(
    base: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    w_eff: torch.Tensor,
    c: torch.Tensor,
    scale: float,
    eps: float,
    project: bool,
) -> None:
    """Run the kernel: fills `w_eff` (shaped like `base`) and, when `project`, `c` (float32, base.shape[:-1])
    and scales the rows of `lora_B` in place. Shapes are validated by the caller."""
    w0, a, b, w = (_as_stacked(t) for t in (base, lora_A, lora_B, w_eff))
    c2 = c if c.dim() == 2 else c.unsqueeze(0)
    ens, m, n = w0.shape
    r = a.shape[1]
    r_pad = max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), ens)

    wrap_triton(_hyperspherical_lora_kernel)[grid](
        w0, a, b, w, c2,
        m, n, r, float(scale), float(eps),
        w0.stride(0), w0.stride(1), w0.stride(2),
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        w.stride(0), w.stride(1), w.stride(2),
        c2.stride(0),
        PROJECT=project,
        R_PAD=r_pad,
        UPCAST_DOT=_INTERPRET,
    )  # fmt: skip
