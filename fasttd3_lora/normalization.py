"""Running statistics: observation normaliser (DESIGN §1) and SimbaV2's reward scaling (DESIGN §5).

Both are ``nn.Module`` holders of buffers, so ``.to(device)`` moves them, ``state_dict()`` saves them with the
agent, and ``RunningMeanStd`` can sit in front of an actor in an exported graph (its ``forward`` normalises).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["RunningMeanStd", "RewardNormalizer"]


class RunningMeanStd(nn.Module):
    """Per-coordinate running mean / variance, merged batch by batch (parallel Welford, Chan et al. 1979).

    Starts at mean 0, var 1 with a pseudo-count of ``epsilon`` = 1e-4 (DESIGN §1, as SimbaV2's official
    code), so the first real batch dominates at once and ``normalize`` is defined before any data.
    The count of real samples is an int64 buffer (exact however long the run, and untouched by ``.half()``);
    the merge itself runs in float64, the stored mean / var are float32.
    """

    mean: Tensor
    var: Tensor
    num_samples: Tensor

    def __init__(self, shape: int | Sequence[int] = (), epsilon: float = 1e-4, norm_eps: float = 1e-8) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(s < 1 for s in shape):
            raise ValueError(f"shape must have positive sizes, got {shape}")
        if epsilon <= 0:
            raise ValueError(f"epsilon (initial pseudo-count) must be > 0, got {epsilon}")
        self.shape = shape
        self.epsilon = epsilon
        self.norm_eps = norm_eps
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("num_samples", torch.zeros((), dtype=torch.int64))

    @property
    def count(self) -> Tensor:
        """Effective count ``num_samples + epsilon`` (float64 scalar)."""
        return self.num_samples.double() + self.epsilon

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge a batch ``x`` of shape (..., *shape); every leading index is one sample."""
        d = len(self.shape)
        if x.dim() <= d or tuple(x.shape[x.dim() - d :]) != self.shape or x.numel() == 0:
            raise ValueError(f"update expects a non-empty batch of shape (batch..., *{self.shape}), got {tuple(x.shape)}")
        x = x.reshape(-1, *self.shape).double()
        batch_count = x.shape[0]
        batch_var, batch_mean = torch.var_mean(x, dim=0, correction=0)
        count = self.count
        total = count + batch_count
        delta = batch_mean - self.mean.double()
        # Chan et al.'s pairwise merge: M2 = M2_a + M2_b + delta^2 n_a n_b / n; every term is >= 0.
        m2 = self.var.double() * count + batch_var * batch_count + delta.square() * count * batch_count / total
        self.mean.copy_(self.mean.double() + delta * (batch_count / total))
        self.var.copy_(m2 / total)
        self.num_samples.add_(batch_count)

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mu) / sqrt(var + 1e-8)`` with the current statistics (DESIGN §1)."""
        return (x - self.mean) / torch.sqrt(self.var + self.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x)


class RewardNormalizer(nn.Module):
    """SimbaV2's reward scaling (DESIGN §5): ``r / max(sqrt(var(G) + 1e-8), max|G| / g_max)``.

    Per env, a running discounted return ``G <- gamma (1 - done) G + r``. ``update(rewards, dones)`` is called
    once per collected transition, in this order: (1) G with that transition (``done`` is the transition's
    own episode end, terminated or truncated, so the final reward already starts the next G), (2) the scalar
    ``RunningMeanStd`` of G with all envs' new G as one batch, (3) the running max of |G|. ``scale`` applies the
    current statistics to a sampled batch; it changes no state.

    Against SimbaV2's official ``RewardNormalizer`` (dojeon-ai/SimbaV2,
    scale_rl/agents/wrappers/normalization.py) this matches: the G recursion with done = terminated or
    truncated, the update order (G, then its statistics, then max|G|, with max starting at 0), the RunningMeanStd
    start (mean 0, var 1, count 1e-4), the denominator with ``g_max = 5`` (their ``normalized_g_max``, also the
    critic's support bound) and eps 1e-8, statistics updated on collected data only and applied to sampled
    batches at update time. Differences: statistics are merged in float64 (theirs float32).
    """

    returns: Tensor
    abs_max: Tensor

    def __init__(self, num_envs: int, gamma: float, g_max: float = 5.0, epsilon: float = 1e-8) -> None:
        super().__init__()
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if g_max <= 0:
            raise ValueError(f"g_max must be > 0, got {g_max}")
        self.num_envs = num_envs
        self.gamma = gamma
        self.g_max = g_max
        self.epsilon = epsilon
        self.return_rms = RunningMeanStd(())
        self.register_buffer("returns", torch.zeros(num_envs))
        self.register_buffer("abs_max", torch.zeros(()))

    @torch.no_grad()
    def update(self, rewards: Tensor, dones: Tensor) -> None:
        """Fold one vector-env step (rewards, dones of shape (num_envs,)) into G and its statistics."""
        for name, x in (("rewards", rewards), ("dones", dones)):
            if x.shape != (self.num_envs,):
                raise ValueError(f"{name} must have shape ({self.num_envs},), got {tuple(x.shape)}")
        g = self.gamma * (1.0 - dones.to(self.returns.dtype)) * self.returns + rewards.to(self.returns.dtype)
        self.returns.copy_(g)
        self.return_rms.update(g)
        self.abs_max.copy_(torch.maximum(self.abs_max, g.abs().max()))

    def denominator(self) -> Tensor:
        """``max(sqrt(var(G) + eps), max|G| / g_max)`` (scalar tensor)."""
        return torch.maximum(torch.sqrt(self.return_rms.var + self.epsilon), self.abs_max / self.g_max)

    def scale(self, rewards: Tensor) -> Tensor:
        """Rewards divided by the current denominator (DESIGN §5); any shape."""
        return rewards / self.denominator()
