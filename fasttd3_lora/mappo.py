"""MAPPO with per-agent LoRA adapters (LoRASA; DESIGN §10, docs/mappo.md).

Decentralised actors read each agent's local observation, a centralised critic the env's global state (VMAS: every
agent's observation, concatenated; MaMuJoCo: the robot's full observation) with one value per agent; GAE per agent (DESIGN §10), PPO's clipped ratio, a clipped
value loss (squared, or Huber as MAPPO's code), and the value targets normalised by running statistics (the critic
learns normalised returns, read back denormalised for GAE).

Policy modes (`policy=` group, `configs/policy/`):

* `shared` (PS): one actor for all agents (per-agent log-std), every agent's rows through one network;
* `separate` (NPS): one actor per agent (`SeparatePolicies`);
* `lorasa`: phase 2 of LoRASA (Zhang, Kapoor, Sun, arXiv 2502.05573): the actor of a phase-1 `shared` run
  (`policy.from=RUN_DIR`) frozen (weights and biases), one LoRA adapter per agent on every linear map (rank 8 and
  alpha 8 by default, A = 0 and B Kaiming-uniform as the authors' code: `init_B="mirror"`), each agent's log-std
  trainable; all agents' rows go through one mixed-batch forward. The critic starts as phase 1's and trains fully.

`algo.recurrent=true` gives every mode a recurrent actor (`fasttd3_lora.recurrent`: MLP, GRU of
`algo.rnn_hidden_dim`, mean head; LoRASA adapts the GRU's input and hidden maps too). The rollout stores each
step's hidden state; an update cuts the rollout into chunks of `algo.chunk_length` steps per env and recomputes
each chunk from its stored first state (truncated backpropagation through time), minibatches drawing whole chunks.

Agents whose spaces differ are padded to the largest observation and action; the padded action entries are masked
out of the log-probability, entropy and KL (their terms are constants), and dropped before the simulator.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torch import Tensor, nn

from fasttd3_lora import gaussian
from fasttd3_lora.adapters import add_adapters, linear_maps
from fasttd3_lora.algo_config import AlgorithmConfig, check_positive_ints
from fasttd3_lora.checks import ConfigError, boolean, choice, get, int_in, number_in, positive
from fasttd3_lora.mlp_policy import GaussianPolicy, Task, ValueFunction
from fasttd3_lora.normalization import RunningMeanStd
from fasttd3_lora.ppo import clipped_surrogate_loss, clipped_value_loss, minibatch_epochs, normalized
from fasttd3_lora.recurrent import RecurrentGaussianPolicy, reset_hidden, unroll

__all__ = ["MODES", "MAPPOConfig", "SeparatePolicies", "policy_from_state_dict", "make_actor", "adapt_lorasa", "MAPPO"]

MODES = ("shared", "separate", "lorasa")
VALUE_LOSSES = ("mse", "huber")


@dataclasses.dataclass(frozen=True)
class MAPPOConfig(AlgorithmConfig):
    """Every knob of MAPPO (`configs/algo/mappo.yaml`, a family's `task.mappo.*`) and of the policy mode
    (`policy.*`: `policy_mode`, `policy_from` (lorasa's phase-1 run), `policy_rank`, `policy_alpha`)."""

    name: ClassVar[str] = "mappo"
    groups: ClassVar[tuple[str, ...]] = ("policy",)

    num_steps: int
    num_epochs: int
    num_minibatches: int
    clip: float
    gamma: float
    gae_lambda: float
    value_coef: float
    value_loss: str
    huber_delta: float
    entropy_coef: float
    lr: float
    max_grad_norm: float
    init_std: float
    normalize_values: bool
    actor_hidden_dims: tuple[int, ...]
    critic_hidden_dims: tuple[int, ...]
    recurrent: bool
    rnn_hidden_dim: int
    rnn_after_dims: tuple[int, ...]
    chunk_length: int
    policy_mode: str
    policy_from: str | None
    policy_rank: int
    policy_alpha: float | None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, ("num_steps", "num_epochs", "num_minibatches", "policy_rank", "rnn_hidden_dim",
                                   "chunk_length"))  # fmt: skip
        if self.recurrent and self.num_steps % self.chunk_length:
            raise ValueError(f"algo.chunk_length={self.chunk_length}: a recurrent actor's rollout of algo.num_steps="
                             f"{self.num_steps} steps must cut into whole chunks (a divisor of {self.num_steps})")  # fmt: skip
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.rnn_after_dims):
            raise ValueError(f"algo.rnn_after_dims={list(self.rnn_after_dims)}: allowed a list of integers >= 1 "
                             "(the widths of the layers after the GRU; [] for none)")  # fmt: skip
        units = self.num_envs * self.num_steps // (self.chunk_length if self.recurrent else 1)
        if units < self.num_minibatches:
            raise ValueError(f"algo.num_minibatches={self.num_minibatches}: a rollout holds {units} "
                             f"{'chunks' if self.recurrent else 'rows'} (num_envs x num_steps"
                             f"{' / chunk_length' if self.recurrent else ''}), too few to fill them")  # fmt: skip
        if self.policy_mode not in MODES:
            raise ValueError(f"MAPPOConfig.policy_mode must be one of {MODES}, got {self.policy_mode!r}")
        if (self.policy_mode == "lorasa") != (self.policy_from is not None):
            raise ValueError(f"policy={self.policy_mode}: policy.from (a phase-1 shared run) is for lorasa, and "
                             f"lorasa needs it; got policy.from={self.policy_from!r}")  # fmt: skip
        if self.value_loss not in VALUE_LOSSES:
            raise ValueError(f"MAPPOConfig.value_loss must be one of {VALUE_LOSSES}, got {self.value_loss!r}")
        if not 0.0 <= self.gamma < 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"MAPPOConfig needs gamma in [0, 1) and gae_lambda in [0, 1], got {self.gamma!r}, "
                             f"{self.gae_lambda!r}")  # fmt: skip

    @classmethod
    def group_fields(cls, cfg: DictConfig) -> dict[str, Any]:
        policy = cfg.policy
        return dict(policy_mode=str(policy.mode), policy_from=None if policy.get("from") is None else str(policy["from"]),
                    policy_rank=int(policy.rank), policy_alpha=None if policy.alpha is None else float(policy.alpha))  # fmt: skip

    @classmethod
    def _group_field_names(cls) -> set[str]:
        return {"policy_mode", "policy_from", "policy_rank", "policy_alpha"}

    @classmethod
    def check_keys(cls, cfg: DictConfig) -> None:
        super().check_keys(cfg)
        for key in ("num_steps", "num_epochs", "num_minibatches", "rnn_hidden_dim", "chunk_length"):
            int_in(cfg, f"algo.{key}", 1)
        boolean(cfg, "algo.recurrent")
        for key in ("clip", "lr", "max_grad_norm", "init_std", "huber_delta"):
            positive(cfg, f"algo.{key}")
        number_in(cfg, "algo.gamma", 0.0, 1.0, lo_open=False, hi_open=True)
        number_in(cfg, "algo.gae_lambda", 0.0, 1.0, lo_open=False, hi_open=False)
        for key in ("value_coef", "entropy_coef"):
            number_in(cfg, f"algo.{key}", 0.0, float("inf"), lo_open=False, hi_open=True)
        choice(cfg, "algo.value_loss", VALUE_LOSSES)
        boolean(cfg, "algo.normalize_values")
        mode = choice(cfg, "policy.mode", MODES)
        int_in(cfg, "policy.rank", 1)
        if get(cfg, "policy.alpha") is not None:
            positive(cfg, "policy.alpha")
        source = None if OmegaConf.is_missing(cfg.policy, "from") else get(cfg, "policy.from")
        if mode == "lorasa" and not (isinstance(source, str) and source):
            raise ConfigError(f"policy.from={'???' if source is None else repr(source)}: policy=lorasa fine-tunes a "
                              "phase-1 run of policy=shared; give its run directory")  # fmt: skip
        if mode != "lorasa" and source is not None:
            raise ConfigError(f"policy.from={source}: only policy=lorasa starts from a run (policy={mode})")


