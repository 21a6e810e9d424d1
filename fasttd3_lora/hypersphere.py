"""Hyperspherical weights: row normalisation, the `Projected` contract and the dense `SphericalLinear` (DESIGN §1).

Every module that owns a weight whose rows live on the unit sphere subclasses `Projected`; `project_(net)` finds
them with an `isinstance` walk and must be called after every optimiser step of that network (Eq. 8).
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

__all__ = [
    "l2_normalize",
    "Projected",
    "project_",
    "orthogonal_unit_rows_",
    "SphericalLinear",
    "check_ensemble",
    "check_positive_int",
]


def l2_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    """`x / max(||x||, eps)` over the last axis (DESIGN notation `l2`)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def check_ensemble(ensemble: int | None) -> None:
    """Validate the `ensemble` argument shared by every stackable layer."""
    if ensemble is not None and (isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1):
        raise ValueError(f"ensemble must be None or an int >= 1, got {ensemble!r}")


def check_positive_int(name: str, value: int) -> None:
    """Validate a size argument (a dimension, a rank, a block count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class Projected(nn.Module, abc.ABC):
    """A module owning a matrix whose effective rows are kept on the unit sphere.

    `effective_weight()` is the (out, in) [or (E, out, in)] matrix the forward multiplies by, whatever the
    parameterisation, so targets and export see one kind of matrix.
    """

    @abc.abstractmethod
    def project_(self) -> None:
        """Restore the invariant (unit-norm effective rows) in place; called after every optimiser step."""

    @abc.abstractmethod
    def effective_weight(self) -> Tensor:
        """The dense matrix applied by the forward pass."""


def project_(net: nn.Module) -> None:
    """Call `project_()` on every `Projected` submodule of `net` (including `net` itself)."""
    for module in net.modules():
        if isinstance(module, Projected):
            module.project_()


@torch.no_grad()
def orthogonal_unit_rows_(weight: Tensor) -> Tensor:
    """Orthogonal init, then every row scaled to unit norm (DESIGN §1 weight init); per member if stacked.

    An (out > in) orthogonal matrix only has orthonormal *columns*, its rows have norm about sqrt(in/out):
    the row normalisation is what puts them on the sphere.
    """
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (out, in), got shape {tuple(weight.shape)}")
    for member in weight.reshape(-1, *weight.shape[-2:]):
        nn.init.orthogonal_(member)
    weight.copy_(l2_normalize(weight))
    return weight


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """`x @ W.mT` computed as `(W @ x.mT).mT`: the same product, but autograd's weight gradient then comes out in
    W's own (out, in) layout instead of as a transposed view that must be copied (measured 125 -> 89 ms per bf16
    SAC update on this CPU, benchmarks/sac_update.py). Under torch.compile Inductor chooses layouts itself, and
    torch 2.13's Inductor miscompiles the transposed form's weight gradient inside the full critic graph (caught by
    tests/test_kernels.py), so compiled graphs keep the plain product."""
    if torch.compiler.is_compiling():
        return x @ weight.mT
    return (weight @ x.mT).mT


class SphericalLinear(Projected):
    """Dense bias-free linear layer whose rows are projected to unit norm (Eq. 8).

    Weight is (out, in), or (E, out, in) with `ensemble=E`; the forward is `x @ W.mT`, so a shared (N, in) input
    broadcasts to (E, N, out). An optional boolean `mask` buffer (set by `fasttd3_lora.sparse`) is re-applied by
    `project_()` before the row normalisation, so masked entries stay exactly zero.
    """

    mask: Tensor | None

    def __init__(self, in_features: int, out_features: int, *, ensemble: int | None = None) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_ensemble(ensemble)
        self.in_features = in_features
        self.out_features = out_features
        self.ensemble = ensemble
        shape = (out_features, in_features) if ensemble is None else (ensemble, out_features, in_features)
        self.weight = nn.Parameter(orthogonal_unit_rows_(torch.empty(shape)))
        self.register_buffer("mask", None)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)

    def effective_weight(self) -> Tensor:
        return self.weight

    @torch.no_grad()
    def set_mask_(self, mask: Tensor) -> None:
        """Attach a fixed sparsity mask (same shape as the weight) and apply it with a projection."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(self.weight.shape)}")
        self.mask = mask.to(device=self.weight.device, dtype=torch.bool)
        self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        if self.mask is not None:
            self.weight.mul_(self.mask)
        self.weight.copy_(l2_normalize(self.weight))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, ensemble={self.ensemble}, "
            f"masked={self.mask is not None}"
        )
