"""`lora_weight`: the hyperspherical-LoRA weight (DESIGN §3, Eqs. 11-13) as torch custom ops.

Two ops share one implementation, which runs the fused Triton kernel (`triton_lora.py`) or the pure-torch
reference of `fasttd3_lora.lora` (the CPU path and the tests' oracle):

* `fasttd3_lora::lora_weight_refresh_(base, lora_A, lora_B!, w_eff!, scale, project, backend) -> c` refreshes
  a layer after an optimiser step: with `project` it scales the rows of `lora_B` by `c` in place, and it
  writes `W_eff = W0 + diag(c) s B A` into `w_eff` from the one product `s B A` of the B it was given (equal
  to `W0 + s B_new A` up to rounding; a layer keeps this W_eff as state, see `fasttd3_lora.lora.SphericalLoRALinear`). Both mutations
  are declared. It is a parameter update, so it has no autograd formula of its own.
* `fasttd3_lora::lora_weight_dense(base, lora_A, lora_B, scale, backend) -> W_eff = W0 + s B A` is the
  differentiable forward use of the weight (gradients to A and B only, `lora_weight_backward`).

Both are `torch.library.triton_op`s: their Python body is their fake (meta) implementation too, and under
`torch.compile` Inductor sees through them (the Triton kernel, or the reference's torch ops), so a compiled
critic has no graph break.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor
from torch.library import triton_op

from fasttd3_lora.adapters import lora_delta
from fasttd3_lora.lora_projection import ROOT_EPS, projection_factors

__all__ = ["BACKENDS", "lora_weight", "cached_lora_weight", "lora_weight_backward"]

BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.bfloat16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def lora_weight_backward(grad_w: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of `W = W0 + s B A` (Eq. 11's ΔW = s B A): `dA = s Bᵀ dW`, `dB = s dW Aᵀ` (batched)."""
    return scale * (lora_B.mT @ grad_w), scale * (grad_w @ lora_A.mT)


