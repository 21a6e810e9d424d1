"""MaMuJoCo (Gymnasium-Robotics' multi-agent MuJoCo: one robot's joints split between agents) as a multi-agent env
of `fasttd3_lora.tasks.multi_agent`'s contract (docs/mappo.md).

`MaMuJoCoEnv("mamujoco/HalfCheetah-2x3", num_envs=N, agent_obsk=1)`: N PettingZoo parallel envs of one
factorisation, stepped in turn in this process. Each agent observes its own joints and those ``agent_obsk`` hops
away; the global state is the single-agent robot's full observation (`state()`); the reward is the robot's,
shared by every agent; episodes end when the robot falls (a termination) or after ``max_episode_steps`` (a
truncation). Env i's episodes are seeded from ``seed + i`` at `set_seed`, later ones continue its generator.

This wrapper reads PettingZoo's parallel API itself: TorchRL's ``PettingZooWrapper`` crashes on MaMuJoCo's first
step because the step's info dict has keys the reset's lacks (infos are not read here). ``CoupledHalfCheetah``
does not run on mujoco > 3.5 (an upstream fix is not released); it is refused here.

Gymnasium-Robotics is the `mamujoco` extra (1.4.2, with gymnasium 1.x and mujoco 3).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from fasttd3_lora.tasks.multi_agent import MultiAgentEnv, MultiAgentObs, MultiAgentStep
from fasttd3_lora.tasks.pooled_env import MAX_SEED, check_int

__all__ = ["PREFIX", "SCENARIOS", "MaMuJoCoEnv"]

PREFIX = "mamujoco/"
SCENARIOS = ("Ant", "HalfCheetah", "Hopper", "Humanoid", "HumanoidStandup", "Reacher", "Swimmer", "Pusher", "Walker2d",
             "InvertedPendulum", "InvertedDoublePendulum", "ManySegmentSwimmer", "ManySegmentAnt")  # fmt: skip
_NAME = re.compile(r"^mamujoco/(?P<scenario>[A-Za-z0-9]+)-(?P<conf>\d+x\d+\w*)$")


class MaMuJoCoEnv(MultiAgentEnv):
    """`num_envs` MaMuJoCo envs of one factorisation (module docstring)."""

    def __init__(self, task: str, num_envs: int, *, seed: int = 0, max_episode_steps: int = 1000,
                 agent_obsk: int = 1) -> None:  # fmt: skip
        match = _NAME.match(task)
        if match is None or match["scenario"] not in SCENARIOS:
            raise ValueError(f"task must be mamujoco/<scenario>-<agents>x<segments> with a scenario of "
                             f"{', '.join(SCENARIOS)} (e.g. mamujoco/HalfCheetah-2x3), got {task!r}")  # fmt: skip
        try:
            from gymnasium_robotics import mamujoco_v1
        except ImportError:
            raise ValueError("the gymnasium-robotics package is not installed (pip install 'fasttd3-lora[mamujoco]')") from None
        check_int("num_envs", num_envs, 1)
        self.max_episode_steps = check_int("max_episode_steps", max_episode_steps, 1)
        check_int("agent_obsk", agent_obsk, 0)
        try:
            self._envs = [mamujoco_v1.parallel_env(match["scenario"], match["conf"], agent_obsk=agent_obsk,
                                                   max_episode_steps=max_episode_steps) for _ in range(num_envs)]  # fmt: skip
        except Exception as err:  # an unknown factorisation raises a bare Exception ("UNKNOWN partitioning config")
            raise ValueError(f"{task}: MaMuJoCo cannot make it ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        first = self._envs[0]
        names = list(first.possible_agents)
        super().__init__(task, num_envs, names, [first.observation_space(a).shape[0] for a in names],
                         [first.action_space(a).low for a in names], [first.action_space(a).high for a in names],
                         first.state().shape[0])  # fmt: skip
        self.control_period = float(first.single_agent_env.unwrapped.dt)
        self._seeds: list[int | None] = [seed + i for i in range(num_envs)]

    def _observe(self, obs: dict[str, np.ndarray], env_index: int) -> tuple[list[np.ndarray], np.ndarray]:
        return [obs[name] for name in self.agent_names], self._envs[env_index].state()

    def _stack(self, rows: list[tuple[list[np.ndarray], np.ndarray]]) -> MultiAgentObs:
        per_agent = [torch.as_tensor(np.stack([r[0][i] for r in rows]), dtype=torch.float32) for i in range(self.num_agents)]
        return MultiAgentObs(self.pad(per_agent), torch.as_tensor(np.stack([r[1] for r in rows]), dtype=torch.float32))

    def _reset_one(self, i: int) -> tuple[list[np.ndarray], np.ndarray]:
        obs, _ = self._envs[i].reset(seed=self._seeds[i])
        self._seeds[i] = None  # later episodes continue the env's generator
        return self._observe(obs, i)

    def set_seed(self, seed: int) -> None:
        self._seeds = [(int(seed) + i) % MAX_SEED for i in range(self.num_envs)]

    def reset(self) -> MultiAgentObs:
        return self._stack([self._reset_one(i) for i in range(self.num_envs)])

    def step(self, actions: torch.Tensor) -> MultiAgentStep:
        per_agent = [a.numpy() for a in self.agent_actions(actions)]
        finals, nexts = [], []
        rewards = np.zeros((self.num_envs, self.num_agents), dtype=np.float32)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool)
        truncated = torch.zeros(self.num_envs, dtype=torch.bool)
        for i, env in enumerate(self._envs):
            obs, reward, term, trunc, _ = env.step({name: per_agent[k][i] for k, name in enumerate(self.agent_names)})
            rewards[i] = [reward[name] for name in self.agent_names]
            terminated[i], truncated[i] = any(term.values()), any(trunc.values()) and not any(term.values())
            finals.append(self._observe(obs, i))
            nexts.append(self._reset_one(i) if terminated[i] or truncated[i] else finals[-1])
        final, following = self._stack(finals), self._stack(nexts)
        return MultiAgentStep(following.obs, following.state, final.obs, final.state, torch.from_numpy(rewards),
                              terminated, truncated)  # fmt: skip

    def close(self) -> None:
        for env in self._envs:
            env.close()
        self._envs = []
