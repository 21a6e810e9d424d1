"""SAC with a categorical SimbaV2 / Sparse / hyperspherical-LoRA critic (DESIGN §2, §3, §5).

The losses are written here rather than taken from TorchRL (DESIGN §9: `SACLoss` regresses a scalar Q,
re-draws copied critics' weights and makes frozen buffers trainable). One `SAC.update` follows the official
SimbaV2 agent (dojeon-ai/SimbaV2, scale_rl/agents/simbaV2): actor, temperature (from the actor step's
entropy), critic (target built with the *new* actor and temperature), target EMA; every actor and critic
optimiser step is followed by the hyperspherical projection (Eq. 8 / Eqs. 11-13).

Learning rates: actor, critic and temperature all decay linearly from `lr_init` to `lr_final` over
`total_updates`, as SimbaV2's code does (its temperature optimiser uses the same `optax.linear_schedule`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from tensordict import TensorDict
from torch import Tensor, nn
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR

from fasttd3_lora.algo_config import OffPolicyConfig
from fasttd3_lora.checks import ConfigError, boolean, get, number_in, positive
from fasttd3_lora.distributional import (
    categorical_loss,
    categorical_projection,
    select_min_target,
)
from fasttd3_lora.hypersphere import project_
from fasttd3_lora.networks import (
    CategoricalCritic,
    TanhGaussianActor,
    convert_blocks_to_lora_,
    dense_target,
    optimizer_groups,
    polyak_update_,
)
from fasttd3_lora.normalization import RewardNormalizer, RunningMeanStd

__all__ = [
    "SACConfig",
    "discount_from_horizon",
    "linear_lr_factor",
    "critic_target",
    "critic_loss",
    "actor_loss",
    "temperature_loss",
    "SAC",
]

def discount_from_horizon(max_episode_steps: int, action_repeat: int) -> float:
    """SimbaV2's discount heuristic (DESIGN §5): `clip((T/5 - 1)/(T/5), 0.95, 0.995)`, T = steps / repeat."""
    if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be a positive int, got {max_episode_steps!r}")
    if isinstance(action_repeat, bool) or not isinstance(action_repeat, int) or action_repeat < 1:
        raise ValueError(f"action_repeat must be a positive int, got {action_repeat!r}")
    horizon = max_episode_steps / action_repeat / 5.0
    return float(min(max((horizon - 1.0) / horizon, 0.95), 0.995))


@dataclasses.dataclass(frozen=True)
class SACConfig(OffPolicyConfig):
    """Every knob of the SAC agent; the values live in `configs/` (algo/sac, critic/*, scale/*) only.

    The shared fields come from `OffPolicyConfig`, the critic's from `CriticSettings`; these are SAC's own.
    `discount=None` means "derive it from the task's horizon" (`from_hydra` does, from `task.max_episode_steps`;
    the agent itself needs a number).
    """

    name: ClassVar[str] = "sac"

    temperature_init: float
    target_entropy_per_action_dim: float
    discount: float | None
    compile: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature_init > 0:
            raise ValueError(f"SACConfig.temperature_init must be > 0, got {self.temperature_init!r}")
        if self.discount is not None and not 0.0 <= self.discount < 1.0:
            raise ValueError(f"SACConfig.discount must be None or in [0, 1), got {self.discount!r}")

    @classmethod
    def hydra_values(cls, cfg: DictConfig) -> dict[str, Any]:
        """`cfg.algo`, with a null `algo.discount` derived from the task's horizon (DESIGN §5)."""
        values = super().hydra_values(cfg)
        if values["discount"] is None:
            values["discount"] = discount_from_horizon(int(cfg.task.max_episode_steps), int(values["action_repeat"]))
        return values

    @classmethod
    def check_keys(cls, cfg: DictConfig) -> None:
        super().check_keys(cfg)
        batch, buffer = cfg.algo.batch_size, cfg.algo.buffer_size
        if batch > buffer:  # SAC's buffer counts transitions; FastTD3's counts steps per env
            raise ConfigError(f"algo.batch_size={batch}: allowed at most algo.buffer_size ({buffer})")
        positive(cfg, "algo.temperature_init")
        number_in(cfg, "algo.target_entropy_per_action_dim", -math.inf, math.inf, lo_open=True, hi_open=True)
        if get(cfg, "algo.discount") is not None:
            number_in(cfg, "algo.discount", 0.0, 1.0, lo_open=False, hi_open=True)
        boolean(cfg, "algo.compile")


