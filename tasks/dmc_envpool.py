"""EnvPool's C++ DeepMind Control envs behind the interface `DMCEnv` steps (`backend="envpool"`; how EnvPool is
driven: `envpool_batch`).

Specifics of its DMC port (checked on envpool 1.2.5): `envpool.make_dm` speaks dm_env (a `TimeStep` of a `State`
namedtuple, the env ids in ``observation.env_id``); ``max_episode_steps`` counts control steps and ends an episode
with a LAST step of discount 1 (a truncation; discount 0 is a termination). Its random initial states come from its
own generator, so the same seed does not give dm_control's episodes; observations are flattened in dm_control's order
(the layout, actuator names, bounds, control period and episode length are read from a dm_control env of the same
task, which also checks that several tasks share one embodiment).

Tasks: the suite tasks EnvPool ports (`envpool_id`); this package's task families (`dmc_families.EXTRA_TASKS`) are
dm_control only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fasttd3_lora.tasks.dmc_families import EXTRA_TASKS
from fasttd3_lora.tasks.dmc_slice import DMCSlice
from fasttd3_lora.tasks.envpool_batch import EnvPoolBatch

__all__ = ["envpool_id", "DMCEnvPool"]

_LAST = 2  # dm_env.StepType.LAST


def envpool_id(domain: str, task: str) -> str:
    """EnvPool's name of a suite task: ``("ball_in_cup", "catch")`` -> ``"BallInCupCatch-v1"``."""
    parts = [p for p in f"{domain}_{task}".split("_") if p]
    return "".join(p[0].upper() + p[1:] for p in parts) + "-v1"


class DMCEnvPool(EnvPoolBatch):
    """`len(tasks)` EnvPool DMC envs, env i running ``tasks[i]`` (a ``(domain, task)``)."""

    def __init__(
        self,
        tasks: Sequence[tuple[str, str]],
        seed: int,
        action_repeat: int,
        max_episode_steps: int | None,
        num_threads: int = 1,
        group_size: int = 1,
    ) -> None:
        super().__init__(tasks, action_repeat, num_threads, group_size)
        for domain, task in tasks:
            if (domain, task) in EXTRA_TASKS:
                raise ValueError(f"backend=envpool: dmc/{domain}-{task} is one of this package's task families, which "
                                 "EnvPool does not have; allowed backend=dm_control")  # fmt: skip
            if envpool_id(domain, task) not in self._envpool.list_all_envs():
                raise ValueError(f"backend=envpool: EnvPool has no dmc/{domain}-{task} ({envpool_id(domain, task)})")
        firsts = [tasks[start] for start, _ in self._runs()]
        self.infos = [DMCSlice(firsts, seed, 0, action_repeat, max_episode_steps).info()]
        self._slots, offset = [], 0
        for key, shape in self.infos[0]["layout"]:
            size = int(np.prod(shape))
            self._slots.append((key, slice(offset, offset + size)))
            offset += size
        self._start(seed, offset)

    def _make(self, task: tuple[str, str], num_envs: int, seeds: list[int]) -> Any:
        return self._envpool.make_dm(envpool_id(*task), num_envs=num_envs, batch_size=num_envs,
                                     num_threads=min(self._threads, num_envs), seed=0, env_seed=seeds,
                                     max_episode_steps=self._limit)  # fmt: skip

    def _step_pool(self, pool: Any, actions: np.ndarray, ids: np.ndarray) -> tuple[Any, ...]:
        ts = pool.step(actions, ids)
        over = np.asarray(ts.step_type) == _LAST
        terminal = np.asarray(ts.discount)[over] == 0.0
        return np.asarray(ts.observation.env_id, dtype=np.int32), ts.reward, over, terminal, ts.observation, None

    def _reset_pool(self, pool: Any, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        ts = pool.reset(ids)
        return np.asarray(ts.observation.env_id, dtype=np.int32), ts.observation

    def _write(self, rows: np.ndarray, observation: Any) -> None:
        for key, slot in self._slots:
            value = getattr(observation, key)
            self._obs[rows, slot] = value.reshape(len(value), -1)
