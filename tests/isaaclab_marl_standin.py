"""A GPU-free stand-in for an Isaac Lab multi-agent direct env (``DirectMARLEnv``), reproducing the API that
`fasttd3_lora.tasks.isaaclab_marl` relies on, as read from ``isaaclab/envs/direct_marl_env.py`` of the 3.0.0 wheel:

* ``possible_agents``; ``observation_spaces`` / ``action_spaces`` (dicts of flat boxes; action boxes unbounded);
  ``state_space`` (a box; ``cfg.state_space`` -1 means the agents' observations concatenated, a positive int
  the env's own ``_get_states()``); ``num_envs``, ``device``, ``max_episode_length``, ``step_dt``, ``seed()``.
* ``reset(seed=) -> (obs dict, extras)``; ``step(actions dict) -> (obs, rewards, terminated, time_outs, extras)``
  with (num_envs, ...) tensors per agent, in this order inside ``step``: actions applied, ``episode_length_buf``
  advanced, dones, rewards, then for envs where *all* agents terminated or all timed out: with
  ``cfg.compute_final_obs`` every agent's observations of every env computed before the reset go to
  ``extras[agent]["final_obs"]`` (``extras`` is never cleared, so the key stays from an earlier reset), then
  ``self._reset_idx(ids)`` (a method a wrapper may hook), then the new observations.
* Reward and done tensors are persistent buffers overwritten in place on the next step.
* ``state()``: the concatenated observations (state_space -1) or ``_get_states()``.

Dynamics: each env holds a vector ``x`` of ``sum(act_dims)`` numbers; agent ``a``'s actions push its own slice, and
it observes ``x`` rotated to start at its slice, cut to its observation size; the team reward (the same for every
agent) is the decrease of ``|x|``. Episodes end by a random termination of all agents, by ``|x|`` leaving a box, or
after ``max_episode_length`` steps. ``_get_states()`` (state_space > 0) is ``x``, the episode clock and zeros up
to the size, which no observation shows. Ground truth for tests: ``last_reset_mask`` and ``last_pre_reset_state``
(``_get_states()`` of every env before the in-step reset).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from isaaclab_standin import Box, GymMadeEnv, SeededResets
from torch import Tensor


class StandInMARLEnv(SeededResets):
    def __init__(
        self, num_envs: int = 16, agents: dict[str, tuple[int, int]] | None = None, *, state_space: int = -1,
        final_obs: bool = True, max_episode_length: int = 12, termination_prob: float = 0.03, bound: float = 3.0,
        device: str = "cpu", seed: int = 0,
    ) -> None:  # fmt: skip
        agents = agents or {"cart": (4, 1), "pendulum": (3, 1)}
        self.num_envs, self.device = num_envs, torch.device(device)
        self.possible_agents = list(agents)
        self.observation_spaces = {a: Box((o,)) for a, (o, _) in agents.items()}
        self.action_spaces = {a: Box((k,)) for a, (_, k) in agents.items()}
        total_obs = sum(o for o, _ in agents.values())
        self.state_space = Box((total_obs if state_space < 0 else state_space,))
        self.cfg = SimpleNamespace(state_space=state_space, compute_final_obs=final_obs,
                                   possible_agents=self.possible_agents)  # fmt: skip
        self.max_episode_length, self.step_dt = max_episode_length, 1 / 60
        self.termination_prob, self.bound = termination_prob, bound
        self._slices, start = {}, 0
        for a, (_, k) in agents.items():
            self._slices[a] = (start, start + k)
            start += k
        self.dim = start
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self.x = torch.zeros(num_envs, self.dim, device=self.device)
        self.episode_length_buf = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.reward_buf = {a: torch.zeros(num_envs, device=self.device) for a in agents}
        self.terminated_buf = {a: torch.zeros(num_envs, dtype=torch.bool, device=self.device) for a in agents}
        self.time_out_buf = {a: torch.zeros(num_envs, dtype=torch.bool, device=self.device) for a in agents}
        self.extras: dict[str, dict] = {a: {} for a in agents}
        self.last_reset_mask = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
        self.last_pre_reset_state: Tensor | None = None
        self.last_actions: dict[str, Tensor] = {}
        self.closed = False

    def _compute_observations(self) -> dict[str, Tensor]:
        out = {}
        for a, (lo, _) in self._slices.items():
            size = self.observation_spaces[a].shape[0]
            rolled = torch.roll(self.x, -lo, dims=-1).repeat(1, size // self.dim + 1)
            out[a] = rolled[:, :size].clone()
        return out

    def _get_states(self) -> Tensor:
        clock = self.episode_length_buf.float().unsqueeze(-1) / self.max_episode_length
        state = torch.zeros(self.num_envs, self.state_space.shape[0], device=self.device)
        state[:, : self.dim + 1] = torch.cat([self.x, clock], dim=-1)
        return state

    def state(self) -> Tensor:
        if self.cfg.state_space < 0:
            obs = self._compute_observations()
            return torch.cat([obs[a] for a in self.possible_agents], dim=-1)
        return self._get_states()

    def _reset_idx(self, env_ids: Tensor) -> None:
        self.x[env_ids] = 2 * torch.rand(len(env_ids), self.dim, generator=self._gen, device=self.device) - 1
        self.episode_length_buf[env_ids] = 0

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, Tensor], dict]:
        self._reset_all(seed)
        return self._compute_observations(), self.extras

    def step(self, actions: dict[str, Tensor]) -> tuple[dict, dict, dict, dict, dict]:
        assert set(actions) == set(self.possible_agents), f"actions for {sorted(actions)}"
        self.last_actions = {a: v.clone() for a, v in actions.items()}
        before = self.x.norm(dim=-1)
        for a, (lo, hi) in self._slices.items():
            assert actions[a].shape == (self.num_envs, hi - lo) and actions[a].device == self.device
            self.x[:, lo:hi] += 0.3 * actions[a].clamp(-1, 1)
        self.episode_length_buf += 1
        drawn = torch.rand(self.num_envs, generator=self._gen, device=self.device) < self.termination_prob
        out = drawn | (self.x.abs().amax(dim=-1) > self.bound)
        for a in self.possible_agents:
            self.terminated_buf[a][:] = out
            self.time_out_buf[a][:] = self.episode_length_buf >= self.max_episode_length
            self.reward_buf[a][:] = before - self.x.norm(dim=-1)
        reset = out | (self.episode_length_buf >= self.max_episode_length)
        self.last_reset_mask = reset.clone()
        self.last_pre_reset_state = self._get_states().clone()
        ids = reset.nonzero(as_tuple=False).squeeze(-1)
        if len(ids) > 0:
            if self.cfg.compute_final_obs:
                for a, obs in self._compute_observations().items():
                    self.extras[a]["final_obs"] = obs
            self._reset_idx(ids)
        return self._compute_observations(), self.reward_buf, self.terminated_buf, self.time_out_buf, self.extras

    def close(self) -> None:
        self.closed = True


def make_marl_standin(num_envs: int = 16, **kwargs: Any) -> GymMadeEnv:
    """The stand-in as ``gym.make`` would hand it over (keyword arguments go to `StandInMARLEnv`)."""
    return GymMadeEnv(StandInMARLEnv(num_envs, **kwargs))