# ---------------------------------------------------------------------------------------------- actors


Actor = GaussianPolicy | RecurrentGaussianPolicy


class SeparatePolicies(nn.Module):
    """One policy per agent (no parameter sharing), with the policies' per-row face: row b goes through agent
    `task[b]`'s network. `forward(obs, task, *state)` passes a recurrent policy's hidden state along and answers
    what its policies answer, (mean, log_std) or (mean, log_std, next hidden)."""

    def __init__(self, policies: Sequence[Actor]) -> None:
        super().__init__()
        self.policies = nn.ModuleList(policies)
        self.obs_dim, self.act_dim = policies[0].obs_dim, policies[0].act_dim

    @property
    def num_tasks(self) -> int:
        return len(self.policies)

    @property
    def rnn_dim(self) -> int | None:
        return getattr(self.policies[0], "rnn_dim", None)

    def forward(self, obs: Tensor, task: Task = None, *state: Tensor) -> tuple[Tensor, ...]:
        if task is None or not isinstance(task, Tensor):
            return self.policies[0 if task is None else task](obs, None, *state)
        # every agent's network on every row, then each row's own: dense (no data-dependent shapes), so the
        # same graph exports to ONNX; agents are few
        outputs = zip(*(policy(obs, None, *state) for policy in self.policies))
        return tuple(torch.stack(out).gather(0, task.view(1, -1, 1).expand(1, *out[0].shape))[0] for out in outputs)

    def deterministic_action(self, obs: Tensor, task: Task = None, *state: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """The clipped mean (and, for recurrent policies, the next hidden state)."""
        mean, _, *hidden = self(obs, task, *state)
        return (mean.clamp(-1.0, 1.0), *hidden) if hidden else mean.clamp(-1.0, 1.0)

    def merged(self, k: int) -> Actor:
        """Agent k's own policy (a copy)."""
        return copy.deepcopy(self.policies[k]).eval()

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "SeparatePolicies":
        count = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("policies."))
        parts = [{k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"policies.{i}.")} for i in range(count)]
        out = cls([policy_from_state_dict(part) for part in parts])
        out.load_state_dict(state)
        return out


