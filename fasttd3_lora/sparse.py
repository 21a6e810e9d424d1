"""Sparse baseline (Ma et al. 2025; DESIGN §4): one-shot random pruning at init with Erdős–Rényi densities.

The allocation is over the network's weight matrices only (every `SphericalLinear`: embedder, block and head
matrices); Scalers and biases stay dense. Masks are boolean buffers on the layers; `SphericalLinear.project_()`
re-applies them before the row normalisation, so masked entries are exactly zero after every optimiser step
(weight decay included) as long as `project_(net)` follows each step, as it must for every SimbaV2 network.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from fasttd3_lora.hypersphere import Projected, SphericalLinear

__all__ = ["erdos_renyi_densities", "bernoulli_mask", "apply_sparsity_", "masked_layers"]


def erdos_renyi_densities(shapes: Sequence[Sequence[int]], sparsity: float) -> list[float]:
    """Density per tensor: `eps * sum(shape) / prod(shape)`, eps solved so the kept fraction is `1 - sparsity`.

    Tensors whose density would exceed 1 are made dense and eps is re-solved over the rest until none does.
    """
    if not (isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if len(shapes) == 0:
        raise ValueError("shapes must name at least one tensor, got an empty sequence")
    sizes = [math.prod(shape) for shape in shapes]
    if any(len(shape) == 0 or size < 1 for shape, size in zip(shapes, sizes)):
        raise ValueError(f"every shape must be non-empty with positive sizes, got {list(map(tuple, shapes))}")
    raw = [sum(shape) / size for shape, size in zip(shapes, sizes)]
    kept_target = (1.0 - sparsity) * sum(sizes)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        if not free:
            return [1.0] * len(shapes)
        budget = kept_target - sum(sizes[i] for i in dense)
        eps = budget / sum(raw[i] * sizes[i] for i in free)
        over = {i for i in free if eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def bernoulli_mask(shape: Sequence[int], density: float, generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask, each entry kept independently with probability `density` (CPU; move it where needed)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    return torch.rand(tuple(shape), generator=generator) < density


def masked_layers(net: nn.Module) -> list[SphericalLinear]:
    """The weight matrices the sparsity allocation is over: every `SphericalLinear` of `net`."""
    return [m for m in net.modules() if isinstance(m, SphericalLinear)]


@torch.no_grad()
def apply_sparsity_(net: nn.Module, sparsity: float, generator: torch.Generator | None = None) -> list[float]:
    """Attach ER masks to every `SphericalLinear` of `net` (one independent mask per ensemble member), zero the
    masked entries and re-normalise rows. Returns the density of each layer in `net.modules()` order.

    ER is over the weight matrices only; Scalers and biases stay dense. `generator=None` uses torch's global RNG.
    """
    others = [type(m).__name__ for m in net.modules() if isinstance(m, Projected) and not isinstance(m, SphericalLinear)]
    if others:
        raise ValueError(f"sparsity applies to dense SphericalLinear layers only, found {sorted(set(others))}")
    layers = masked_layers(net)
    if not layers:
        raise ValueError(f"{type(net).__name__} has no SphericalLinear layer to sparsify")
    # A stacked (E, out, in) weight is E matrices of shape (out, in) for the allocation.
    member_shapes = [tuple(layer.weight.shape[-2:]) for layer in layers]
    members = [math.prod(layer.weight.shape[:-2]) for layer in layers]
    flat_shapes = [shape for shape, count in zip(member_shapes, members) for _ in range(count)]
    flat_densities = erdos_renyi_densities(flat_shapes, sparsity)
    densities = []
    start = 0
    for layer, count in zip(layers, members):
        density = flat_densities[start]  # members share a shape, hence a density
        start += count
        layer.set_mask_(bernoulli_mask(layer.weight.shape, density, generator))
        densities.append(density)
    return densities
