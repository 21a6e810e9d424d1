"""What every multi-agent env family hands `MAPPO` (`fasttd3_lora.loops.mappo`; docs/mappo.md): N envs of M agents
as torch batches on the env's ``device`` (the CPU, or Isaac Lab's simulation device).

* ``reset() -> MultiAgentObs`` with ``obs`` (N, M, obs_dim) and the global ``state`` (N, state_dim) the
  centralised critic reads;
* ``step(actions (N, M, act_dim)) -> MultiAgentStep``: the next ``obs`` / ``state`` (the next episode's first where
  one ended), the true last ``final_obs`` / ``final_state`` of those episodes (the same as ``obs`` / ``state``
  elsewhere), ``reward`` (N, M), ``terminated`` / ``truncated`` (N,);
* agents whose spaces differ are padded with zeros to the largest observation and action (``obs_dims`` /
  ``act_dims`` give each agent's own, ``agent_names`` their names); actions are in [-1, 1], refused outside it, and
  agent i's first ``act_dims[i]`` entries map affinely onto its own space (``action_low`` / ``action_high``), the
  rest dropped;
* ``set_seed(seed)`` for the next ``reset``; ``close()``.

`MultiAgentEnv` holds what the families share: the spaces, padding, the action map and its checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchrl.data import Bounded, Composite, Unbounded

__all__ = ["MultiAgentObs", "MultiAgentStep", "MultiAgentEnv"]


class MultiAgentObs(NamedTuple):
    obs: Tensor  # (N, M, obs_dim)
    state: Tensor  # (N, state_dim)


class MultiAgentStep(NamedTuple):
    obs: Tensor  # (N, M, obs_dim), reset observations where an episode ended
    state: Tensor  # (N, state_dim), likewise
    final_obs: Tensor  # (N, M, obs_dim), the true final observations
    final_state: Tensor  # (N, state_dim)
    reward: Tensor  # (N, M)
    terminated: Tensor  # (N,) bool
    truncated: Tensor  # (N,) bool


class MultiAgentEnv:
    """The spaces of `num_envs` envs of agents `agent_names` with their own observation sizes and action ranges."""

    def __init__(self, task: str, num_envs: int, agent_names: Sequence[str], obs_dims: Sequence[int],
                 action_low: Sequence[Tensor], action_high: Sequence[Tensor], state_dim: int,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.task_name, self.num_envs = task, num_envs
        self.device = torch.device(device)
        self.agent_names = [str(name) for name in agent_names]
        self.num_agents = len(self.agent_names)
        self.obs_dims = [int(d) for d in obs_dims]
        as_row = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device).reshape(-1)  # noqa: E731
        self.action_low, self.action_high = [as_row(x) for x in action_low], [as_row(x) for x in action_high]
        self.act_dims = [len(low) for low in self.action_low]
        self.obs_dim, self.act_dim, self.state_dim = max(self.obs_dims), max(self.act_dims), int(state_dim)
        self.batch_size = torch.Size([num_envs])
        # what export and deploy facts read (`fasttd3_lora.envs.env_deploy_facts`): every agent's padded spaces
        n, m = num_envs, self.num_agents
        self.observation_spec = Composite(observation=Unbounded(shape=(n, m, self.obs_dim)), shape=(n,))
        self.action_spec = Bounded(low=-1.0, high=1.0, shape=(n, m, self.act_dim), dtype=torch.float32)
        self.action_map_known = False  # one map per agent (action_low / action_high), not one for every row

    def pad(self, per_agent: Sequence[Tensor]) -> Tensor:
        """(N, M, obs_dim) from each agent's (N, obs_i), padded with zeros."""
        out = torch.zeros(self.num_envs, self.num_agents, self.obs_dim, device=self.device)
        for i, obs in enumerate(per_agent):
            out[:, i, : obs.shape[-1]] = obs
        return out

    def agent_actions(self, actions: Tensor) -> list[Tensor]:
        """Each agent's (N, act_i) actions in its own space, from checked (N, M, act_dim) actions in [-1, 1]."""
        if actions.shape != (self.num_envs, self.num_agents, self.act_dim):
            raise ValueError(f"{self.task_name}: actions must have shape {(self.num_envs, self.num_agents, self.act_dim)},"
                             f" got {tuple(actions.shape)}")  # fmt: skip
        if not bool((actions.abs() <= 1.0).all()):
            raise ValueError(f"{self.task_name}: actions must lie in [-1, 1], got min {actions.min().item():.4g}, "
                             f"max {actions.max().item():.4g}")  # fmt: skip
        return [low + (actions[:, i, : len(low)].detach().float() + 1.0) * 0.5 * (high - low)
                for i, (low, high) in enumerate(zip(self.action_low, self.action_high))]  # fmt: skip
