"""SimbaV2 building blocks (DESIGN §1): Scaler, Embedder, LERP residual Block, Head, Encoder.

Every layer takes `ensemble: int | None`; with `E`, matrices are (E, out, in) and per-feature parameters
(E, 1, d), so a shared (N, in) input flows through as (E, N, d). Block matrices come from a factory so the
dense and the LoRA critic share one Block.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttd3_lora.hypersphere import Projected, SphericalLinear, check_ensemble, check_positive_int, l2_normalize

__all__ = [
    "C_SHIFT",
    "EXPANSION",
    "RELU_OFFSET",
    "HEAD_SCALER_INIT",
    "LinearFactory",
    "embedder_scaler_init",
    "block_scaler_init",
    "residual_alpha_init",
    "residual_alpha_scale",
    "Scaler",
    "Embedder",
    "Block",
    "Head",
    "SimbaV2Encoder",
]

# Architecture constants of DESIGN §1 (the d- and L-dependent ones are the functions below).
C_SHIFT = 3.0  # constant appended to the input before the first l2 (keeps the input's norm information)
EXPANSION = 4  # block inverted-bottleneck width: W1 is (4d x d), W2 is (d x 4d)
RELU_OFFSET = 1e-8  # added after the ReLU so an all-dead hidden vector still has a direction
HEAD_SCALER_INIT = 1.0  # head Scaler: init = scale = 1

# A factory for a Projected matrix: factory(in_features, out_features, ensemble=E).
LinearFactory = Callable[..., Projected]


def embedder_scaler_init(hidden_dim: int) -> float:
    """Embedder Scaler init = scale = sqrt(2/d)."""
    return math.sqrt(2.0 / hidden_dim)


def block_scaler_init(hidden_dim: int) -> float:
    """Block Scaler (size 4d) init = scale = sqrt(2/d)/2."""
    return math.sqrt(2.0 / hidden_dim) / 2.0


def residual_alpha_init(num_blocks: int) -> float:
    """LERP alpha init 1/(L+1)."""
    return 1.0 / (num_blocks + 1)


def residual_alpha_scale(hidden_dim: int) -> float:
    """LERP alpha scale 1/sqrt(d)."""
    return 1.0 / math.sqrt(hidden_dim)


def _per_feature_shape(dim: int, ensemble: int | None) -> tuple[int, ...]:
    return (dim,) if ensemble is None else (ensemble, 1, dim)


class Scaler(nn.Module):
    """Learnable per-feature gain: parameter `p` starts at `scale`; forward is `p * (init/scale) * x`.

    The effective gain starts at `init` while the optimiser sees `p` with magnitude `scale`, i.e. the effective
    learning rate is multiplied by `init/scale` (DESIGN §1; not FastTD3's `init*scale` start).
    """

    def __init__(self, dim: int, init: float, scale: float, ensemble: int | None = None) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_ensemble(ensemble)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        if not math.isfinite(init):
            raise ValueError(f"init must be finite, got {init!r}")
        self.init = float(init)
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.full(_per_feature_shape(dim, ensemble), self.scale))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (self.init / self.scale) * x


class Embedder(nn.Module):
    """`x = l2(concat(o, c_shift))`, `h0 = l2(s_h * (W_h x))` (no bias)."""

    def __init__(self, in_dim: int, hidden_dim: int, ensemble: int | None = None) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        self.linear = SphericalLinear(in_dim + 1, hidden_dim, ensemble=ensemble)
        init = embedder_scaler_init(hidden_dim)
        self.scaler = Scaler(hidden_dim, init, init, ensemble)

    def forward(self, x: Tensor) -> Tensor:
        shift = torch.full_like(x[..., :1], C_SHIFT)
        x = l2_normalize(torch.cat([x, shift], dim=-1))
        return l2_normalize(self.scaler(self.linear(x)))


class Block(nn.Module):
    """SimbaV2 LERP residual block (DESIGN §1), no biases:

    u = ReLU(s * (W1 h)) + 1e-8;  h~ = l2(W2 u);  h' = l2(h + alpha * (h~ - h)).
    """

    def __init__(
        self,
        hidden_dim: int,
        num_blocks: int,
        linear: LinearFactory = SphericalLinear,
        ensemble: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("num_blocks", num_blocks)
        wide = EXPANSION * hidden_dim
        self.w1 = linear(hidden_dim, wide, ensemble=ensemble)
        s_init = block_scaler_init(hidden_dim)
        self.scaler = Scaler(wide, s_init, s_init, ensemble)
        self.w2 = linear(wide, hidden_dim, ensemble=ensemble)
        self.alpha = Scaler(hidden_dim, residual_alpha_init(num_blocks), residual_alpha_scale(hidden_dim), ensemble)

    def forward(self, h: Tensor) -> Tensor:
        u = F.relu(self.scaler(self.w1(h))) + RELU_OFFSET
        h_tilde = l2_normalize(self.w2(u))
        return l2_normalize(h + self.alpha(h_tilde - h))


class Head(nn.Module):
    """`Linear(d->d) -> Scaler(init=scale=1) -> Linear(d->out) + bias`; both matrices projected, the bias not."""

    def __init__(self, hidden_dim: int, out_dim: int, ensemble: int | None = None) -> None:
        super().__init__()
        check_positive_int("out_dim", out_dim)
        self.linear1 = SphericalLinear(hidden_dim, hidden_dim, ensemble=ensemble)
        self.scaler = Scaler(hidden_dim, HEAD_SCALER_INIT, HEAD_SCALER_INIT, ensemble)
        self.linear2 = SphericalLinear(hidden_dim, out_dim, ensemble=ensemble)
        self.bias = nn.Parameter(torch.zeros(_per_feature_shape(out_dim, ensemble)))

    def forward(self, h: Tensor) -> Tensor:
        return self.linear2(self.scaler(self.linear1(h))) + self.bias


class SimbaV2Encoder(nn.Module):
    """Embedder followed by `num_blocks` LERP blocks; output rows have unit norm."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        num_blocks: int,
        block_linear: LinearFactory = SphericalLinear,
        ensemble: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_blocks", num_blocks)
        self.embedder = Embedder(in_dim, hidden_dim, ensemble)
        self.blocks = nn.ModuleList(Block(hidden_dim, num_blocks, block_linear, ensemble) for _ in range(num_blocks))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embedder(x)
        for block in self.blocks:
            h = block(h)
        return h
