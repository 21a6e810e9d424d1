"""FastTD3 with a categorical SimbaV2 / Sparse / hyperspherical-LoRA critic (DESIGN §1-§3, §6).

FastTD3's recipe (Seo et al. 2025; younggyoseo/FastTD3) on the SimbaV2 networks of DESIGN §1: a deterministic
`tanh` actor, twin categorical critics (clipped double Q on the target), no target actor (next actions are the
online actor's plus clipped target-policy noise), τ = 0.1 after every critic update, a delayed actor update (every
`policy_frequency` critic updates on the same batch, FastTD3's value 2), per-env exploration noise scales drawn
from U(std_min, std_max) and re-drawn when an env's episode ends, running observation normalisation (also of the
critic's observations when asymmetric), raw (unnormalised) n-step rewards, cosine learning rates, bf16 autocast
and `torch.compile`. Where DESIGN and FastTD3's code differ, DESIGN wins: every actor and critic optimiser step is
followed by the hyperspherical projection (Eq. 8 / Eqs. 11-13), and weight decay applies to the LoRA adapters
only (FastTD3 decays everything by 0.1).

Learning rates are 0-d tensors inside the optimisers, changed in place from a pure function of the update count
(`cosine_lr`): a compiled optimiser step reads the tensor, so a new value is not a new constant to recompile for,
and an exact resume needs only the count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from fasttd3_lora.algo_config import OffPolicyConfig
from fasttd3_lora.distributional import categorical_loss, categorical_projection, select_min_target
from fasttd3_lora.hypersphere import project_
from fasttd3_lora.networks import (
    CategoricalCritic,
    DeterministicActor,
    dense_target,
    optimizer_groups,
    polyak_update_,
)
from fasttd3_lora.normalization import RunningMeanStd

__all__ = [
    "ACTOR_Q",
    "COMPILE_MODES",
    "FastTD3Config",
    "cosine_lr",
    "target_action",
    "critic_loss",
    "actor_loss",
    "exploration_std",
    "FastTD3",
]

# The algo keys a task family sets under task.fasttd3 (configs/algo/fasttd3.yaml interpolates exactly these).
FAMILY_KEYS = ("action_repeat", "updates_per_step", "batch_size", "buffer_size", "n_step", "num_atoms", "v_min", "v_max")
ACTOR_Q = ("mean", "min")  # how the actor combines the twin critics' Q (DESIGN §2, §6)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")

GradSync = Callable[[Sequence[nn.Parameter]], None]


@dataclasses.dataclass(frozen=True)
class FastTD3Config(OffPolicyConfig):
    """Every knob of the FastTD3 agent; the values live in `configs/` only (algo/fasttd3, critic/*, scale/*,
    and a task family's `task.fasttd3.*`).

    `configs/algo/fasttd3.yaml` holds the Isaac Lab locomotion defaults; a task family's file sets its own values
    under `task.fasttd3` (updates per step, n-step, atom support, per-env buffer size, ...), which the algo keys
    take by interpolation, so every number has one home per family and `algo.<key>=` still overrides.
    `buffer_size` counts steps per env (the ring of each env), `batch_size` transitions over all envs.
    """

    name: ClassVar[str] = "fasttd3"

    n_step: int
    gamma: float
    policy_frequency: int
    policy_noise: float
    noise_clip: float
    std_min: float
    std_max: float
    std_anneal: bool
    use_cdq: bool
    actor_q: str | None
    compile_mode: str | None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_step", "policy_frequency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FastTD3Config.{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"FastTD3Config.gamma must be in [0, 1), got {self.gamma!r}")
        if self.policy_noise < 0 or self.noise_clip < 0:
            raise ValueError(
                f"FastTD3Config policy_noise and noise_clip must be >= 0, got {self.policy_noise!r}, {self.noise_clip!r}"
            )
        if not 0.0 <= self.std_min <= self.std_max:
            raise ValueError(f"FastTD3Config needs 0 <= std_min <= std_max, got {self.std_min!r}, {self.std_max!r}")
        if self.actor_q is not None and self.actor_q not in ACTOR_Q:
            raise ValueError(f"FastTD3Config.actor_q must be None or one of {ACTOR_Q}, got {self.actor_q!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"FastTD3Config.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.warmup_fraction:
            raise ValueError(
                f"FastTD3Config.warmup_fraction={self.warmup_fraction!r}: dense warm-up is implemented for SAC only; "
                "allowed: 0 or null"
            )



# ------------------------------------------------------------------------------------------- pure math


def cosine_lr(step: int, total: int, lr_init: float, lr_final: float) -> float:
    """Cosine decay `lr_final + (lr_init - lr_final) (1 + cos(pi min(step, total) / total)) / 2` (FastTD3's
    `CosineAnnealingLR` to `eta_min`): lr_init at step 0, lr_final from `total` on."""
    frac = min(step, total) / total
    return lr_final + 0.5 * (lr_init - lr_final) * (1.0 + math.cos(math.pi * frac))


def target_action(
    actor: DeterministicActor, next_obs: Tensor, noise: Tensor, policy_noise: float, noise_clip: float
) -> Tensor:
    """TD3 target-policy smoothing with FastTD3's twist of no target actor: the ONLINE actor's action at s' plus
    `clip(policy_noise * noise, -noise_clip, noise_clip)`, clipped to the action box [-1, 1]. `noise` ~ N(0, 1)."""
    smoothing = (noise * policy_noise).clamp(-noise_clip, noise_clip)
    return (actor(next_obs).float() + smoothing).clamp(-1.0, 1.0)


def critic_loss(
    critic: CategoricalCritic,
    target_critic: nn.Module,
    actor: DeterministicActor,
    critic_obs: Tensor,
    action: Tensor,
    reward: Tensor,
    next_obs: Tensor,
    next_critic_obs: Tensor,
    discount: Tensor,
    noise: Tensor,
    policy_noise: float,
    noise_clip: float,
    use_cdq: bool = True,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the critic(s) against the categorical TD3 target (DESIGN §2, bonus 0), shifted to
    `r + discount z_k`, clipped and projected: with `use_cdq` (clipped double Q) every critic learns the target
    critic's distribution at (s', a') with the smaller expected value; without, each critic its own target
    critic's. `reward` is the raw n-step sum, `discount` = `gamma^k (1 - terminated)` per sample (a time-out
    bootstraps); observations already normalised. Returns (loss summed over critics, Q (E, N) detached)."""
    with torch.no_grad():
        next_action = target_action(actor, next_obs, noise, policy_noise, noise_clip)
        target_logits = target_critic(next_critic_obs, next_action)
        if use_cdq:
            target = categorical_projection(select_min_target(target_logits, critic.atoms), reward, discount,
                                            critic.atoms)  # fmt: skip
        else:  # one projection per critic, as one batch of E * N rows
            e, n, k = target_logits.shape
            probs = torch.softmax(target_logits.float(), dim=-1).reshape(e * n, k)
            target = categorical_projection(probs, reward.repeat(e), discount.repeat(e), critic.atoms).reshape(e, n, k)
    logits = critic(critic_obs, action)
    return categorical_loss(logits, target), critic.q_value(logits.detach())


def actor_loss(
    actor: DeterministicActor, critic: CategoricalCritic, obs: Tensor, critic_obs: Tensor, actor_q: str
) -> Tensor:
    """`-E[Q(s, actor(s))]` with Q the mean (FastTD3) or the min (clipped double Q) of the critics' expected
    values (DESIGN §2); the caller back-propagates into the actor's parameters only."""
    q = critic.q_value(critic(critic_obs, actor(obs)))  # (E, N)
    q = q.mean(dim=0) if actor_q == "mean" else q.min(dim=0).values
    return -q.mean()


def exploration_std(draws: Tensor, std_min: float, std_max: float) -> Tensor:
    """Per-env noise scale `std_min + u (std_max - std_min)` from uniform draws u in [0, 1): U(std_min, std_max)."""
    return std_min + draws * (std_max - std_min)


# ----------------------------------------------------------------------------------------------- agent


class FastTD3:
    """FastTD3 agent of DESIGN §6 with a categorical critic of `cfg.critic_kind`.

    `critic_obs_dim` None: the critic sees the actor's observations; an int: asymmetric critic observations
    (normalised by their own running statistics). `generator` drives every random draw after construction
    (exploration noise scales and noise, target-policy noise) and is part of `state_dict()`; network weights are
    drawn at construction from torch's global RNG (as `make_critic` does), so seed that first. `grad_sync(params)`
    runs between each backward and its optimiser step (DDP passes an all-reduce of the gradients).
    """

    def __init__(
        self,
        cfg: FastTD3Config,
        obs_dim: int,
        act_dim: int,
        critic_obs_dim: int | None,
        num_envs: int,
        total_updates: int,
        device: torch.device | str,
        generator: torch.Generator,
        grad_sync: GradSync | None = None,
    ) -> None:
        for name, value in (("obs_dim", obs_dim), ("act_dim", act_dim), ("num_envs", num_envs),
                            ("total_updates", total_updates)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FastTD3: {name} must be a positive int, got {value!r}")
        if critic_obs_dim is not None and (isinstance(critic_obs_dim, bool) or not isinstance(critic_obs_dim, int)
                                           or critic_obs_dim < 1):  # fmt: skip
            raise ValueError(f"FastTD3: critic_obs_dim must be None or a positive int, got {critic_obs_dim!r}")
        self.cfg = cfg
        # The actor objective follows the target (FastTD3: min with clipped double Q, else the mean) unless set.
        self.actor_q = cfg.actor_q or ("min" if cfg.use_cdq else "mean")
        self.obs_dim, self.act_dim, self.critic_obs_dim = obs_dim, act_dim, critic_obs_dim
        self.num_envs = num_envs
        self.total_updates = total_updates
        self.device = torch.device(device)
        self.generator = generator
        self.grad_sync = grad_sync
        self.num_updates = 0

        self.actor = DeterministicActor(obs_dim, act_dim, cfg.actor_hidden_dim, cfg.actor_num_blocks).to(self.device)
        critic_in = obs_dim if critic_obs_dim is None else critic_obs_dim
        self.critic = cfg.make_critic(critic_in, act_dim, cfg.num_atoms, cfg.v_min, cfg.v_max, cfg.num_critics)
        self.critic = self.critic.to(self.device)
        self.target_critic = dense_target(self.critic)
        self.obs_rms = RunningMeanStd(obs_dim).to(self.device)
        self.critic_obs_rms = None if critic_obs_dim is None else RunningMeanStd(critic_obs_dim).to(self.device)
        # u ~ U(0, 1) per env; the scale is exploration_std(u, ...) so the anneal moves every env's scale at once.
        self.noise_draws = self._uniform(num_envs)

        # Learning rates as 0-d tensors (see the module docstring); one tensor per optimiser, shared by its groups.
        self.actor_optimizer = torch.optim.AdamW(
            [{"params": list(self.actor.parameters()), "weight_decay": 0.0}], lr=self._lr_tensor()
        )
        self.critic_optimizer = torch.optim.AdamW(
            optimizer_groups(self.critic, cfg.lora_weight_decay), lr=self._lr_tensor()
        )

        self._critic_step = self._compiled(self._critic_step_eager)
        self._actor_step = self._compiled(self._actor_step_eager)

    # -- construction helpers
    def _lr_tensor(self) -> Tensor:
        return torch.tensor(self.cfg.lr_init, dtype=torch.float32, device=self.device)

    def _compiled(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        mode = self.cfg.compile_mode
        return fn if mode is None else torch.compile(fn, mode=mode)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp_bf16)

    def _normal(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device).to(self.device)

    def _uniform(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self.generator.device).to(self.device)

    # -- exploration
    @property
    def std_max_now(self) -> float:
        """Upper end of the noise-scale range: std_max, or with `std_anneal` decaying linearly from std_max to
        std_min over `total_updates` (our reading of the paper's linear anneal)."""
        cfg = self.cfg
        if not cfg.std_anneal:
            return cfg.std_max
        frac = min(self.num_updates, self.total_updates) / self.total_updates
        return cfg.std_max + frac * (cfg.std_min - cfg.std_max)

    @property
    def noise_std(self) -> Tensor:
        """Current per-env exploration noise scale (num_envs,)."""
        return exploration_std(self.noise_draws, self.cfg.std_min, self.std_max_now)

    @torch.no_grad()
    def on_episode_end(self, done_mask: Tensor) -> None:
        """Re-draw the noise scale of the envs whose episode ended (`done_mask` (num_envs,), terminated or
        truncated); the others keep theirs. No host sync (a masked select of fresh draws, as FastTD3)."""
        if done_mask.shape != (self.num_envs,):
            raise ValueError(f"done_mask must have shape ({self.num_envs},), got {tuple(done_mask.shape)}")
        fresh = self._uniform(self.num_envs)
        self.noise_draws = torch.where(done_mask.to(self.device, torch.bool), fresh, self.noise_draws)

    # -- acting
    @torch.no_grad()
    def act(self, obs: Tensor, explore: bool = True) -> Tensor:
        """Raw observations (N, obs_dim) -> actions (N, act_dim) in [-1, 1], normalised with current statistics.
        With `explore` (N must be num_envs) each env's action gets Gaussian noise of its own scale, then is
        clipped to the action box; without, the deterministic action (evaluation)."""
        obs = self.obs_rms.normalize(obs.to(self.device))
        with self._autocast():
            action = self.actor(obs).float()
        if not explore:
            return action
        if obs.shape[0] != self.num_envs:
            raise ValueError(f"act(explore=True) needs one row per env ({self.num_envs}), got {obs.shape[0]} rows")
        noise = self._normal(self.num_envs, self.act_dim) * self.noise_std.unsqueeze(1)
        return (action + noise).clamp(-1.0, 1.0)

    @torch.no_grad()
    def record(self, obs: Tensor, critic_obs: Tensor | None = None) -> None:
        """Fold collected observations into the running statistics (DESIGN §1); `critic_obs` exactly when the
        critic's observations are asymmetric. Rewards are not normalised (DESIGN §6)."""
        if (critic_obs is None) != (self.critic_obs_rms is None):
            raise ValueError(
                f"record: critic_obs must be given exactly when the agent has critic_obs_dim (here "
                f"{self.critic_obs_dim!r}), got {'None' if critic_obs is None else 'a tensor'}"
            )
        self.obs_rms.update(obs.to(self.device))
        if self.critic_obs_rms is not None:
            self.critic_obs_rms.update(critic_obs.to(self.device))

    # -- learning
    def actor_update_due(self) -> bool:
        """Whether the next update should also step the actor: every `policy_frequency`-th critic update (with 2,
        the 2nd, 4th, ...; FastTD3's `i % policy_frequency == 1` over its updates of a step)."""
        return (self.num_updates + 1) % self.cfg.policy_frequency == 0

    def lr(self) -> float:
        """Learning rate of the next update (actor and critic)."""
        return cosine_lr(self.num_updates, self.total_updates, self.cfg.lr_init, self.cfg.lr_final)

    def _sync_grads(self, net: nn.Module) -> None:
        if self.grad_sync is not None:
            self.grad_sync([p for p in net.parameters() if p.grad is not None])

    def _critic_step_eager(
        self, critic_obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor, next_critic_obs: Tensor,
        discount: Tensor, noise: Tensor,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        cfg = self.cfg
        with self._autocast():
            loss, q = critic_loss(
                self.critic, self.target_critic, self.actor, critic_obs, action, reward, next_obs, next_critic_obs,
                discount, noise, cfg.policy_noise, cfg.noise_clip, cfg.use_cdq,
            )  # fmt: skip
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._sync_grads(self.critic)
        self.critic_optimizer.step()
        return loss.detach(), q

    def _actor_step_eager(self, obs: Tensor, critic_obs: Tensor) -> Tensor:
        with self._autocast():
            loss = actor_loss(self.actor, self.critic, obs, critic_obs, self.actor_q)
        self.actor_optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.actor.parameters()))  # the critic gets no gradient from this loss
        self._sync_grads(self.actor)
        self.actor_optimizer.step()
        return loss.detach()

    def update(self, batch: TensorDict, update_actor: bool) -> dict[str, Tensor]:
        """One critic update, the target EMA, and with `update_actor` one actor update on the same batch.

        `batch` is an `NStepReplayBuffer.sample`: raw observation, action, reward (n-step sum), next_observation,
        discount (and the critic keys when asymmetric); observations are normalised here with the current
        statistics. Metrics are detached 0-d tensors (no host sync); `actor_loss` only when the actor stepped.
        """
        batch = batch.to(self.device)
        obs = self.obs_rms.normalize(batch["observation"])
        next_obs = self.obs_rms.normalize(batch["next_observation"])
        if self.critic_obs_rms is None:
            critic_obs, next_critic_obs = obs, next_obs
        else:
            critic_obs = self.critic_obs_rms.normalize(batch["critic_observation"])
            next_critic_obs = self.critic_obs_rms.normalize(batch["next_critic_observation"])
        noise = self._normal(obs.shape[0], self.act_dim)
        lr = self.lr()
        for optimizer in (self.critic_optimizer, self.actor_optimizer):
            for group in optimizer.param_groups:
                group["lr"].fill_(lr)

        c_loss, q = self._critic_step(
            critic_obs, batch["action"], batch["reward"], next_obs, next_critic_obs, batch["discount"], noise
        )
        project_(self.critic)
        polyak_update_(self.target_critic, self.critic, self.cfg.tau)
        metrics = {"critic_loss": c_loss, "q_mean": q.mean(), "lr": self.critic_optimizer.param_groups[0]["lr"].clone()}
        if update_actor:
            metrics["actor_loss"] = self._actor_step(obs, critic_obs)
            project_(self.actor)
        self.num_updates += 1
        return metrics

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (tensors and plain containers: loadable with weights_only=True)."""
        return {
            "num_updates": self.num_updates,
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "obs_rms": self.obs_rms.state_dict(),
            "critic_obs_rms": None if self.critic_obs_rms is None else self.critic_obs_rms.state_dict(),
            "noise_draws": self.noise_draws.clone(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` into an agent built with the same config and sizes."""
        if (state["critic_obs_rms"] is None) != (self.critic_obs_rms is None):
            raise ValueError("load_state_dict: the checkpoint's critic observations (a)symmetry differs from this agent's")
        if state["noise_draws"].shape != self.noise_draws.shape:
            raise ValueError(
                f"load_state_dict: checkpoint has {state['noise_draws'].shape[0]} envs, this agent {self.num_envs}"
            )
        self.num_updates = int(state["num_updates"])
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.obs_rms.load_state_dict(state["obs_rms"])
        if self.critic_obs_rms is not None:
            self.critic_obs_rms.load_state_dict(state["critic_obs_rms"])
        self.noise_draws = state["noise_draws"].to(self.device).clone()
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.generator.set_state(state["generator"])