def policy_from_state_dict(state: dict[str, Tensor], alpha: float | None = None, rank: int | None = None) -> Actor:
    """One shared actor from its saved state: recurrent where it holds a GRU (adapters as the state holds them)."""
    kind = RecurrentGaussianPolicy if RecurrentGaussianPolicy.holds(state) else GaussianPolicy
    return kind.from_state_dict(state, alpha=alpha, rank=rank)


def make_actor(mode: str, obs_dim: int, act_dim: int, hidden: Sequence[int], num_agents: int, init_std: float,
               rnn_dim: int | None = None, after_dims: Sequence[int] = ()) -> Actor | SeparatePolicies:  # fmt: skip
    """A fresh actor of a mode: one shared network (per-agent log-std) or one network per agent; recurrent with a
    GRU of `rnn_dim` units, then layers of `after_dims`, where `rnn_dim` is given."""

    def policy(num_tasks: int) -> Actor:
        if rnn_dim is None:
            return GaussianPolicy(obs_dim, act_dim, hidden, init_std, num_tasks=num_tasks)
        return RecurrentGaussianPolicy(obs_dim, act_dim, hidden, rnn_dim, init_std, num_tasks, after_dims)

    if mode == "separate":
        return SeparatePolicies([policy(1) for _ in range(num_agents)])
    return policy(num_agents)


def adapt_lorasa(actor: Actor, rank: int, alpha: float | None) -> None:
    """LoRASA phase 2 on a phase-1 shared actor: its weights and biases frozen, one adapter per agent (A = 0, B
    Kaiming-uniform) on every linear map (a GRU's input and hidden maps included); the per-agent log-std rows keep
    training."""
    add_adapters(actor, linear_maps(actor), rank=rank, num_adapters=actor.num_tasks, alpha=alpha, init_B="mirror")


# ---------------------------------------------------------------------------------------------- agent