def linear_lr_factor(step: int, total: int, lr_init: float, lr_final: float) -> float:
    """Multiplier of `lr_init` at update `step`: linear to `lr_final / lr_init` at `total`, flat after
    (`optax.linear_schedule`, as SimbaV2)."""
    frac = min(step, total) / total
    return 1.0 + frac * (lr_final / lr_init - 1.0)


# ---------------------------------------------------------------------------------------------- losses


def critic_target(
    target_logits: Tensor,
    next_log_prob: Tensor,
    reward: Tensor,
    terminated: Tensor,
    temperature: Tensor,
    discount: float,
    atoms: Tensor,
) -> Tensor:
    """Categorical SAC target (DESIGN §2): the (min-Q, if twin) target distribution at (s', a'), shifted to
    `clip(r + γ (1 - terminated) (z_k - α log π(a'|s')), v_min, v_max)` and projected onto the atoms.

    target_logits (E, N, K); next_log_prob, reward, terminated (N,); returns (N, K) float32, no gradient.
    Truncation is not in `terminated`, so a time-out bootstraps.
    """
    probs = select_min_target(target_logits, atoms)
    discounts = discount * (1.0 - terminated.float())
    bonus = (temperature.detach() * next_log_prob.detach()).float()
    return categorical_projection(probs, reward, discounts, atoms, bonus)


