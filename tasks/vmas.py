"""VMAS (torch-vectorised multi-agent simulator, many envs per process on a CPU) as a multi-agent env of
`fasttd3_lora.tasks.multi_agent`'s contract (docs/mappo.md).

`VMASEnv("vmas/het_mass", num_envs=N)`: N envs of one scenario stepped as one torch batch. Agents' actions map
onto their own spaces: forces in [-u_range, u_range] (VMAS then multiplies by the agent's u_multiplier),
communication in [0, 1]. Episodes end after ``max_episode_steps`` (a truncation) or when the scenario says done
(a termination). The global state is every agent's (padded) observation, concatenated. ``set_seed`` seeds VMAS
(torch and numpy, as its `seed`).

VMAS pulls legacy ``gym`` and ``pyglet<=1.5.27``: it is the `vmas` extra.
"""

from __future__ import annotations

from typing import Any

import torch

from fasttd3_lora.tasks.multi_agent import MultiAgentEnv, MultiAgentObs, MultiAgentStep
from fasttd3_lora.tasks.pooled_env import check_int

__all__ = ["PREFIX", "VMASEnv"]

PREFIX = "vmas/"


class VMASEnv(MultiAgentEnv):
    """`num_envs` VMAS envs of one scenario (module docstring)."""

    def __init__(self, task: str, num_envs: int, *, seed: int = 0, max_episode_steps: int = 100,
                 scenario_kwargs: dict[str, Any] | None = None) -> None:  # fmt: skip
        try:
            import vmas
        except ImportError:
            raise ValueError("the vmas package is not installed (pip install 'fasttd3-lora[vmas]')") from None
        if not task.startswith(PREFIX):
            raise ValueError(f"task must be vmas/<scenario>, got {task!r}")
        known = sorted({*vmas.scenarios, *vmas.mpe_scenarios, *vmas.debug_scenarios})
        if task.removeprefix(PREFIX) not in known:
            raise ValueError(f"{task}: not a VMAS scenario; allowed vmas/<one of {', '.join(known)}>")
        check_int("num_envs", num_envs, 1)
        self.max_episode_steps = check_int("max_episode_steps", max_episode_steps, 1)
        try:
            self._env = vmas.make_env(scenario=task.removeprefix(PREFIX), num_envs=num_envs, device="cpu",
                                      continuous_actions=True, seed=seed, max_steps=max_episode_steps,
                                      terminated_truncated=True, **(scenario_kwargs or {}))  # fmt: skip
        except (ValueError, ModuleNotFoundError, AttributeError, TypeError) as err:
            raise ValueError(f"{task}: VMAS cannot make it ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        spaces = self._env.action_space
        obs_dims = [int(space.shape[0]) for space in self._env.observation_space]
        super().__init__(task, num_envs, [agent.name for agent in self._env.agents], obs_dims,
                         [space.low for space in spaces], [space.high for space in spaces],
                         len(obs_dims) * max(obs_dims))  # fmt: skip
        self.control_period = float(self._env.world.dt)

    def _observe(self, per_agent: list[torch.Tensor]) -> MultiAgentObs:
        obs = self.pad(per_agent)
        return MultiAgentObs(obs, obs.flatten(-2))

    def set_seed(self, seed: int) -> None:
        self._env.seed(int(seed))

    def reset(self) -> MultiAgentObs:
        return self._observe(self._env.reset())

    def step(self, actions: torch.Tensor) -> MultiAgentStep:
        obs, rewards, terminated, truncated, _ = self._env.step(self.agent_actions(actions))
        final = self._observe(obs)
        done = terminated | truncated
        next_obs = final
        for index in torch.nonzero(done).flatten().tolist():  # reset_at answers every env's current observation
            next_obs = self._observe(self._env.reset_at(index))
        return MultiAgentStep(next_obs.obs, next_obs.state, final.obs, final.state, torch.stack(rewards, -1).float(),
                              terminated.clone(), truncated.clone())  # fmt: skip

    def close(self) -> None:
        self._env = None
