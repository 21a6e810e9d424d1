"""How far LoRA fine-tuning can move a policy: the single-layer setting of rank-bounded drift (DESIGN §10,
docs/drift.md), as pure functions on tensors.

Setting. The policy's one learnt map is a matrix W (m x n) acting on states s: linear-Gaussian `pi(a|s) =
N(W s, sigma^2 I)`, or linear-softmax `pi(a|s) = softmax(W s)` over m actions. Fine-tuning starts at the reference
W0 and moves W by Delta W: fully (`W = W0 + Delta W`) or through LoRA (`W = W0 + s (B A - B0 A0)`, `s = alpha / r`,
A (r x n), B (m x r)).

Assumptions. (A1) every step's gradient with respect to W is bounded, `||G_t||_F <= g` (here: clipped to g);
(A2) plain gradient descent with step eta on the trained factors, through the chain rule (`dB = s G A^T`,
`dA = s B^T G`); (A3) states are bounded, `||s|| <= S`; (A4) the Gaussian's sigma is fixed.

Result. With `u_t = ||A_t||_F`, `v_t = ||B_t||_F` and `c = eta s g`, (A1-A2) give `u_{t+1} <= u_t + c v_t` and
`v_{t+1} <= v_t + c u_t`; that map is monotone, so u_T, v_T stay below the solution of the equalities, whose sum
and difference grow as `(1 + c)^T` and `(1 - c)^T`:

    ||Delta W_T||_F <= s (u_T v_T + u_0 v_0)
                    <= s [((1 + c)^{2T} (u_0 + v_0)^2 - (1 - c)^{2T} (u_0 - v_0)^2) / 4 + u_0 v_0]   (`lora_drift_bound`)

and, for full fine-tuning, `||Delta W_T||_F <= eta g T` (`full_drift_bound`). The KL to the reference at a state is
`||Delta W s||^2 / (2 sigma^2)` for the Gaussian (exactly) and at most `||Delta W s||^2 / 4` for the softmax (the
log-sum-exp's curvature is a variance, at most a quarter of the squared range), so with (A3)

    KL_T <= kappa S^2 D_T^2,     kappa = 1 / (2 sigma^2) (Gaussian), 1 / 4 (softmax)     (`kl_bound`)

for any bound D_T of `||Delta W_T||_F`. Where the rank enters: B0 = 0 and A0 Kaiming-uniform (entries within
`1/sqrt(n)`, as `LoRALinear` draws them) give `u_0^2 <= r`, so `D_T <= alpha ((1 + c)^{2T} - (1 - c)^{2T}) / 4`
with `c = eta alpha g / r`. With alpha = r (this stack's convention) that is `r ((1 + eta g)^{2T} - (1 - eta g)^{2T})
/ 4`, about `r eta g T` early on: drift may grow linearly in the rank, the KL quadratically. With alpha fixed, c
shrinks as 1/r and the bound *falls* with the rank: the convention decides the direction of the claim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "lora_drift_bound",
    "full_drift_bound",
    "kl_bound",
    "gaussian_mean_kl",
    "softmax_kl",
    "lora_gradients",
    "clip_norm",
    "single_layer_run",
]


def lora_drift_bound(steps: int, eta: float, g: float, scale: float, a0_norm: float, b0_norm: float = 0.0) -> float:
    """The bound on `||Delta W_T||_F` after `steps` gradient steps of LoRA factors (module docstring)."""
    c = eta * scale * g
    p0, m0 = a0_norm + b0_norm, a0_norm - b0_norm
    product = ((1.0 + c) ** (2 * steps) * p0**2 - (1.0 - c) ** (2 * steps) * m0**2) / 4.0
    return scale * (product + a0_norm * b0_norm)


def full_drift_bound(steps: int, eta: float, g: float) -> float:
    """The bound on `||Delta W_T||_F` after `steps` gradient steps of W itself: `eta g T`."""
    return eta * g * steps


def kl_bound(drift: float, state_norm: float, policy: str, sigma: float = 1.0) -> float:
    """`kappa S^2 D^2`: the KL to the reference allowed by `||Delta W||_F <= drift` at states of norm <= S."""
    if policy == "gaussian":
        kappa = 1.0 / (2.0 * sigma**2)
    elif policy == "softmax":
        kappa = 0.25
    else:
        raise ValueError(f"policy must be 'gaussian' or 'softmax', got {policy!r}")
    return kappa * state_norm**2 * drift**2


def gaussian_mean_kl(delta_w: Tensor, states: Tensor, sigma: float) -> Tensor:
    """`KL(N(W0 s, sigma^2) || N(W s, sigma^2)) = ||Delta W s||^2 / (2 sigma^2)` per state (rows of `states`)."""
    return (states @ delta_w.mT).pow(2).sum(-1) / (2.0 * sigma**2)


def softmax_kl(logits_ref: Tensor, logits: Tensor) -> Tensor:
    """`KL(softmax(z_ref) || softmax(z))` per row."""
    log_ref, log_new = torch.log_softmax(logits_ref, -1), torch.log_softmax(logits, -1)
    return (log_ref.exp() * (log_ref - log_new)).sum(-1)


def lora_gradients(grad_w: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The chain rule through `W = W0 + s B A`: `(dL/dA, dL/dB) = (s B^T G, s G A^T)` for `G = dL/dW`."""
    return scale * lora_b.mT @ grad_w, scale * grad_w @ lora_a.mT