def critic_loss(
    critic: CategoricalCritic,
    target_critic: nn.Module,
    actor: TanhGaussianActor,
    obs: Tensor,
    action: Tensor,
    reward: Tensor,
    next_obs: Tensor,
    terminated: Tensor,
    temperature: Tensor,
    discount: float,
    noise: Tensor,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the critic(s) against the categorical SAC target (DESIGN §2; twin: sum of both).

    obs / next_obs already normalised, reward already scaled; `actor` and `temperature` are the ones just
    updated (DESIGN §5 order). Returns (loss, Q of the batch (E, N), detached).
    """
    with torch.no_grad():
        next_action, next_log_prob = actor(next_obs, noise)
        target_logits = target_critic(next_obs, next_action)
        target = critic_target(target_logits, next_log_prob, reward, terminated, temperature, discount, critic.atoms)
    logits = critic(obs, action)
    return categorical_loss(logits, target), critic.q_value(logits.detach())


def actor_loss(
    actor: TanhGaussianActor, critic: CategoricalCritic, obs: Tensor, temperature: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor]:
    """`E[α log π(a|s) - min_e Q_e(s, a)]` with reparameterised a (clipped double Q when E = 2).

    Returns (loss, log π (N,)); the caller back-propagates into the actor's parameters only.
    """
    action, log_prob = actor(obs, noise)
    q = critic.q_value(critic(obs, action)).min(dim=0).values
    return (temperature.detach() * log_prob - q).mean(), log_prob


def temperature_loss(log_temperature: Tensor, entropy: Tensor, target_entropy: float) -> Tensor:
    """`α (H - H_target)` with α = exp(log α) and H the actor step's (detached) entropy estimate: gradient
    descent lowers α while the policy is more random than the target and raises it otherwise (SimbaV2)."""
    return log_temperature.exp() * (entropy.detach() - target_entropy)


# ----------------------------------------------------------------------------------------------- agent


class SAC:
    """SAC agent of DESIGN §5 with a categorical critic of `cfg.critic_kind`.

    `generator` drives every random draw of the agent after construction (action noise in `act` and
    `update`); it lives on any device and its state is part of `state_dict()`. Network weights are drawn at
    construction from torch's global RNG (as `make_critic` does), so seed that first.
    """

    def __init__(
        self,
        cfg: SACConfig,
        obs_dim: int,
        act_dim: int,
        num_envs: int,
        total_updates: int,
        device: torch.device | str,
        generator: torch.Generator,
    ) -> None:
        if cfg.discount is None:
            raise ValueError("SAC needs cfg.discount set (SACConfig.from_hydra derives a null one from the horizon)")
        for name, value in (("obs_dim", obs_dim), ("act_dim", act_dim), ("num_envs", num_envs),
                            ("total_updates", total_updates)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SAC: {name} must be a positive int, got {value!r}")
        self.cfg = cfg
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.total_updates = total_updates
        self.device = torch.device(device)
        self.generator = generator
        self.discount = float(cfg.discount)
        self.target_entropy = cfg.target_entropy_per_action_dim * act_dim
        self.num_updates = 0
        # Dense warm-up (paper Figure 4): a dense critic until this update, then its blocks become LoRA.
        warm = cfg.critic_kind == "lora" and cfg.warmup_fraction > 0
        self.warmup_updates = int(round(cfg.warmup_fraction * total_updates)) if warm else 0

        self.actor = TanhGaussianActor(obs_dim, act_dim, cfg.actor_hidden_dim, cfg.actor_num_blocks).to(self.device)
        kind = "simbav2" if self.warmup_updates > 0 else cfg.critic_kind
        self.critic = cfg.make_critic(
            obs_dim, act_dim, cfg.num_atoms, cfg.v_min, cfg.v_max, cfg.num_critics, kind=kind
        ).to(self.device)
        self.target_critic = dense_target(self.critic)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature_init), device=self.device))
        self.obs_rms = RunningMeanStd(obs_dim).to(self.device)
        # SimbaV2 ties the reward scale's return bound to the critic's support (normalized_g_max = v_max).
        self.reward_normalizer = RewardNormalizer(num_envs, self.discount, g_max=cfg.v_max).to(self.device)

        self.actor_optimizer = self._adam([{"params": list(self.actor.parameters())}])
        self.temperature_optimizer = self._adam([{"params": [self.log_temperature]}])
        self.critic_optimizer = self._critic_optimizer()
        self.actor_scheduler = self._scheduler(self.actor_optimizer)
        self.temperature_scheduler = self._scheduler(self.temperature_optimizer)
        self.critic_scheduler = self._scheduler(self.critic_optimizer)

        self._actor_loss = torch.compile(actor_loss) if cfg.compile else actor_loss
        self._critic_loss = torch.compile(critic_loss) if cfg.compile else critic_loss

    # -- construction helpers
    def _adam(self, groups: list[dict[str, Any]]) -> torch.optim.AdamW:
        """AdamW at lr_init; weight decay 0 unless a group sets it (then it is Adam, DESIGN §5). Fused: one
        kernel over all tensors, 8x faster than the default per-tensor loop on CPU for the base critic
        (3 vs 24 ms a step, benchmarks/sac_update.py's machine)."""
        for group in groups:
            group.setdefault("weight_decay", 0.0)
        return torch.optim.AdamW(groups, lr=self.cfg.lr_init, weight_decay=0.0, fused=True)

    def _critic_optimizer(self) -> torch.optim.AdamW:
        """Two groups (DESIGN §3): the LoRA adapters A, B with `lora_weight_decay`, everything else without."""
        return self._adam(optimizer_groups(self.critic, self.cfg.lora_weight_decay))

    def _scheduler(self, optimizer: torch.optim.Optimizer, start: int = 0) -> LambdaLR:
        """Linear lr_init -> lr_final over `total_updates`; `start` updates already done (rebuilt optimiser)."""
        cfg = self.cfg
        return LambdaLR(
            optimizer, lambda step: linear_lr_factor(step + start, self.total_updates, cfg.lr_init, cfg.lr_final)
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp_bf16)

    def _noise(self, *shape: int) -> Tensor:
        noise = torch.randn(shape, generator=self.generator, device=self.generator.device)
        return noise.to(self.device)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.detach().exp()

    @property
    def lora_converted(self) -> bool:
        """True once a dense warm-up critic has been turned into a LoRA one."""
        return self.warmup_updates > 0 and self.num_updates >= self.warmup_updates

    def _convert_to_lora(self) -> None:
        """End of dense warm-up: freeze the block matrices as W0 (rows rescaled), fresh adapters, and a new critic
        optimiser / schedule that continues at the current update. The dense target continues its EMA."""
        cfg = self.cfg
        convert_blocks_to_lora_(
            self.critic, cfg.lora_rank, cfg.lora_alpha, cfg.lora_base_init_scale, project=cfg.lora_project
        )
        self.critic_optimizer = self._critic_optimizer()
        self.critic_scheduler = self._scheduler(self.critic_optimizer, start=self.warmup_updates)

    # -- acting
    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        """Raw observations (N, obs_dim) -> actions (N, act_dim) in (-1, 1), normalised with current stats."""
        obs = self.obs_rms.normalize(obs.to(self.device))
        with self._autocast():
            if deterministic:
                return self.actor.deterministic_action(obs).float()
            return self.actor(obs, self._noise(obs.shape[0], self.act_dim))[0]

    @torch.no_grad()
    def record(self, obs: Tensor, reward: Tensor, done: Tensor) -> None:
        """Fold one vector-env step into the statistics: `obs` (num_envs, obs_dim) the observations the env
        returned, `reward` (num_envs,), `done` (num_envs,) = terminated or truncated (DESIGN §1, §5)."""
        self.obs_rms.update(obs.to(self.device))
        self.reward_normalizer.update(reward.to(self.device), done.to(self.device))

    # -- learning
    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        """One SAC update in DESIGN §5 order: actor, temperature, critic (new actor and temperature), target EMA.

        `batch` holds raw sampled transitions (observation, action, reward, next_observation, terminated);
        observations are normalised and rewards scaled here with the current statistics. Metrics are
        detached 0-d tensors (no host sync).
        """
        if self.warmup_updates > 0 and self.num_updates == self.warmup_updates:
            self._convert_to_lora()
        batch = batch.to(self.device)
        obs = self.obs_rms.normalize(batch["observation"])
        next_obs = self.obs_rms.normalize(batch["next_observation"])
        reward = self.reward_normalizer.scale(batch["reward"])
        noise = self._noise(2, obs.shape[0], self.act_dim)  # [0]: actor step, [1]: target actions
        lr = torch.tensor(self.critic_optimizer.param_groups[0]["lr"])

        # 1. actor, with the current critic and temperature
        with self._autocast():
            a_loss, log_prob = self._actor_loss(self.actor, self.critic, obs, self.temperature, noise[0])
        self.actor_optimizer.zero_grad(set_to_none=True)
        a_loss.backward(inputs=list(self.actor.parameters()))  # the critic gets no gradient from this loss
        self.actor_optimizer.step()
        self.actor_scheduler.step()
        project_(self.actor)

        # 2. temperature, from the actor step's entropy estimate
        entropy = -log_prob.detach().mean()
        t_loss = temperature_loss(self.log_temperature, entropy, self.target_entropy)
        self.temperature_optimizer.zero_grad(set_to_none=True)
        t_loss.backward()
        self.temperature_optimizer.step()
        self.temperature_scheduler.step()

        # 3. critic, target built with the new actor and the new temperature
        with self._autocast():
            c_loss, q = self._critic_loss(
                self.critic, self.target_critic, self.actor, obs, batch["action"], reward, next_obs,
                batch["terminated"], self.temperature, self.discount, noise[1],
            )  # fmt: skip
        self.critic_optimizer.zero_grad(set_to_none=True)
        c_loss.backward()
        self.critic_optimizer.step()
        self.critic_scheduler.step()
        project_(self.critic)

        # 4. target EMA of the (effective) weights
        polyak_update_(self.target_critic, self.critic, self.cfg.tau)
        self.num_updates += 1
        return {
            "critic_loss": c_loss.detach(),
            "actor_loss": a_loss.detach(),
            "temperature_loss": t_loss.detach(),
            "temperature": self.temperature,
            "q_mean": q.mean(),
            "entropy": entropy,
            "lr": lr,
        }

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (tensors and plain containers: loadable with weights_only=True)."""
        return {
            "num_updates": self.num_updates,
            "lora_converted": self.lora_converted,
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "log_temperature": self.log_temperature.detach().clone(),
            "obs_rms": self.obs_rms.state_dict(),
            "reward_normalizer": self.reward_normalizer.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "temperature_optimizer": self.temperature_optimizer.state_dict(),
            "actor_scheduler": self.actor_scheduler.state_dict(),
            "critic_scheduler": self.critic_scheduler.state_dict(),
            "temperature_scheduler": self.temperature_scheduler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` into an agent built with the same config and sizes."""
        num_updates = int(state["num_updates"])
        if bool(state["lora_converted"]) and not self.lora_converted:
            if self.warmup_updates == 0:
                raise ValueError("load_state_dict: the checkpoint's critic was converted to LoRA after dense warm-up, "
                                 "but this agent has no warm-up (warmup_fraction 0)")  # fmt: skip
            self._convert_to_lora()
        self.num_updates = num_updates
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"])
        self.obs_rms.load_state_dict(state["obs_rms"])
        self.reward_normalizer.load_state_dict(state["reward_normalizer"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.temperature_optimizer.load_state_dict(state["temperature_optimizer"])
        self.actor_scheduler.load_state_dict(state["actor_scheduler"])
        self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.temperature_scheduler.load_state_dict(state["temperature_scheduler"])
        self.generator.set_state(state["generator"])
