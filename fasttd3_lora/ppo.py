"""PPO for massively parallel envs (DESIGN §10; the rsl_rl recipe Isaac Lab users know), on MLP policies that can
carry LoRA adapters: the algorithm of the policy library (`fasttd3_lora.library`).

One iteration: a rollout of `num_steps` agent steps on every env, GAE over it (time-outs bootstrap from the value
of the true final observation), then `num_epochs` passes of `num_minibatches` minibatches each, minimising

    clipped surrogate + value_coef * clipped value loss - entropy_coef * entropy

with advantages normalised per minibatch, the gradient norm clipped at `max_grad_norm`, and (with `desired_kl`)
rsl_rl's adaptive learning rate: divided by 1.5 when a minibatch's KL(old || new) exceeds twice the target,
multiplied by 1.5 when it is under half of it. Observations are normalised by running statistics updated on the
collected observations; the rollout stores them normalised, so the ratio starts at exactly 1.

The losses are pure functions here and tested against TorchRL's GAE and `ClipPPOLoss` (tests/test_ppo.py). Not
TorchRL's loss module itself: its value loss is unclipped (rsl_rl clips it), its advantage is not normalised per
minibatch, and it draws the entropy from samples where a Gaussian has it in closed form.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from tensordict import TensorDict
from torch import Tensor, nn

from fasttd3_lora import gaussian
from fasttd3_lora.adapters import adapter_parameters
from fasttd3_lora.algo_config import AlgorithmConfig, check_positive_ints
from fasttd3_lora.checks import ConfigError, boolean, get, int_in, number_in, positive
from fasttd3_lora.library_store import Library, LibraryError
from fasttd3_lora.mlp_policy import GaussianPolicy, ValueFunction
from fasttd3_lora.normalization import RewardNormalizer, RunningMeanStd

__all__ = [
    "PPOConfig",
    "FULL",
    "gae",
    "clipped_surrogate_loss",
    "clipped_value_loss",
    "adapted_lr",
    "normalized",
    "minibatch_epochs",
    "PPO",
]

FULL = "full"  # library.rank=full: fine-tune every weight of the base (the baseline), not adapters
LR_BOUNDS = (1e-5, 1e-2)  # rsl_rl's adaptive learning rate stays in this range
KL_STEP = 1.5  # and moves by this factor


@dataclasses.dataclass(frozen=True)
class PPOConfig(AlgorithmConfig):
    """Every knob of PPO (`configs/algo/ppo.yaml`, a family's `task.ppo.*`) and of the policy library run
    (`library.*`: `library_path` None is plain PPO; `library_rank` None fine-tunes every weight)."""

    name: ClassVar[str] = "ppo"
    groups: ClassVar[tuple[str, ...]] = ("library",)

    num_steps: int  # agent steps per env per rollout
    num_epochs: int
    num_minibatches: int
    clip: float
    clip_value_loss: bool
    gamma: float
    gae_lambda: float
    value_coef: float
    entropy_coef: float
    lr: float
    desired_kl: float | None  # None: a fixed learning rate
    max_grad_norm: float
    init_std: float
    normalize_rewards: bool  # SimbaV2's reward scaling (DESIGN §5): DMC returns reach hundreds, the value clip is 0.2
    actor_hidden_dims: tuple[int, ...]
    critic_hidden_dims: tuple[int, ...]
    library_path: str | None
    library_base: str | None  # a PPO run that creates library_path when it does not exist yet (sweeps)
    library_rank: int | None
    library_alpha: float | None
    library_tasks: tuple[str, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, ("num_steps", "num_epochs", "num_minibatches"))
        for field, value in (("clip", self.clip), ("lr", self.lr), ("max_grad_norm", self.max_grad_norm),
                             ("init_std", self.init_std)):  # fmt: skip
            if not value > 0:
                raise ValueError(f"PPOConfig.{field} must be > 0, got {value!r}")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"PPOConfig.gamma must be in [0, 1), got {self.gamma!r}")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"PPOConfig.gae_lambda must be in [0, 1], got {self.gae_lambda!r}")
        if self.value_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"PPOConfig value_coef and entropy_coef must be >= 0, got {self.value_coef!r}, "
                             f"{self.entropy_coef!r}")  # fmt: skip
        if self.desired_kl is not None and not self.desired_kl > 0:
            raise ValueError(f"PPOConfig.desired_kl must be None or > 0, got {self.desired_kl!r}")
        for field in ("actor_hidden_dims", "critic_hidden_dims"):
            dims = getattr(self, field)
            if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
                raise ValueError(f"PPOConfig.{field} must be a non-empty list of positive ints, got {dims!r}")
        if self.num_envs * self.num_steps < self.num_minibatches:
            raise ValueError(f"PPOConfig: num_envs x num_steps = {self.num_envs * self.num_steps} transitions "
                             f"cannot fill num_minibatches={self.num_minibatches}")  # fmt: skip
        if self.library_rank is not None and (isinstance(self.library_rank, bool) or self.library_rank < 1):
            raise ValueError(f"PPOConfig.library_rank must be None (full) or an int >= 1, got {self.library_rank!r}")
        if self.library_tasks and self.num_envs % len(self.library_tasks):
            raise ValueError(f"algo.num_envs={self.num_envs}: allowed a multiple of the {len(self.library_tasks)} "
                             "library.tasks (each task gets the same number of envs)")  # fmt: skip
        if self.library_path is not None and self.library_rank is None and len(self.library_tasks) > 1:
            raise ValueError(f"library.rank={FULL}: full fine-tuning trains one copy of the base per run; allowed "
                             f"one task, got library.tasks={list(self.library_tasks)}")  # fmt: skip

    @property
    def num_tasks(self) -> int:
        return max(1, len(self.library_tasks))

    @property
    def has_library(self) -> bool:
        return self.library_path is not None

    @classmethod
    def group_fields(cls, cfg: DictConfig) -> dict[str, Any]:
        """`library.*`: where the base comes from, the adapters' rank and alpha, and the tasks of the run."""
        library = cfg.library
        rank = library.rank
        tasks = tuple(str(t) for t in library.tasks) if library.tasks else ()
        if library.path is not None and not tasks:
            tasks = (str(cfg.task.name),)
        return dict(
            library_path=None if library.path is None else str(library.path),
            library_base=None if library.get("base") is None else str(library.base),
            library_rank=None if rank == FULL else int(rank),
            library_alpha=None if library.alpha is None else float(library.alpha),
            library_tasks=tasks,
        )

    @classmethod
    def _group_field_names(cls) -> set[str]:
        return {"library_path", "library_base", "library_rank", "library_alpha", "library_tasks"}

    @classmethod
    def check_keys(cls, cfg: DictConfig) -> None:
        super().check_keys(cfg)
        for key in ("num_steps", "num_epochs", "num_minibatches"):
            int_in(cfg, f"algo.{key}", 1)
        for key in ("clip", "lr", "max_grad_norm", "init_std"):
            positive(cfg, f"algo.{key}")
        number_in(cfg, "algo.gamma", 0.0, 1.0, lo_open=False, hi_open=True)
        number_in(cfg, "algo.gae_lambda", 0.0, 1.0, lo_open=False, hi_open=False)
        for key in ("value_coef", "entropy_coef"):
            number_in(cfg, f"algo.{key}", 0.0, float("inf"), lo_open=False, hi_open=True)
        if get(cfg, "algo.desired_kl") is not None:
            positive(cfg, "algo.desired_kl")
        boolean(cfg, "algo.clip_value_loss")
        boolean(cfg, "algo.normalize_rewards")
        for key in ("actor_hidden_dims", "critic_hidden_dims"):
            dims = get(cfg, f"algo.{key}")
            if not (hasattr(dims, "__len__") and len(dims) and all(isinstance(d, int) and not isinstance(d, bool)
                                                                  and d >= 1 for d in dims)):  # fmt: skip
                raise ConfigError(f"algo.{key}={dims!r}: allowed a non-empty list of integers >= 1, e.g. [256,128]")
        path, rank = get(cfg, "library.path"), get(cfg, "library.rank")
        if path is not None and not (isinstance(path, str) and path):
            raise ConfigError(f"library.path={path!r}: allowed null or a policy library directory")
        if rank != FULL:
            int_in(cfg, "library.rank", 1, or_else=f" or {FULL}")
        if get(cfg, "library.alpha") is not None:
            positive(cfg, "library.alpha")
        tasks = get(cfg, "library.tasks")
        if tasks is not None and (isinstance(tasks, str) or not hasattr(tasks, "__len__") or not len(tasks)):
            raise ConfigError(f"library.tasks={tasks!r}: allowed null or a non-empty list of tasks, e.g. "
                              "[dmc/walker-walk,dmc/walker-run]")  # fmt: skip
        if tasks is not None and path is None:
            raise ConfigError(f"library.tasks={list(tasks)}: needs library.path (the library whose base the "
                              "adapters fine-tune)")  # fmt: skip
        base = get(cfg, "library.base")
        if base is not None and path is None:
            raise ConfigError(f"library.base={base}: needs library.path (the library it creates)")
        if path is not None and base is None:  # the library itself, before any run directory or env exists
            try:
                Library(path)
            except LibraryError as err:
                raise ConfigError(f"library.path={path}: {err}") from None


# ------------------------------------------------------------------------------------------- pure math


def gae(
    rewards: Tensor, values: Tensor, next_values: Tensor, terminated: Tensor, done: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a rollout, every input (T, N) (DESIGN §10):

        delta_t = r_t + gamma V(s_{t+1}) (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma lam (1 - done_t) A_{t+1}

    `next_values[t]` is the value of step t's true next observation (the final one where an episode ended), so a
    time-out (done, not terminated) bootstraps. Returns `(advantages, returns = advantages + values)`."""
    not_terminal = 1.0 - terminated.float()
    carry = gamma * lam * (1.0 - done.float())
    deltas = rewards + gamma * next_values * not_terminal - values
    advantages = torch.empty_like(deltas)
    running = torch.zeros_like(deltas[0])
    for t in range(deltas.shape[0] - 1, -1, -1):
        running = deltas[t] + carry[t] * running
        advantages[t] = running
    return advantages, advantages + values


def normalized(x: Tensor, eps: float = 1e-8) -> Tensor:
    """`(x - mean) / (std + eps)` over the whole tensor (advantages, per minibatch)."""
    return (x - x.mean()) / (x.std() + eps)


def clipped_surrogate_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """`mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`, `r = exp(log_prob - old_log_prob)`."""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)).mean()


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None,
                       huber_delta: float | None = None) -> Tensor:  # fmt: skip
    """`mean(max(l(V - R), l(V_old + clip(V - V_old, -eps, eps) - R)))` (rsl_rl, MAPPO) with `l` the square, or the
    Huber loss of `huber_delta` (MAPPO's; `2 x` torch's `huber_loss`, so it equals the square near 0);
    `clip=None`: `mean(l(V - R))`."""

    def l(error: Tensor) -> Tensor:
        if huber_delta is None:
            return error.pow(2)
        return 2.0 * torch.nn.functional.huber_loss(error, torch.zeros_like(error), reduction="none", delta=huber_delta)

    loss = l(values - returns)
    if clip is None:
        return loss.mean()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return torch.maximum(loss, l(clipped - returns)).mean()


def adapted_lr(lr: float, kl: float, desired_kl: float) -> float:
    """rsl_rl's adaptive learning rate: / 1.5 above twice the target KL, x 1.5 below half of it, within LR_BOUNDS."""
    if kl > 2.0 * desired_kl:
        return max(LR_BOUNDS[0], lr / KL_STEP)
    if 0.0 < kl < 0.5 * desired_kl:
        return min(LR_BOUNDS[1], lr * KL_STEP)
    return lr


def minibatch_epochs(
    batch: TensorDict, epochs: int, minibatches: int, generator: torch.Generator,
    step: Callable[[TensorDict], dict[str, Tensor]],
) -> dict[str, Tensor]:  # fmt: skip
    """`epochs` passes over `batch`, each in a fresh random order (from `generator`) cut into `minibatches` equal
    minibatches (a remainder is left out), `step` on each; the mean of each metric `step` returns."""
    n = batch.batch_size[0]
    size = n // minibatches
    sums: dict[str, Tensor] = {}
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator, device=generator.device).to(batch.device)
        for m in range(minibatches):
            for key, value in step(batch[order[m * size : (m + 1) * size]]).items():
                sums[key] = sums.get(key, 0.0) + value
    return {key: value / (epochs * minibatches) for key, value in sums.items()}


# ---------------------------------------------------------------------------------------------- agent


class PPO:
    """The PPO agent: a `GaussianPolicy`, a `ValueFunction`, the observation statistics and one Adam optimiser.

    `frozen_obs_stats=True` keeps the observation statistics fixed (a library's adapters fine-tune a base trained
    with those statistics). What trains is what requires a gradient: with adapters, their factors and the
    policy's log-std; the value function always trains (it is not part of what a library stores). Random draws
    come from `generator` (actions, minibatch order), so a run repeats bit for bit."""

    def __init__(
        self,
        cfg: PPOConfig,
        policy: GaussianPolicy,
        value: ValueFunction,
        obs_rms: RunningMeanStd,
        device: torch.device,
        generator: torch.Generator,
        *,
        frozen_obs_stats: bool = False,
    ) -> None:
        self.cfg, self.device, self.generator = cfg, device, generator
        self.policy, self.value, self.obs_rms = policy.to(device), value.to(device), obs_rms.to(device)
        self.frozen_obs_stats = frozen_obs_stats
        self.reward_normalizer = RewardNormalizer(cfg.num_envs, cfg.gamma).to(device) if cfg.normalize_rewards else None
        self.lr = cfg.lr
        self.optimizer = torch.optim.Adam(self.trainable_parameters(), lr=self.lr)
        self.num_updates = 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for net in (self.policy, self.value) for p in net.parameters() if p.requires_grad]

    def policy_trainable_numel(self) -> int:
        """Numbers the policy trains (adapters and log-std under a library; every weight otherwise)."""
        return sum(p.numel() for p in self.policy.parameters() if p.requires_grad)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp_bf16)

    def _distribution(self, obs: Tensor, task: Tensor | None) -> tuple[Tensor, Tensor]:
        with self._autocast():
            mean, log_std = self.policy(obs, task)
        return mean.float(), log_std.float()  # the Gaussian math in fp32: bf16 log-probs are too coarse

    def _values(self, obs: Tensor, task: Tensor | None) -> Tensor:
        with self._autocast():
            return self.value(obs, task).float()

    def normalize(self, obs: Tensor, update: bool = False) -> Tensor:
        """Observations normalised by the running statistics, after adding `obs` to them when `update`."""
        if update and not self.frozen_obs_stats:
            self.obs_rms.update(obs)
        return self.obs_rms.normalize(obs)

    def observe_rewards(self, rewards: Tensor, done: Tensor) -> None:
        """One env step's rewards and episode ends into the reward statistics (with `normalize_rewards`)."""
        if self.reward_normalizer is not None:
            self.reward_normalizer.update(rewards.to(self.device), done.to(self.device))

    def scaled_rewards(self, rewards: Tensor) -> Tensor:
        """Rewards as the value function learns them: divided by the current scale, or as they are."""
        return rewards if self.reward_normalizer is None else self.reward_normalizer.scale(rewards)

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False, task: Tensor | None = None) -> Tensor:
        """Actions in [-1, 1] for raw observations (evaluation: the clipped mean)."""
        mean, log_std = self._distribution(self.normalize(obs.to(self.device)), task)
        if not deterministic:
            mean = mean + torch.exp(log_std) * self._noise(mean.shape)
        return mean.clamp(-1.0, 1.0)

    def _noise(self, shape: torch.Size) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device).to(self.device)

    @torch.no_grad()
    def explore(self, obs: Tensor, task: Tensor | None = None) -> TensorDict:
        """One rollout step: the statistics take `obs`; a sampled (unclipped) action with its log-probability, the
        value, and the distribution (for the update's KL), all beside the normalised observation."""
        obs = self.normalize(obs.to(self.device), update=True)
        mean, log_std = self._distribution(obs, task)
        action = mean + torch.exp(log_std) * self._noise(mean.shape)
        return TensorDict(
            {"observation": obs, "action": action, "log_prob": gaussian.log_prob(action, mean, log_std),
             "value": self._values(obs, task), "mean": mean, "log_std": log_std},
            batch_size=[obs.shape[0]], device=self.device,
        )  # fmt: skip

    @torch.no_grad()
    def bootstrap_values(self, next_obs: Tensor, task: Tensor | None = None) -> Tensor:
        """V of true next observations (raw, normalised with the current statistics, which they do not update)."""
        return self._values(self.normalize(next_obs.to(self.device)), task)

    def update(self, rollout: TensorDict) -> dict[str, Tensor]:
        """`num_epochs` x `num_minibatches` steps on a flattened rollout (`explore`'s keys plus `advantage`,
        `return` and, with several tasks, `task`); returns the means of the losses, KL, entropy and LR."""
        return minibatch_epochs(rollout, self.cfg.num_epochs, self.cfg.num_minibatches, self.generator,
                                self._minibatch_step)  # fmt: skip

    def _minibatch_step(self, batch: TensorDict) -> dict[str, Tensor]:
        cfg = self.cfg
        task = batch.get("task", None)
        mean, log_std = self._distribution(batch["observation"], task)
        kl = gaussian.kl(batch["mean"], batch["log_std"], mean, log_std).mean().detach()
        if cfg.desired_kl is not None:  # rsl_rl adapts before the step, from this minibatch's KL
            self.lr = adapted_lr(self.lr, kl.item(), cfg.desired_kl)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        log_prob = gaussian.log_prob(batch["action"], mean, log_std)
        surrogate = clipped_surrogate_loss(log_prob, batch["log_prob"], normalized(batch["advantage"]), cfg.clip)
        value_loss = clipped_value_loss(self._values(batch["observation"], task), batch["value"], batch["return"],
                                        cfg.clip if cfg.clip_value_loss else None)  # fmt: skip
        entropy = gaussian.entropy(log_std).mean()
        loss = surrogate + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.trainable_parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.num_updates += 1
        return {"surrogate_loss": surrogate.detach(), "value_loss": value_loss.detach(), "entropy": entropy.detach(),
                "kl": kl, "grad_norm": grad_norm.detach(), "lr": torch.tensor(self.lr)}  # fmt: skip

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The policy's LoRA factors (empty without a library)."""
        return adapter_parameters(self.policy)

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_updates": self.num_updates,
            "lr": self.lr,
            "actor": self.policy.state_dict(),
            "value": self.value.state_dict(),
            "obs_rms": self.obs_rms.state_dict(),
            "reward_normalizer": None if self.reward_normalizer is None else self.reward_normalizer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates, self.lr = int(state["num_updates"]), float(state["lr"])
        self.policy.load_state_dict(state["actor"])
        self.value.load_state_dict(state["value"])
        self.obs_rms.load_state_dict(state["obs_rms"])
        if self.reward_normalizer is not None:
            self.reward_normalizer.load_state_dict(state["reward_normalizer"])
        self.optimizer.load_state_dict(state["optimizer"])
