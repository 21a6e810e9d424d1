"""The hyperspherical LoRA projection (DESIGN §3, paper Eqs. 11-13) as pure functions on tensors.

For every row i find the positive `c_i` with `||w0_i + c_i dw_i|| = 1`, where `dw = s B A`; the layer then sets
`B_i <- c_i B_i` (`fasttd3_lora.lora.SphericalLoRALinear`). `positive_root` is Eq. 13. The fused kernel
(`fasttd3_lora.kernels`) computes the same arithmetic; its torch path is built from these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fasttd3_lora.adapters import lora_delta

__all__ = ["ROOT_EPS", "positive_root", "projection_factors", "hyperspherical_lora_weight"]

# Denominator guard of the root: only reached when dW_i is (numerically) zero, where no finite root exists.
ROOT_EPS = 1e-30


def positive_root(a: Tensor, b: Tensor, g: Tensor, eps: float = ROOT_EPS) -> Tensor:
    """The positive root c of `a c^2 + 2 b c - g = 0` (Eq. 13), elementwise, in float32.

    `a = ||dw||^2`, `b = <w0, dw>`, `g = 1 - ||w0||^2 > 0`; the roots have product `-g/a < 0`, so exactly one
    is positive: `c = (-b + sqrt(D)) / a = g / (b + sqrt(D))` with `D = b^2 + a g` (clamped at 0).
    The rationalised form `g / (b + sqrt(D))` is cancellation-free for `b >= 0`, but for `b < 0` it subtracts
    two nearly equal numbers when `g` is small (dw anti-parallel to a base row of norm near 1: measured in fp32,
    `||w0 + c dw||^2 - 1` reached 1e-4 at ||w0||^2 = 0.999 and 7e-3 at 0.9999), so that branch uses the equal
    `(sqrt(D) - b) / a`, which only adds (error stays ~2e-7).
    """
    a, b, g = a.float(), b.float(), g.float()
    sqrt_d = torch.sqrt(torch.clamp(b * b + a * g, min=0.0))
    nonneg = b >= 0
    numerator = torch.where(nonneg, g, sqrt_d - b)
    denominator = torch.where(nonneg, b + sqrt_d, a)
    return numerator / denominator.clamp_min(eps)


def projection_factors(base: Tensor, delta: Tensor) -> Tensor:
    """Per-row factors c_i > 0 with `||w0_i + c_i dw_i|| = 1` (Eqs. 11-13), shape `base.shape[:-1]`, fp32."""
    base, delta = base.float(), delta.float()
    with torch.autocast(base.device.type, enabled=False):  # the row dots are matmuls: keep them out of bf16
        return positive_root(_row_dot(delta, delta), _row_dot(base, delta), 1.0 - _row_dot(base, base))


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    """`(x * y).sum(-1)` as a batched matrix-vector product: no (out, in) temporary, which on a CPU costs more
    (fresh pages) than the arithmetic."""
    return torch.einsum("...i,...i->...", x, y)


def hyperspherical_lora_weight(
    base: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, project: bool = True
) -> tuple[Tensor, Tensor]:
    """Reference of the projection: `(W_eff, c)` with `W_eff = W0 + diag(c) s B A` (fp32); mutates nothing.

    With `project=False` (LoRA-NoWN) `c` is all ones. `project_()` applies `B <- diag(c) B`, after which
    `W0 + s B A` equals the returned `W_eff`.
    """
    with torch.autocast(base.device.type, enabled=False):  # fp32 even if called inside a bf16 region
        delta = lora_delta(lora_A.float(), lora_B.float(), scale)
    if project:
        c = projection_factors(base, delta)
    else:
        c = torch.ones(delta.shape[:-1], dtype=torch.float32, device=delta.device)
    return base.float() + c.unsqueeze(-1) * delta, c