def clip_norm(grad: Tensor, g: float) -> Tensor:
    """`grad` scaled down to Frobenius norm at most g (A1)."""
    norm = float(grad.norm())
    return grad if norm <= g or norm == 0.0 else grad * (g / norm)



def single_layer_run(
    policy: str,
    rank: int | None,
    *,
    alpha: float | None = None,
    steps: int = 200,
    eta: float = 0.05,
    g: float = 1.0,
    m: int = 6,
    n: int = 16,
    sigma: float = 0.5,
    state_norm: float = 1.0,
    batch: int = 32,
    group: int = 8,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Fine-tune a single-layer policy with KL-free group-relative policy gradients and measure its drift.

    The reference `W0 ~ N(0, 1/n)`; the new task rewards `-||a - W* s||^2` (Gaussian) or pays the logit `(W* s)_a`
    (softmax), `W* = W0` plus a full-rank shift of norm 2. Each step draws `batch` states on the sphere of radius
    `state_norm`, `group` actions per state from the current policy, the group-relative advantages (DESIGN §10),
    their score-function gradient G of the loss, clipped to `g` (A1), and one gradient step of size `eta` on W
    (`rank=None`) or on LoRA factors (B0 = 0, A0 Kaiming-uniform; `alpha=None` is alpha = rank). Returns per step
    (0..steps): the largest and the mean KL to the reference over 512 fixed states of that norm, `||Delta W||_F`,
    and the bounds on both (`lora_drift_bound` / `full_drift_bound`, `kl_bound`)."""
    if policy not in ("gaussian", "softmax"):
        raise ValueError(f"policy must be 'gaussian' or 'softmax', got {policy!r}")
    gen = torch.Generator().manual_seed(seed)

    def sphere(count: int) -> Tensor:
        x = torch.randn(count, n, generator=gen, dtype=torch.float64)
        return state_norm * x / x.norm(dim=-1, keepdim=True)

    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    shift = torch.randn(m, n, generator=gen, dtype=torch.float64)
    target = w0 + 2.0 * shift / shift.norm()
    eval_states = sphere(512)
    if rank is None:
        delta, scale = torch.zeros(m, n, dtype=torch.float64), 1.0
    else:
        scale = (float(rank) if alpha is None else alpha) / rank
        bound = 1.0 / math.sqrt(n)  # LoRALinear's A: Kaiming-uniform with a = sqrt(5) over fan-in n
        lora_a = (torch.rand(rank, n, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        lora_b = torch.zeros(m, rank, dtype=torch.float64)
        a0_norm = float(lora_a.norm())
    kl_max, kl_mean, drift, drift_bound = [], [], [], []
    for t in range(steps + 1):
        delta_w = delta if rank is None else scale * lora_b @ lora_a
        if policy == "gaussian":
            kls = gaussian_mean_kl(delta_w, eval_states, sigma)
        else:
            kls = softmax_kl(eval_states @ w0.mT, eval_states @ (w0 + delta_w).mT)
        kl_max.append(float(kls.max()))
        kl_mean.append(float(kls.mean()))
        drift.append(float(delta_w.norm()))
        drift_bound.append(full_drift_bound(t, eta, g) if rank is None else lora_drift_bound(t, eta, g, scale, a0_norm))
        if t == steps:
            break
        states = sphere(batch)
        w = w0 + delta_w
        if policy == "gaussian":
            mean = states @ w.mT  # (batch, m)
            actions = mean.unsqueeze(1) + sigma * torch.randn(batch, group, m, generator=gen, dtype=torch.float64)
            rewards = -(actions - (states @ target.mT).unsqueeze(1)).pow(2).sum(-1)
            score = (actions - mean.unsqueeze(1)) / sigma**2  # d log pi / d (W s)
        else:
            probs = torch.softmax(states @ w.mT, -1)
            actions = torch.multinomial(probs, group, replacement=True, generator=gen)  # (batch, group)
            rewards = (states @ target.mT).gather(-1, actions)
            score = torch.nn.functional.one_hot(actions, m).to(torch.float64) - probs.unsqueeze(1)
        advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-8)
        # loss = -mean(A log pi): its gradient with respect to W
        grad_w = clip_norm(-torch.einsum("bg,bgm,bn->mn", advantages, score, states) / (batch * group), g)
        if rank is None:
            delta = delta - eta * grad_w
        else:
            grad_a, grad_b = lora_gradients(grad_w, lora_a, lora_b, scale)
            lora_a, lora_b = lora_a - eta * grad_a, lora_b - eta * grad_b
    sigma_kl = sigma if policy == "gaussian" else 1.0
    kl_bounds = [kl_bound(d, state_norm, policy, sigma_kl) for d in drift_bound]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return {"kl_max": as_tensor(kl_max), "kl_mean": as_tensor(kl_mean), "drift": as_tensor(drift),
            "drift_bound": as_tensor(drift_bound), "kl_bound": as_tensor(kl_bounds)}  # fmt: skip
