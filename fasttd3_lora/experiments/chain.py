"""The paper's motivating chain-MDP experiment (arXiv 2604.18978, §4 and Appendix A).

A 15-state chain, fixed random features of one-hot (s, a), a bias-free two-hidden-layer ReLU critic; dense
training versus plain LoRA (frozen hidden weights W0, ``ΔW = B A``, ``B = 0`` at init, output layer trained) of
several ranks, in two regimes that differ only in the regression target: the exact ``Q^π`` (static) or the
bootstrapped ``r + γ Q_target(s', π(s'))`` (td). All (model, seed) pairs of a regime train in one loop: each
model is one critic stacked over seeds (leading ensemble axis, batched matmuls), every Q is evaluated on all
30 (s, a) at once, and one Adam steps them all (Adam is elementwise, so stacking changes nothing).

    python -m fasttd3_lora.experiments.chain --out DIR

writes ``DIR/chain_results.csv`` (every metric row), ``DIR/chain_summary.csv`` (final step, mean ± std over
seeds) and ``DIR/chain_results.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fasttd3_lora.adapters import LoRALinear

LEFT, RIGHT = 0, 1
NUM_ACTIONS = 2
REGIMES = ("static", "td")
CSV_COLUMNS = ("regime", "model", "seed", "step", "true_q_error", "bellman_residual")


@dataclass(frozen=True)
class ChainConfig:
    """Every value of the experiment lives here; the CLI only overrides run-length knobs."""

    # MDP (from the paper)
    num_states: int = 15
    success_prob: float = 0.9  # the chosen move happens with this probability, else the opposite one
    reward_state: int = 13  # reward 1 for taking `right` here (state 14 is the right end)
    gamma: float = 0.97
    # Lost in the paper, chosen here: the left end, so π's discounted distribution covers the whole chain.
    start_state: int = 0
    # Features (lost in the paper: linear, no nonlinearity): φ(s, a) = G onehot(s, a), G_ij ~ N(0, feature_std²).
    feature_dim: int = 64
    feature_std: float = 1.0
    # Critic: Linear(64→256) ReLU Linear(256→256) ReLU Linear(256→1), no biases. Init (lost in the paper):
    # hidden He-normal std sqrt(2 / fan_in) (ReLU), output LeCun-normal std sqrt(1 / fan_in), so Q starts O(1).
    hidden_dim: int = 256
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # Training (from the paper, except the learning rate, which is lost: the usual RL critic value).
    buffer_size: int = 500
    batch_size: int = 64
    steps: int = 12_000
    eval_every: int = 300
    num_seeds: int = 5
    seed: int = 0  # seed k of the run uses torch.Generator seeded with seed + k
    lr: float = 3e-4
    tau: float = 0.02  # Polyak rate of the td target network

    def __post_init__(self) -> None:  # the MDP's own values are checked by build_chain_mdp
        checks = {  # name: (valid?, what is allowed)
            "gamma": (0.0 <= self.gamma < 1.0, "in [0, 1)"),
            "start_state": (0 <= self.start_state < self.num_states, f"in [0, {self.num_states})"),
            "ranks": (len(self.ranks) > 0 and all(r >= 1 for r in self.ranks), "non-empty, each >= 1"),
            "steps": (self.steps >= 1, ">= 1"),
            "eval_every": (self.eval_every >= 1 and self.steps % self.eval_every == 0, f"dividing steps={self.steps}"),
            "num_seeds": (self.num_seeds >= 1, ">= 1"),
            "buffer_size": (self.buffer_size >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "tau": (0.0 < self.tau <= 1.0, "in (0, 1]"),
            "lr": (self.lr > 0.0, "> 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"ChainConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    @property
    def model_names(self) -> list[str]:
        return ["dense"] + [f"lora-r{r}" for r in self.ranks]


# ----------------------------------------------------------------------------------------------- the MDP
class ChainMDP(NamedTuple):
    """Flat state-action index ``sa = s * 2 + a``. ``P[sa, s']`` transition probabilities, ``R[sa]`` rewards."""

    P: Tensor  # (S*A, S), float64
    R: Tensor  # (S*A,), float64

    @property
    def num_states(self) -> int:
        return self.P.shape[1]


def build_chain_mdp(num_states: int, success_prob: float, reward_state: int) -> ChainMDP:
    """The chain: the chosen move succeeds w.p. ``success_prob``, else the opposite move; a move off either
    end leaves the agent where it is (reflecting ends); reward 1 for `right` in ``reward_state``."""
    if num_states < 2:
        raise ValueError(f"num_states={num_states} is invalid: must be >= 2")
    if not 0.0 <= success_prob <= 1.0:
        raise ValueError(f"success_prob={success_prob} is invalid: must be in [0, 1]")
    if not 0 <= reward_state < num_states:
        raise ValueError(f"reward_state={reward_state} is invalid: must be in [0, {num_states})")
    P = torch.zeros(num_states * NUM_ACTIONS, num_states, dtype=torch.float64)
    for s in range(num_states):
        for a, step in ((LEFT, -1), (RIGHT, 1)):
            intended = min(max(s + step, 0), num_states - 1)
            opposite = min(max(s - step, 0), num_states - 1)
            P[s * NUM_ACTIONS + a, intended] += success_prob
            P[s * NUM_ACTIONS + a, opposite] += 1.0 - success_prob
    R = torch.zeros(num_states * NUM_ACTIONS, dtype=torch.float64)
    R[reward_state * NUM_ACTIONS + RIGHT] = 1.0
    return ChainMDP(P, R)


def policy_indices(policy: Tensor) -> Tensor:
    """Flat (s, π(s)) indices of a deterministic policy given as one action per state."""
    return torch.arange(policy.shape[0]) * NUM_ACTIONS + policy


def bellman_target(q: Tensor, mdp: ChainMDP, policy: Tensor, gamma: float) -> Tensor:
    """Exact ``(T^π q)(s, a) = R(s, a) + γ Σ_s' P(s'|s, a) q(s', π(s'))`` for q of shape (..., S*A)."""
    q_next = q[..., policy_indices(policy)]  # (..., S)
    return mdp.R.to(q.dtype) + gamma * q_next @ mdp.P.to(q.dtype).mT


def true_q(mdp: ChainMDP, policy: Tensor, gamma: float) -> Tensor:
    """``Q^π`` by solving ``(I - γ P Π) q = R`` exactly (float64), ``Π`` selecting (s', π(s'))."""
    n = mdp.R.shape[0]
    Pi = torch.zeros(mdp.num_states, n, dtype=torch.float64)
    Pi[torch.arange(mdp.num_states), policy_indices(policy)] = 1.0
    return torch.linalg.solve(torch.eye(n, dtype=torch.float64) - gamma * mdp.P @ Pi, mdp.R)


def bellman_residual(q: Tensor, mdp: ChainMDP, policy: Tensor, gamma: float) -> Tensor:
    """RMS over all (s, a) of ``q - T^π q``, computed exactly from P (not sampled); q: (..., S*A) → (...)."""
    q = q.to(torch.float64)
    return (q - bellman_target(q, mdp, policy, gamma)).pow(2).mean(-1).sqrt()


def discounted_state_distribution(mdp: ChainMDP, policy: Tensor, gamma: float, start_state: int) -> Tensor:
    """``d_π = (1 - γ) Σ_t γ^t Pr(s_t = · | s_0 = start)``, i.e. ``d^T (I - γ P_π) = (1 - γ) e_start^T``."""
    P_pi = mdp.P[policy_indices(policy)]  # (S, S): row s is P(· | s, π(s))
    e = torch.zeros(mdp.num_states, dtype=torch.float64)
    e[start_state] = 1.0
    eye = torch.eye(mdp.num_states, dtype=torch.float64)
    return torch.linalg.solve((eye - gamma * P_pi).mT, (1.0 - gamma) * e)


def true_q_error(q: Tensor, q_true: Tensor, policy: Tensor, state_weights: Tensor) -> Tensor:
    """Weighted RMS of ``q(s, π(s)) - Q^π(s, π(s))`` over states; q: (..., S*A) → (...)."""
    idx = policy_indices(policy)
    diff = q.to(torch.float64)[..., idx] - q_true[idx]
    return (state_weights * diff.pow(2)).sum(-1).sqrt()


# --------------------------------------------------------------------------------------------- the critic
class StackedLinear(nn.Module):
    """Dense bias-free layer of an ensemble: weight (E, out, in), trained."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.mT


def plain_lora(base: Tensor, a_noise: Tensor) -> LoRALinear:
    """Plain LoRA layer of an ensemble of one rank r (`fasttd3_lora.adapters.LoRALinear`, no bias, scale 1):
    frozen ``W0 = base`` (E, out, in), ``ΔW = B A`` with ``A ~ N(0, 1/r)`` and ``B = 0``. ``a_noise`` (E, r, in)
    holds standard-normal draws (the caller owns the randomness, so every model of a seed is built from the same
    stream)."""
    if a_noise.dim() != 3 or a_noise.shape[0] != base.shape[0] or a_noise.shape[2] != base.shape[2]:
        raise ValueError(f"a_noise {tuple(a_noise.shape)} does not fit base {tuple(base.shape)}: need (E, r, in)")
    members, out_features, in_features = base.shape
    rank = a_noise.shape[1]
    layer = LoRALinear(in_features, out_features, rank, alpha=rank, bias=False, ensemble=members, weight=base)
    with torch.no_grad():
        layer.lora_A[0].copy_(a_noise / rank**0.5)
    return layer


class ChainCritic(nn.Module):
    """A stack of E bias-free ReLU MLPs ``Q = w_out ReLU(L2 ReLU(L1 φ))``, L_i dense or plain LoRA layers."""

    def __init__(self, hidden: Sequence[nn.Module], out: Tensor) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(hidden)
        self.out = nn.Parameter(out.clone())  # (E, 1, hidden), trained in every model

    def forward(self, x: Tensor) -> Tensor:
        """x (E, N, feature_dim) → Q (E, N)."""
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return (x @ self.out.mT).squeeze(-1)


# ------------------------------------------------------------------------------------------ the experiment
class ChainSetup(NamedTuple):
    """Everything fixed before training, per seed (leading axis S = number of seeds)."""

    mdp: ChainMDP
    policy: Tensor  # (num_states,) always `right`
    q_true: Tensor  # (S*A,) float64
    state_weights: Tensor  # (num_states,) discounted distribution of π from the start state
    features: Tensor  # (seeds, S*A, feature_dim)
    buffer_sa: Tensor  # (seeds, buffer_size) flat (s, a) of each transition
    buffer_reward: Tensor  # (seeds, buffer_size)
    buffer_next_state: Tensor  # (seeds, buffer_size)
    batches: Tensor  # (seeds, steps, batch_size) indices into the buffer
    hidden_init: list[Tensor]  # per layer (seeds, out, in)
    out_init: Tensor  # (seeds, 1, hidden)
    lora_noise: list[list[Tensor]]  # per rank, per layer (seeds, rank, in), standard normal


def make_setup(cfg: ChainConfig) -> ChainSetup:
    """Per seed: features, a uniform-random replay buffer (s, a uniform; s' ~ P), minibatch indices, inits."""
    mdp = build_chain_mdp(cfg.num_states, cfg.success_prob, cfg.reward_state)
    policy = torch.full((cfg.num_states,), RIGHT, dtype=torch.long)
    n_sa = cfg.num_states * NUM_ACTIONS
    dims = [cfg.feature_dim, cfg.hidden_dim, cfg.hidden_dim]
    keys = ("feat", "sa", "r", "next", "batch", "w0", "w1", "out", "a")
    per_seed: dict[str, list[Tensor]] = {k: [] for k in keys}
    for k in range(cfg.num_seeds):
        g = torch.Generator().manual_seed(cfg.seed + k)
        per_seed["feat"].append(torch.randn(n_sa, cfg.feature_dim, generator=g) * cfg.feature_std)
        sa = torch.randint(0, n_sa, (cfg.buffer_size,), generator=g)
        per_seed["sa"].append(sa)
        per_seed["r"].append(mdp.R[sa].float())
        per_seed["next"].append(torch.multinomial(mdp.P[sa], 1, generator=g).squeeze(-1))
        for i in range(2):  # He-normal for the ReLU layers
            per_seed[f"w{i}"].append(torch.randn(dims[i + 1], dims[i], generator=g) * (2.0 / dims[i]) ** 0.5)
        per_seed["out"].append(torch.randn(1, cfg.hidden_dim, generator=g) * (1.0 / cfg.hidden_dim) ** 0.5)
        # LoRA A draws of every rank and layer, from this seed's stream: (rank_sum, feature + hidden)
        per_seed["a"].append(torch.randn(sum(cfg.ranks), dims[0] + dims[1], generator=g))
        # Last, so the draws above do not depend on the run length.
        per_seed["batch"].append(torch.randint(0, cfg.buffer_size, (cfg.steps, cfg.batch_size), generator=g))
    stacked = {k: torch.stack(v) for k, v in per_seed.items()}
    lora_noise = [
        list(block.split(dims[:2], dim=-1)) for block in stacked["a"].split(list(cfg.ranks), dim=1)
    ]
    return ChainSetup(
        mdp=mdp,
        policy=policy,
        q_true=true_q(mdp, policy, cfg.gamma),
        state_weights=discounted_state_distribution(mdp, policy, cfg.gamma, cfg.start_state),
        features=stacked["feat"],
        buffer_sa=stacked["sa"],
        buffer_reward=stacked["r"],
        buffer_next_state=stacked["next"],
        batches=stacked["batch"],
        hidden_init=[stacked["w0"], stacked["w1"]],
        out_init=stacked["out"],
        lora_noise=lora_noise,
    )


def make_critics(cfg: ChainConfig, setup: ChainSetup) -> list[ChainCritic]:
    """Dense, then one LoRA critic per rank, each with one member per seed. LoRA of seed k freezes the dense
    init of seed k and starts with B = 0, so every model of a seed starts as the same function."""
    dense = ChainCritic([StackedLinear(w) for w in setup.hidden_init], setup.out_init)
    loras = [
        ChainCritic([plain_lora(w, a) for w, a in zip(setup.hidden_init, noise)], setup.out_init)
        for noise in setup.lora_noise
    ]
    return [dense, *loras]


def stacked_q(critics: Sequence[ChainCritic], features: Tensor) -> Tensor:
    """Q of every model (each critic stacks one member per seed) on per-seed inputs: features (seeds, N, d)
    → (models * seeds, N), ordered (model, seed)."""
    return torch.cat([c(features) for c in critics])


def polyak_(target: list[Tensor], online: list[Tensor], tau: float) -> None:
    """``θ' ← τ θ + (1 - τ) θ'`` in place, outside autograd (else each update joins an ever-growing graph)."""
    with torch.no_grad():
        torch._foreach_lerp_(target, online, tau)


def train_regime(regime: str, cfg: ChainConfig, setup: ChainSetup) -> Tensor:
    """Train every (model, seed) of one regime at once. Returns metrics (evals, models * seeds, 2):
    [..., 0] true-Q error, [..., 1] Bellman residual, at steps 0, eval_every, ..., steps."""
    if regime not in REGIMES:
        raise ValueError(f"regime={regime!r} is invalid: must be one of {REGIMES}")
    critics = make_critics(cfg, setup)
    params = [p for c in critics for p in c.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)  # one kernel for all stacked tensors
    targets = [copy.deepcopy(c).requires_grad_(False) for c in critics] if regime == "td" else []
    target_params = [p for c in targets for p in c.parameters()]
    n_models = 1 + len(cfg.ranks)
    # Inputs at the target policy's action in every state, for the bootstrapped target Q(s', π(s')).
    pi_features = setup.features[:, policy_indices(setup.policy)]
    static_q = setup.q_true.float()
    # A seed's models share its buffer and minibatches: repeat per-seed data to (models * seeds, ...).
    buffer_sa, buffer_reward, buffer_next_state = (
        t.repeat(n_models, 1) for t in (setup.buffer_sa, setup.buffer_reward, setup.buffer_next_state)
    )
    records = []
    for step in range(cfg.steps + 1):
        # One forward over all S*A inputs, then gather the minibatch: same loss as a forward on the batch.
        q_all = stacked_q(critics, setup.features)  # (models * seeds, S*A)
        if step % cfg.eval_every == 0:
            q_eval = q_all.detach()
            records.append(torch.stack([
                true_q_error(q_eval, setup.q_true, setup.policy, setup.state_weights),
                bellman_residual(q_eval, setup.mdp, setup.policy, cfg.gamma),
            ], dim=-1))
        if step == cfg.steps:
            break
        idx = setup.batches[:, step].repeat(n_models, 1)  # (models * seeds, batch)
        sa = buffer_sa.gather(1, idx)
        if regime == "static":
            y = static_q[sa]
        else:
            with torch.no_grad():
                q_next = stacked_q(targets, pi_features)  # (models * seeds, S)
            y = buffer_reward.gather(1, idx) + cfg.gamma * q_next.gather(1, buffer_next_state.gather(1, idx))
        # Sum over models of each model's mean loss: every model gets exactly its own gradient.
        loss = (q_all.gather(1, sa) - y).pow(2).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target_params:
            polyak_(target_params, params, cfg.tau)
    return torch.stack(records)


def _train_in_worker(regime: str, cfg: ChainConfig, threads: int) -> Tensor:
    """Process-pool entry: the setup is deterministic given cfg, so each worker rebuilds it."""
    torch.set_num_threads(threads)
    return train_regime(regime, cfg, make_setup(cfg))


def run(cfg: ChainConfig, workers: int = 1, threads: int = 1) -> list[dict[str, object]]:
    """Both regimes, each in its own process when ``workers > 1`` (the stacked steps are too small for
    intra-op threads to pay off, so two single-threaded processes use two cores best); rows in CSV_COLUMNS order."""
    if workers < 1 or threads < 1:
        raise ValueError(f"workers={workers}, threads={threads} are invalid: both must be >= 1")
    if workers == 1:
        torch.set_num_threads(threads)
        setup = make_setup(cfg)
        results = [train_regime(regime, cfg, setup) for regime in REGIMES]
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold OpenMP threads
        with ProcessPoolExecutor(max_workers=min(workers, len(REGIMES)), mp_context=context) as pool:
            results = list(pool.map(_train_in_worker, REGIMES, [cfg] * len(REGIMES), [threads] * len(REGIMES)))
    names = cfg.model_names
    rows = []
    for regime, metrics in zip(REGIMES, results):
        for e in range(metrics.shape[1]):
            for j in range(metrics.shape[0]):
                rows.append({
                    "regime": regime,
                    "model": names[e // cfg.num_seeds],
                    "seed": cfg.seed + e % cfg.num_seeds,
                    "step": j * cfg.eval_every,
                    "true_q_error": float(metrics[j, e, 0]),
                    "bellman_residual": float(metrics[j, e, 1]),
                })
    return rows


# ------------------------------------------------------------------------------------------------ outputs
def _group(rows: list[dict[str, object]], metric: str) -> dict[tuple[str, str], Tensor]:
    """(regime, model) → (seeds, evals) tensor of one metric."""
    by_key: dict[tuple[str, str], dict[object, list[float]]] = {}
    for row in rows:
        by_key.setdefault((row["regime"], row["model"]), {}).setdefault(row["seed"], []).append(row[metric])
    return {k: torch.tensor(list(v.values()), dtype=torch.float64) for k, v in by_key.items()}


def summarize(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Final-step mean and sample std (ddof 1; 0 for one seed) over seeds, per (regime, model)."""
    out = []
    metrics = {m: _group(rows, m) for m in ("true_q_error", "bellman_residual")}
    steps = sorted({int(r["step"]) for r in rows})
    for regime, model in metrics["true_q_error"]:
        row: dict[str, object] = {"regime": regime, "model": model, "step": steps[-1]}
        for m, groups in metrics.items():
            final = groups[(regime, model)][:, -1]
            row[f"{m}_mean"] = float(final.mean())
            row[f"{m}_std"] = float(final.std()) if final.numel() > 1 else 0.0
        out.append(row)
    return out


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """2×2: rows = regime, columns = metric; mean over seeds with a min–max band, log-y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = torch.tensor(sorted({int(r["step"]) for r in rows}))
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    colours = plt.get_cmap("viridis")(torch.linspace(0.0, 0.9, max(len(models) - 1, 1)).tolist())
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, (metric, label) in enumerate((("true_q_error", "true-Q error (d_π-weighted RMS)"),
                                           ("bellman_residual", "Bellman residual (RMS over all (s, a))"))):
        groups = _group(rows, metric)
        for row_i, regime in enumerate(REGIMES):
            ax = axes[row_i, col]
            for m_i, model in enumerate(models):
                vals = groups[(regime, model)]
                colour = "black" if model == "dense" else colours[m_i - 1]
                ax.plot(steps, vals.mean(0), color=colour, lw=2.0 if model == "dense" else 1.3, label=model)
                ax.fill_between(steps, vals.min(0).values, vals.max(0).values, color=colour, alpha=0.15, lw=0)
            ax.set_yscale("log")
            ax.set_title(f"{regime}: {label}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if row_i == 1:
                ax.set_xlabel("gradient step")
    axes[0, 0].legend(fontsize=8, ncol=2)
    fig.suptitle("Chain MDP (15 states, γ=0.97): dense vs LoRA critics; mean over seeds, band = min–max")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    defaults = ChainConfig()
    parser = _OneLineParser(prog="python -m fasttd3_lora.experiments.chain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--steps", type=_positive_int, default=defaults.steps)
    parser.add_argument("--eval-every", type=_positive_int, default=defaults.eval_every)
    parser.add_argument("--seeds", type=_positive_int, default=defaults.num_seeds, help="number of seeds")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--workers", type=_positive_int, default=min(cores, len(REGIMES)),
                        help="processes, one regime each (default: min(cores, 2))")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch intra-op threads per worker (default: cores // workers, at least 1)")
    args = parser.parse_args(argv)
    if args.steps % args.eval_every:
        parser.error(f"--steps {args.steps} must be a multiple of --eval-every {args.eval_every}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {str(args.out)!r} exists and is not a directory")
    cfg = dataclasses.replace(defaults, steps=args.steps, eval_every=args.eval_every, num_seeds=args.seeds)
    threads = args.threads or max(1, cores // args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = run(cfg, args.workers, threads)
    wall = time.perf_counter() - start
    write_csv(args.out / "chain_results.csv", rows)
    write_csv(args.out / "chain_summary.csv", summarize(rows))
    plot(rows, args.out / "chain_results.png")
    print(f"chain: {len(rows)} rows in {wall:.1f} s ({args.workers} worker(s) x {threads} thread(s)) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
