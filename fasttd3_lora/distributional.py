"""Categorical (C51) critic math, DESIGN §2.

Pure functions on tensors. Every function upcasts to float32 before doing arithmetic, so they are safe to call
inside a bf16 ``torch.autocast`` region: the projection's ``floor``/``ceil`` and interpolation weights would be
badly wrong in bf16 (8 significant bits: between 128 and 256 the spacing is 1, so b = 137.4 rounds to 137 and
its interpolation weight is lost).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "make_atoms",
    "categorical_projection",
    "categorical_loss",
    "expected_value",
    "select_min_target",
]


def make_atoms(
    v_min: float, v_max: float, num_atoms: int, *, device: torch.device | str | None = None
) -> Tensor:
    """Support ``z_k = linspace(v_min, v_max, K)`` (float32, shape (K,)), DESIGN §2."""
    if not v_min < v_max:
        raise ValueError(f"v_min must be < v_max, got v_min={v_min}, v_max={v_max}")
    if num_atoms < 2:
        raise ValueError(f"num_atoms must be >= 2, got {num_atoms}")
    return torch.linspace(v_min, v_max, num_atoms, dtype=torch.float32, device=device)


def _check_1d(name: str, x: Tensor, n: int) -> None:
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match next_probs, got {tuple(x.shape)}")


@torch.no_grad()
def categorical_projection(
    next_probs: Tensor,
    rewards: Tensor,
    discounts: Tensor,
    atoms: Tensor,
    bonus: Tensor | None = None,
) -> Tensor:
    """C51 projection of the shifted target distribution onto ``atoms`` (DESIGN §2).

    next_probs (N, K): target probabilities; rewards, discounts, bonus (N,). ``discounts`` already holds
    ``gamma^n (1 - terminated)`` (truncation bootstraps, so it is not in there). ``bonus`` is
    ``alpha log pi(a'|s')`` for SAC, None (= 0) for TD3. ``atoms`` must be evenly spaced (``make_atoms``);
    v_min, v_max and dz are read from it as tensors, so no host sync happens.

    Target atoms ``t_k = clip(r + d (z_k - bonus), v_min, v_max)``; ``b = (t - v_min)/dz``, ``l = floor(b)``,
    ``u = ceil(b)``; ``p_k (u - b)`` goes to ``l`` and ``p_k (b - l)`` to ``u``, and when ``l == u`` all of
    ``p_k`` goes to ``l``. Both weights are >= 0 and sum to 1, so the result is non-negative and keeps each
    row's mass. Returns float32 (N, K), no gradient (it is a regression target).
    """
    if next_probs.dim() != 2:
        raise ValueError(f"next_probs must be (N, K), got shape {tuple(next_probs.shape)}")
    n, k = next_probs.shape
    if atoms.shape != (k,) or k < 2:
        raise ValueError(f"atoms must have shape ({k},) (K >= 2) to match next_probs, got {tuple(atoms.shape)}")
    _check_1d("rewards", rewards, n)
    _check_1d("discounts", discounts, n)
    if bonus is not None:
        _check_1d("bonus", bonus, n)

    z = atoms.float()
    v_min, v_max = z[0], z[-1]
    delta_z = (v_max - v_min) / (k - 1)
    shift = z if bonus is None else z - bonus.float().unsqueeze(1)  # (K,) or (N, K)
    t = rewards.float().unsqueeze(1) + discounts.float().unsqueeze(1) * shift
    t = torch.clamp(t, v_min, v_max)  # (N, K)
    b = (t - v_min) / delta_z
    lower = b.floor()
    w_upper = b - lower  # in [0, 1); exactly 0 when l == u, so all mass stays on l
    p = next_probs.float()

    # index_add_ over the flattened (N*K) output: row i's atom j lives at i*K + j.
    # Clamping the indices absorbs rounding (t = v_max can give b = K-1 + 1 ulp, whose ceil is K; its weight
    # is ~1e-5 and lands on K-1, where it belongs), and keeps the garbage index of a NaN target in range, so
    # the NaN shows up in the loss instead of as an out-of-bounds error (a device-side assert on CUDA).
    row = torch.arange(0, n * k, k, device=p.device).unsqueeze(1)
    out = torch.zeros(n * k, dtype=torch.float32, device=p.device)
    mass_upper = p * w_upper
    out.index_add_(0, lower.long().clamp_(0, k - 1).add_(row).view(-1), (p - mass_upper).view(-1))  # p (1 - (b - l))
    out.index_add_(0, b.ceil().long().clamp_(0, k - 1).add_(row).view(-1), mass_upper.view(-1))
    return out.view(n, k)


def categorical_loss(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy ``-sum_k p_target log softmax(logits)``, mean over the batch (DESIGN §2).

    logits (N, K) or stacked critics (E, N, K), against one target (N, K) that every critic shares (clipped
    double Q trains both heads on the same target) or a target per critic (E, N, K). With E critics the result
    is the sum over critics of each critic's batch-mean loss. Computed in float32; returns a scalar.
    """
    if target_probs.dim() not in (2, 3):
        raise ValueError(f"target_probs must be (N, K) or (E, N, K), got shape {tuple(target_probs.shape)}")
    fits = logits.shape == target_probs.shape or (logits.dim() == 3 and logits.shape[-2:] == target_probs.shape)
    if logits.dim() not in (2, 3) or not fits:
        raise ValueError(
            f"logits must be (N, K) or (E, N, K) with (N, K) = {tuple(target_probs.shape[-2:])}, "
            f"got {tuple(logits.shape)}"
        )
    log_p = torch.log_softmax(logits.float(), dim=-1)
    per_critic = -(target_probs.float() * log_p).sum(-1).mean(-1)  # () or (E,)
    return per_critic.sum()


def expected_value(logits: Tensor, atoms: Tensor) -> Tensor:
    """``Q = sum_k softmax(logits)_k z_k`` over the last axis, float32 (DESIGN §1 critic head)."""
    if logits.shape[-1:] != atoms.shape:
        raise ValueError(f"logits' last axis must match atoms {tuple(atoms.shape)}, got {tuple(logits.shape)}")
    # Multiply-and-sum rather than `@`: autocast would run a matmul in bf16 even on float32 inputs.
    return (torch.softmax(logits.float(), dim=-1) * atoms.float()).sum(-1)


@torch.no_grad()
def select_min_target(target_logits: Tensor, atoms: Tensor) -> Tensor:
    """Per sample, the target distribution of the critic with the smaller expected value (DESIGN §2).

    target_logits (E, N, K) -> probs (N, K), float32. Clipped double Q for E = 2 (ties pick critic 0, as
    ``argmin`` does); E = 1 is the plain softmax.
    """
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be (E, N, K), got shape {tuple(target_logits.shape)}")
    if target_logits.shape[-1:] != atoms.shape:
        raise ValueError(
            f"target_logits' last axis must match atoms {tuple(atoms.shape)}, got {tuple(target_logits.shape)}"
        )
    logits = target_logits
    if logits.shape[0] > 1:
        which = expected_value(logits, atoms).argmin(dim=0)  # (N,)
        _, n, k = logits.shape
        logits = logits.gather(0, which.view(1, n, 1).expand(1, n, k))
    return torch.softmax(logits[0].float(), dim=-1)
