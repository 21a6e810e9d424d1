"""Diagonal Gaussian policies' math (DESIGN §10): log-density, entropy and the exact KL between two of them.

Pure functions on tensors; the last axis is the action axis and is summed over. PPO's ratio and entropy bonus,
its adaptive learning rate, and the drift measurement of group-relative fine-tuning all use them. A tanh squash
(SAC's actor) is a bijection, so the KL of two squashed policies equals the KL of their pre-squash Gaussians.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["log_prob", "entropy", "kl"]

_LOG_2PI = math.log(2.0 * math.pi)


def log_prob(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """`log N(x; mean, exp(log_std)^2)`, summed over the last axis."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)


def entropy(log_std: Tensor) -> Tensor:
    """Differential entropy `sum_j (log_std_j + (1 + log 2 pi) / 2)`."""
    return (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1)


def kl(mean0: Tensor, log_std0: Tensor, mean1: Tensor, log_std1: Tensor) -> Tensor:
    """`KL(N(mean0, std0^2) || N(mean1, std1^2))` per state (DESIGN §10):
    `sum_j [log(std1/std0) + (std0^2 + (mean0 - mean1)^2) / (2 std1^2) - 1/2]`."""
    var_ratio = torch.exp(2.0 * (log_std0 - log_std1))
    mahalanobis = (mean0 - mean1).pow(2) * torch.exp(-2.0 * log_std1)
    return (log_std1 - log_std0 + 0.5 * (var_ratio + mahalanobis) - 0.5).sum(-1)