def _compute(base: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, project: bool, backend: str,
             w_eff: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Shared body of both ops: `(W_eff in base.dtype, c in fp32)`; scales `lora_B` in place iff `project`;
    writes W_eff into `w_eff` when given (no allocation: on this project's VM a fresh (out, in) buffer per step
    cost more page faults than the arithmetic). One product ΔW = s B A (with B as given) serves the root and
    the weight, `W_eff = W0 + diag(c) ΔW` (DESIGN §3; c = 1 without projection), accumulated in fp32 and
    rounded once to base.dtype: the arithmetic of the reference `hyperspherical_lora_weight` and of the
    Triton kernel's pass 2."""
    c = base.new_ones(base.shape[:-1], dtype=torch.float32)
    if backend == "triton":
        from fasttd3_lora.kernels import triton_lora  # lazy: importing triton costs ~1 s and is optional

        w_eff = torch.empty_like(base) if w_eff is None else w_eff
        triton_lora.launch(base, lora_A, lora_B, w_eff, c, scale, ROOT_EPS, project)
        return w_eff, c
    # fp32 accumulation whatever the autocast state (a bf16 region would round ΔW to bf16); float64 inputs stay
    # float64 so gradcheck sees exact arithmetic.
    work = torch.promote_types(base.dtype, torch.float32)
    in_place = w_eff is not None and w_eff.dtype == work
    with torch.autocast(base.device.type, enabled=False):
        delta = lora_delta(lora_A.to(work), lora_B.to(work), scale, out=w_eff if in_place else None)
        if project:
            c = projection_factors(base, delta)  # Eq. 13's root, fp32
            lora_B.mul_(c.unsqueeze(-1))
            delta.mul_(c.unsqueeze(-1))
        delta.add_(base)
    if w_eff is None:
        return delta.to(base.dtype), c
    if not in_place:
        w_eff.copy_(delta)
    return w_eff, c


@triton_op("fasttd3_lora::lora_weight_refresh_", mutates_args={"lora_B", "w_eff"})
def _refresh_op(base: Tensor, lora_A: Tensor, lora_B: Tensor, w_eff: Tensor, scale: float, project: bool,
                backend: str) -> Tensor:  # fmt: skip
    return _compute(base, lora_A, lora_B, scale, project, backend, w_eff)[1]


@triton_op("fasttd3_lora::lora_weight_dense", mutates_args=())
def _dense_op(base: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, backend: str) -> Tensor:
    return _compute(base, lora_A, lora_B, scale, False, backend)[0]


def _dense_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's signature)
    _, lora_A, lora_B, scale, _ = inputs
    ctx.save_for_backward(lora_A, lora_B)
    ctx.scale = scale


def _dense_backward(ctx, grad_w: Tensor):  # noqa: ANN001
    lora_A, lora_B = ctx.saved_tensors
    grad_A, grad_B = lora_weight_backward(grad_w, lora_A, lora_B, ctx.scale)
    return None, grad_A, grad_B, None, None


_dense_op.register_autograd(_dense_backward, setup_context=_dense_setup_context)


class _CachedWeight(torch.autograd.Function):
    """Identity on an already computed `W_eff = W0 + s B A`, with that expression's gradients to A and B."""

    @staticmethod
    def forward(ctx, w_eff: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(lora_A, lora_B)
        ctx.scale = scale
        return w_eff

    @staticmethod
    def backward(ctx, grad_w: Tensor):  # noqa: ANN001
        lora_A, lora_B = ctx.saved_tensors
        grad_A, grad_B = lora_weight_backward(grad_w, lora_A, lora_B, ctx.scale)
        return None, grad_A, grad_B, None


def cached_lora_weight(w_eff: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """`w_eff` (a dense `W0 + s B A` computed earlier, e.g. by `lora_weight`) as a differentiable function of
    the current `lora_A`, `lora_B`. The caller guarantees it is up to date; autograd's saved-tensor version
    check fails the backward if A or B change in place between this call and the backward."""
    return _CachedWeight.apply(w_eff, lora_A, lora_B, scale)


def _resolve_backend(backend: str, base: Tensor) -> str:
    """"auto" -> "triton" or "torch" for these tensors; checks that a forced "triton" can run."""
    dtype = base.dtype
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if base.is_cuda and _HAS_TRITON and dtype in _TRITON_DTYPES else "torch"
    if backend == "triton":
        if not _HAS_TRITON:
            raise ImportError("backend='triton' needs the triton package: pip install 'fasttd3-lora[triton]'")
        if not base.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1, got device {base.device}")
        if dtype not in _TRITON_DTYPES:
            raise ValueError(f"backend='triton' supports dtypes {_TRITON_DTYPES}, got {dtype}")
    return backend


def _check_inputs(base: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
    if base.dim() not in (2, 3):
        raise ValueError(f"base must be (out, in) or (E, out, in), got shape {tuple(base.shape)}")
    lead, (out_f, in_f) = base.shape[:-2], base.shape[-2:]
    rank = lora_A.shape[-2] if lora_A.dim() == base.dim() else -1
    if lora_A.shape != (*lead, rank, in_f) or lora_B.shape != (*lead, out_f, rank):
        raise ValueError(
            f"expected lora_A (..., r, {in_f}) and lora_B (..., {out_f}, r) with the leading dims of base "
            f"{tuple(base.shape)}, got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    if not (base.dtype == lora_A.dtype == lora_B.dtype and base.dtype.is_floating_point):
        raise ValueError(f"base, lora_A, lora_B must share one float dtype, got {base.dtype}, {lora_A.dtype}, {lora_B.dtype}")
    if not (base.device == lora_A.device == lora_B.device):
        raise ValueError(f"base, lora_A, lora_B must be on one device, got {base.device}, {lora_A.device}, {lora_B.device}")
    if base.requires_grad:
        raise ValueError("base requires grad, but W0 is frozen: gradients reach only lora_A and lora_B")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")


def lora_weight(
    base: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    *,
    project: bool = True,
    backend: str = "auto",
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`(W_eff, c)` for one LoRA layer or a stacked ensemble (DESIGN §3, Eqs. 11-13).

    `base` (out, in) or (E, out, in), `lora_A` (..., r, in), `lora_B` (..., out, r), one dtype (float32 or
    bfloat16 for Triton; accumulation is float32), `scale = alpha / r`. With `project`, `c` (float32,
    `base.shape[:-1]`) is the positive root of Eq. 13 per row, `lora_B` is scaled by it **in place** and
    `W_eff = W0 + diag(c) s B A` (B as given; equal to `W0 + s B_new A` up to rounding) has unit rows; without
    it, `c` is all ones and nothing is mutated. `out` (like `base`) receives W_eff in place, which is then
    returned.
    `W_eff` has `base`'s dtype and back-propagates to `lora_A`, `lora_B` as `W0 + s B A` with the (new) B.
    `backend`: "auto" (Triton for CUDA tensors, torch elsewhere), "triton" (forced; CPU tensors need
    TRITON_INTERPRET=1) or "torch" (the reference).
    """
    _check_inputs(base, lora_A, lora_B, scale)
    resolved = _resolve_backend(backend, base)
    scale = float(scale)
    if not project and out is None:
        w_eff = _dense_op(base, lora_A, lora_B, scale, resolved)
        return w_eff, torch.ones(base.shape[:-1], dtype=torch.float32, device=base.device)
    if out is not None and (out.shape != base.shape or out.dtype != base.dtype or out.device != base.device):
        raise ValueError(
            f"out must match base ({tuple(base.shape)}, {base.dtype}, {base.device}), "
            f"got ({tuple(out.shape)}, {out.dtype}, {out.device})"
        )
    w_eff = torch.empty_like(base) if out is None else out
    with torch.no_grad():
        c = _refresh_op(base, lora_A.detach(), lora_B.detach(), w_eff, scale, project, resolved)
    if torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad):
        w_eff = cached_lora_weight(w_eff, lora_A, lora_B, scale)
    return w_eff, c