class MAPPO:
    """Actor, centralised critic, observation and value statistics, one Adam optimiser over what trains."""

    def __init__(self, cfg: MAPPOConfig, actor: nn.Module, critic: ValueFunction, obs_rms: RunningMeanStd,
                 state_rms: RunningMeanStd, action_mask: Tensor, device: torch.device,
                 generator: torch.Generator) -> None:  # fmt: skip
        self.cfg, self.device, self.generator = cfg, device, generator
        self.actor, self.critic, self.obs_rms = actor.to(device), critic.to(device), obs_rms.to(device)
        self.state_rms = state_rms.to(device)
        self.value_rms = RunningMeanStd(()).to(device)
        self.action_mask = action_mask.to(device)  # (M, act_dim): 0 where an agent's action is padding
        self.num_agents = action_mask.shape[0]
        self.optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=cfg.lr)
        self.num_updates = 0

    def parameters(self) -> list[nn.Parameter]:
        return [*self.actor.parameters(), *self.critic.parameters()]

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp_bf16)

    def agent_ids(self, num_envs: int) -> Tensor:
        return torch.arange(self.num_agents, device=self.device).repeat(num_envs)  # rows (env, agent) in order

    def initial_hidden(self, num_envs: int) -> Tensor | None:
        """Every agent's state at an episode's start, (N, M, rnn_hidden_dim) zeros; None for a feed-forward actor."""
        if not self.cfg.recurrent:
            return None
        return torch.zeros(num_envs, self.num_agents, self.cfg.rnn_hidden_dim, device=self.device)

    def _distribution(self, obs: Tensor, agent: Tensor, hidden: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Each row's (mean, log_std) and, for a recurrent actor, its next hidden state (None otherwise)."""
        with self._autocast():
            mean, log_std, *next_hidden = self.actor(obs, agent, *([] if hidden is None else [hidden]))
        mask = self.action_mask[agent]  # padded entries: constant terms (module docstring)
        return mean.float() * mask, log_std.float() * mask, next_hidden[0].float() if next_hidden else None

    def _values(self, state: Tensor) -> Tensor:
        """Normalised values of every agent: (N, M)."""
        with self._autocast():
            values = self.critic.net(state)
        return values.float()

    def denormalize(self, values: Tensor) -> Tensor:
        if not self.cfg.normalize_values:
            return values
        return values * torch.sqrt(self.value_rms.var + 1e-8) + self.value_rms.mean

    def normalize_returns(self, returns: Tensor) -> Tensor:
        """Returns (and denormalised values) in the critic's normalised units."""
        if not self.cfg.normalize_values:
            return returns
        return (returns - self.value_rms.mean) / torch.sqrt(self.value_rms.var + 1e-8)

    def normalize(self, obs: Tensor, update: bool = False) -> Tensor:
        """(N, M, D) observations normalised by statistics shared by the agents (updated with `obs` first)."""
        if update:
            self.obs_rms.update(obs.flatten(0, 1))
        return self.obs_rms.normalize(obs)

    @torch.no_grad()
    def act(self, obs: Tensor, hidden: Tensor | None = None, deterministic: bool = False) -> tuple[Tensor, Tensor | None]:
        """Actions (N, M, act_dim) in [-1, 1] for raw observations, and a recurrent actor's next hidden states
        (N, M, H) from `hidden` (None: a feed-forward actor, or episodes that start now)."""
        n = obs.shape[0]
        if hidden is None:
            hidden = self.initial_hidden(n)
        obs = self.normalize(obs.to(self.device)).flatten(0, 1)
        mean, log_std, hidden = self._distribution(obs, self.agent_ids(n), None if hidden is None else hidden.flatten(0, 1))
        if not deterministic:
            mean = mean + torch.exp(log_std) * self._noise(mean.shape)
        as_env = lambda x: None if x is None else x.view(n, self.num_agents, -1)  # noqa: E731
        return as_env(mean.clamp(-1.0, 1.0)), as_env(hidden)

    def _noise(self, shape: torch.Size) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device).to(self.device)

    @torch.no_grad()
    def explore(self, obs: Tensor, state: Tensor, hidden: Tensor | None = None, first: Tensor | None = None) -> TensorDict:
        """One rollout step over (N, M): normalised observations and global states (statistics updated with them
        first), sampled (unclipped) actions with their log-probabilities and distribution, and the (denormalised)
        values of every agent. A recurrent actor takes every agent's `hidden` state (N, M, H) and `first` (N,):
        whose episode starts at this step (its state is zeroed first); the step records both, and the next states
        under "next_hidden"."""
        n = obs.shape[0]
        obs = self.normalize(obs.to(self.device), update=True)
        self.state_rms.update(state.to(self.device))
        state = self.state_rms.normalize(state.to(self.device))
        agent = self.agent_ids(n)
        if hidden is not None:
            first = first.to(self.device)
            hidden = reset_hidden(hidden, first)
        mean, log_std, next_hidden = self._distribution(obs.flatten(0, 1), agent, None if hidden is None else hidden.flatten(0, 1))
        action = mean + torch.exp(log_std) * self._noise(mean.shape) * self.action_mask[agent]
        as_env = lambda x: x.view(n, self.num_agents, *x.shape[1:])  # noqa: E731
        step = TensorDict({"observation": obs, "state": state, "action": as_env(action), "mean": as_env(mean),
                           "log_std": as_env(log_std), "log_prob": as_env(gaussian.log_prob(action, mean, log_std)),
                           "value": self.denormalize(self._values(state))}, batch_size=[n], device=self.device)  # fmt: skip
        if hidden is not None:
            step.update({"hidden": hidden, "first": first, "next_hidden": as_env(next_hidden)})
        return step

    @torch.no_grad()
    def bootstrap_values(self, next_state: Tensor) -> Tensor:
        """Denormalised values (N, M) of true next global states (normalised with the current statistics)."""
        return self.denormalize(self._values(self.state_rms.normalize(next_state.to(self.device))))

    def update(self, rollout: TensorDict) -> dict[str, Tensor]:
        """Epochs x minibatches on a rollout of (step, env) rows, each holding every agent: minibatches of rows,
        or, for a recurrent actor, of chunks (`chunks`)."""
        if self.cfg.normalize_values:
            self.value_rms.update(rollout["return"].flatten())
        batch = self.chunks(rollout) if self.cfg.recurrent else rollout.reshape(-1)
        return minibatch_epochs(batch, self.cfg.num_epochs, self.cfg.num_minibatches, self.generator, self._step)

    def chunks(self, rollout: TensorDict) -> TensorDict:
        """A (T, N) rollout as (T / L * N, L) chunks: L = `chunk_length` consecutive steps of one env each."""
        t, n = rollout.batch_size
        length = self.cfg.chunk_length
        return rollout.reshape(t // length, length, n).transpose(1, 2).contiguous().reshape(-1, length)

    def recompute(self, chunks: TensorDict) -> tuple[Tensor, Tensor]:
        """The recurrent actor over (C, L) chunks from each chunk's stored first state (truncated BPTT): means and
        log-stds in the chunks' (C, L, M) row order, flattened."""
        c, length = chunks.batch_size
        m = self.num_agents
        obs = chunks["observation"].transpose(0, 1).flatten(1, 2)  # (L, C M, D)
        first = chunks["first"].transpose(0, 1).repeat_interleave(m, dim=1)  # (L, C M)
        mean, log_std = unroll(self._distribution, obs, first, chunks["hidden"][:, 0].flatten(0, 1), self.agent_ids(c))
        in_order = lambda x: x.view(length, c, m, -1).transpose(0, 1).flatten(0, 2)  # noqa: E731
        return in_order(mean), in_order(log_std)

    def _step(self, batch: TensorDict) -> dict[str, Tensor]:
        cfg = self.cfg
        if cfg.recurrent:
            mean, log_std = self.recompute(batch)
        else:
            mean, log_std, _ = self._distribution(batch["observation"].flatten(0, 1), self.agent_ids(batch.batch_size[0]))
        log_prob = gaussian.log_prob(batch["action"].flatten(0, -2), mean, log_std)
        surrogate = clipped_surrogate_loss(log_prob, batch["log_prob"].flatten(), normalized(batch["advantage"].flatten()),
                                           cfg.clip)  # fmt: skip
        values = self._values(batch["state"])
        value_loss = clipped_value_loss(values, self.normalize_returns(batch["value"]), self.normalize_returns(batch["return"]), cfg.clip,
                                        cfg.huber_delta if cfg.value_loss == "huber" else None)  # fmt: skip
        entropy = gaussian.entropy(log_std).mean()
        kl = gaussian.kl(batch["mean"].flatten(0, -2), batch["log_std"].flatten(0, -2), mean, log_std).mean().detach()
        loss = surrogate + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_([p for p in self.parameters() if p.requires_grad], cfg.max_grad_norm)
        self.optimizer.step()
        self.num_updates += 1
        return {"surrogate_loss": surrogate.detach(), "value_loss": value_loss.detach(), "entropy": entropy.detach(),
                "kl": kl, "grad_norm": grad_norm.detach()}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "obs_rms": self.obs_rms.state_dict(), "state_rms": self.state_rms.state_dict(),
                "value_rms": self.value_rms.state_dict(), "optimizer": self.optimizer.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.obs_rms.load_state_dict(state["obs_rms"])
        self.state_rms.load_state_dict(state["state_rms"])
        self.value_rms.load_state_dict(state["value_rms"])
        self.optimizer.load_state_dict(state["optimizer"])
