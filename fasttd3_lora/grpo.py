"""Group-relative policy optimisation (GRPO) for continuous control: KL-free fine-tuning of a pretrained actor with
LoRA adapters, and the exact measurement of how far it drifts (DESIGN §10; docs/drift.md).

* The policy: any actor this stack trains, read from its run (`grpo.from=RUN_DIR`), as a diagonal Gaussian over
  pre-squash actions u (`GaussianView`): PPO's `GaussianPolicy` (actions clip(u)), SAC's `TanhGaussianActor`
  (tanh(u), its own state-dependent std), FastTD3's `DeterministicActor` (tanh(u), u ~ N(head output, init_std^2)).
  The run's observation statistics stay fixed. With `rank=r`, LoRA adapters (B = 0: the start is the reference
  exactly) go on every linear map and only they train; with `rank=None` (`full`) every weight trains. A learnt
  log-std (PPO) and FastTD3's std stay the reference's, so the KL differences come from what the rank limits.
* One iteration: every env plays one episode; envs in groups of `group_size` start from the same state (DMC: the
  same seed), `A_i = (R_i - mean(R)) / (std(R) + 1e-8)` within the group applies to every action of rollout i, and
  PPO's clipped ratio is minimised over epochs x minibatches. No value function. `kl_coef > 0` adds
  `kl_coef * KL(pi || pi_ref)` on each minibatch's states, the only time the reference is evaluated.
* Drift: `KL(pi_ref || pi)` in closed form on a fixed set of states the reference visited, and `||Delta W||_F` of
  every adapted map (`drift_metrics`). A tanh squash is a bijection, so the pre-squash Gaussians' KL is the policies'.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torch import Tensor, nn

from fasttd3_lora import gaussian
from fasttd3_lora.adapters import LINEAR_TYPES, AdapterLayer, LoRALinear, add_adapters, linear_maps
from fasttd3_lora.algo_config import AlgorithmConfig, check_positive_ints
from fasttd3_lora.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from fasttd3_lora.checks import ConfigError, get, int_in, number_in, positive
from fasttd3_lora.mlp_policy import GaussianPolicy
from fasttd3_lora.networks import DeterministicActor, TanhGaussianActor, bounded_log_std
from fasttd3_lora.normalization import RunningMeanStd
from fasttd3_lora.ppo import clipped_surrogate_loss, minibatch_epochs

__all__ = ["GRPOConfig", "FULL", "source_config", "group_advantages", "GaussianView", "adapt", "drift_metrics", "GRPO"]

FULL = "full"
SQUASHES = ("clip", "tanh")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(AlgorithmConfig):
    """Every knob of group-relative fine-tuning (`configs/algo/grpo.yaml`; `grpo.<key>=` on the command line is
    short for `algo.<key>=`, and `grpo.from=` for `algo.from_run=`)."""

    name: ClassVar[str] = "grpo"

    from_run: str  # the run whose actor is fine-tuned (its checkpoints/latest.pt, or a checkpoint file)
    rank: int | None  # None: full fine-tuning
    alpha: float | None  # None: alpha = rank
    kl_coef: float
    group_size: int
    num_epochs: int
    num_minibatches: int
    clip: float
    lr: float
    max_grad_norm: float
    init_std: float
    drift_states: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, ("group_size", "num_epochs", "num_minibatches", "drift_states"))
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be >= 2 (a group-relative advantage needs two rollouts), "
                             f"got {self.group_size!r}")  # fmt: skip
        if self.num_envs % self.group_size:
            raise ValueError(f"algo.num_envs={self.num_envs}: allowed a multiple of algo.group_size ({self.group_size})")
        if self.rank is not None and (isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"GRPOConfig.rank must be None (full) or an int >= 1, got {self.rank!r}")
        for field in ("clip", "lr", "max_grad_norm", "init_std"):
            if not getattr(self, field) > 0:
                raise ValueError(f"GRPOConfig.{field} must be > 0, got {getattr(self, field)!r}")
        if self.kl_coef < 0:
            raise ValueError(f"GRPOConfig.kl_coef must be >= 0, got {self.kl_coef!r}")

    @classmethod
    def hydra_values(cls, cfg: DictConfig) -> dict[str, Any]:
        """`cfg.algo`; `rank: full` is None; a null action repeat is the source run's (the actor acts at it)."""
        values = super().hydra_values(cfg)
        if values["rank"] == FULL:
            values["rank"] = None
        if values["action_repeat"] is None:
            values["action_repeat"] = source_config(str(values["from_run"]))["algo"]["action_repeat"]
        return values

    @classmethod
    def check_keys(cls, cfg: DictConfig) -> None:
        for key in ("num_envs", "group_size", "num_epochs", "num_minibatches", "drift_states"):
            int_in(cfg, f"algo.{key}", 2 if key == "group_size" else 1)
        if get(cfg, "algo.action_repeat") is not None:
            int_in(cfg, "algo.action_repeat", 1)
        if get(cfg, "algo.rank") != FULL:
            int_in(cfg, "algo.rank", 1, or_else=f" or {FULL}")
        if get(cfg, "algo.alpha") is not None:
            positive(cfg, "algo.alpha")
        number_in(cfg, "algo.kl_coef", 0.0, math.inf, lo_open=False, hi_open=True)
        if OmegaConf.select(cfg, "task.spread_starts", default=False):
            raise ConfigError("task.spread_starts=true: a group-relative run starts each group's episodes together "
                              "and plays them whole; allowed false")  # fmt: skip
        for key in ("clip", "lr", "max_grad_norm", "init_std"):
            positive(cfg, f"algo.{key}")
        source = get(cfg, "algo.from_run")
        if not (isinstance(source, str) and source):
            raise ConfigError(f"grpo.from={source!r}: allowed a run directory (or checkpoint) of a SAC, FastTD3 or "
                              "PPO run, whose actor is fine-tuned")  # fmt: skip
        try:
            path = resolve_checkpoint(source, key="grpo.from")
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
        try:
            source_config(path)
        except CheckpointError as err:
            raise ConfigError(f"grpo.from={source}: {err}") from None


def source_config(source: str) -> dict[str, Any]:
    """The config of the run `grpo.from` names (only its metadata is read)."""
    path = resolve_checkpoint(source)
    config = load_checkpoint(path, mmap=True)["meta"]["config"]
    if config.get("algo", {}).get("name") not in ("sac", "fasttd3", "ppo"):
        raise CheckpointError(f"checkpoint {path}: a {config.get('algo', {}).get('name')!r} run; allowed a SAC, "
                              "FastTD3 or PPO run")  # fmt: skip
    return config


# ------------------------------------------------------------------------------------------- pure math


def group_advantages(returns: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """`(R_i - mean(R_group)) / (std(R_group) + eps)` for consecutive groups of `group_size` rollouts (DESIGN §10).
    The std is the population std, as GRPO's."""
    grouped = returns.view(-1, group_size)
    mean, std = grouped.mean(-1, keepdim=True), grouped.std(-1, correction=0, keepdim=True)
    return ((grouped - mean) / (std + eps)).view_as(returns)


# ---------------------------------------------------------------------------------------------- policy


class GaussianView(nn.Module):
    """A trained actor as `pi(u|s) = N(mean(s), std(s)^2)` over pre-squash actions, with `action = squash(u)`;
    it takes normalised observations (the agent holds the source run's statistics)."""

    def __init__(self, actor: nn.Module, init_std: float) -> None:
        super().__init__()
        if not isinstance(actor, (GaussianPolicy, TanhGaussianActor, DeterministicActor)):
            raise ValueError(f"GaussianView takes a GaussianPolicy, TanhGaussianActor or DeterministicActor, got "
                             f"{type(actor).__name__}")  # fmt: skip
        self.actor = actor
        self.squash = "clip" if isinstance(actor, GaussianPolicy) else "tanh"
        if isinstance(actor, GaussianPolicy):
            act_dim = actor.act_dim
        else:
            act_dim = (actor.mean_head if isinstance(actor, TanhGaussianActor) else actor.head).bias.shape[-1]
        # FastTD3's deterministic actor explores with this fixed std (a buffer: it never trains)
        self.register_buffer("fixed_log_std", torch.full((act_dim,), math.log(init_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """`(mean, log_std)` of u."""
        actor = self.actor
        if isinstance(actor, GaussianPolicy):
            return actor(obs)
        h = actor.encoder(obs)
        if isinstance(actor, TanhGaussianActor):
            return actor.mean_head(h).float(), bounded_log_std(actor.log_std_head(h).float())
        mean = actor.head(h).float()
        return mean, self.fixed_log_std.expand_as(mean)

    def to_action(self, u: Tensor) -> Tensor:
        return u.clamp(-1.0, 1.0) if self.squash == "clip" else torch.tanh(u)

    def deterministic_action(self, obs: Tensor) -> Tensor:
        """`squash(mean)`: evaluation's and export's action."""
        return self.to_action(self(obs)[0])


def adapt(view: GaussianView, rank: int | None, alpha: float | None) -> None:
    """Freeze what does not train: with a rank, everything but LoRA adapters put on every linear map of the actor;
    without (full), nothing but the std (PPO's learnt log-std; FastTD3's is a buffer)."""
    actor = view.actor
    if rank is None:
        actor.requires_grad_(True)
        if isinstance(actor, GaussianPolicy):
            actor.log_std.requires_grad_(False)
        return
    actor.requires_grad_(False)
    add_adapters(actor, linear_maps(actor), rank=rank, alpha=alpha)  # their factors are the only parameters left


def drift_metrics(view: GaussianView, reference: GaussianView, states: Tensor) -> dict[str, Tensor]:
    """`KL(pi_ref || pi)` on (normalised) `states` (mean and max over them) and `||Delta W||_F` of every linear map (`dW/<name>`)
    and over all of them (`dW`)."""
    with torch.no_grad():
        mean, log_std = view(states)
        ref_mean, ref_log_std = reference(states)
        kls = gaussian.kl(ref_mean, ref_log_std, mean, log_std)
        out = {"kl_ref": kls.mean(), "kl_ref_max": kls.max()}
        ref_maps = dict(_maps(reference.actor))
        total = torch.zeros(())
        for name, layer in _maps(view.actor):
            delta = _weight(layer) - _weight(ref_maps[name])
            norm = delta.norm()
            out[f"dW/{name}"] = norm
            total = total + norm.pow(2)
        out["dW"] = total.sqrt()
    return out


def _maps(actor: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in actor.named_modules() if isinstance(m, (*LINEAR_TYPES, AdapterLayer))]


def _weight(layer: nn.Module) -> Tensor:
    return layer.merged_weight(0) if isinstance(layer, LoRALinear) else layer.weight


# ---------------------------------------------------------------------------------------------- agent


class GRPO:
    """The fine-tuned policy, its frozen reference, the source run's (frozen) observation statistics and one Adam
    optimiser over what trains (module docstring)."""

    def __init__(self, cfg: GRPOConfig, view: GaussianView, obs_rms: RunningMeanStd, device: torch.device,
                 generator: torch.Generator) -> None:  # fmt: skip
        self.cfg, self.device, self.generator = cfg, device, generator
        self.reference = copy.deepcopy(view).requires_grad_(False).to(device)
        adapt(view, cfg.rank, cfg.alpha)
        self.policy, self.obs_rms = view.to(device), obs_rms.requires_grad_(False).to(device)
        self.optimizer = torch.optim.Adam(self.trainable_parameters(), lr=cfg.lr)
        self.num_updates = 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp_bf16)

    def _distribution(self, net: GaussianView, obs: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            mean, log_std = net(obs)
        return mean.float(), log_std.float()

    def normalize(self, obs: Tensor) -> Tensor:
        return self.obs_rms.normalize(obs.to(self.device))

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        mean, log_std = self._distribution(self.policy, self.normalize(obs))
        if not deterministic:
            mean = mean + torch.exp(log_std) * self._noise(mean.shape)
        return self.policy.to_action(mean)

    def _noise(self, shape: torch.Size) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device).to(self.device)

    @torch.no_grad()
    def explore(self, obs: Tensor) -> TensorDict:
        """One rollout step: the normalised observation, a sampled pre-squash action u and its log-probability."""
        obs = self.normalize(obs)
        mean, log_std = self._distribution(self.policy, obs)
        u = mean + torch.exp(log_std) * self._noise(mean.shape)
        return TensorDict({"observation": obs, "u": u, "log_prob": gaussian.log_prob(u, mean, log_std)},
                          batch_size=[obs.shape[0]], device=self.device)  # fmt: skip

    def drift(self, states: Tensor) -> dict[str, Tensor]:
        """`drift_metrics` on normalised reference states."""
        return drift_metrics(self.policy, self.reference, states)

    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        """`num_epochs` x `num_minibatches` steps on a flattened rollout (`explore`'s keys plus `advantage`)."""
        return minibatch_epochs(batch, self.cfg.num_epochs, self.cfg.num_minibatches, self.generator, self._step)

    def _step(self, batch: TensorDict) -> dict[str, Tensor]:
        cfg = self.cfg
        mean, log_std = self._distribution(self.policy, batch["observation"])
        log_prob = gaussian.log_prob(batch["u"], mean, log_std)
        loss = surrogate = clipped_surrogate_loss(log_prob, batch["log_prob"], batch["advantage"], cfg.clip)
        metrics = {"surrogate_loss": surrogate.detach()}
        if cfg.kl_coef > 0:  # the reference is evaluated only here
            with torch.no_grad():
                ref_mean, ref_log_std = self._distribution(self.reference, batch["observation"])
            kl = gaussian.kl(mean, log_std, ref_mean, ref_log_std).mean()
            loss = loss + cfg.kl_coef * kl
            metrics["kl_penalty"] = kl.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = nn.utils.clip_grad_norm_(self.trainable_parameters(), cfg.max_grad_norm).detach()
        self.optimizer.step()
        self.num_updates += 1
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "actor": self.policy.state_dict(),
                "obs_rms": self.obs_rms.state_dict(), "optimizer": self.optimizer.state_dict()}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.policy.load_state_dict(state["actor"])
        self.optimizer.load_state_dict(state["optimizer"])
