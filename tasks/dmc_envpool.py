"""EnvPool's C++ DeepMind Control envs behind the interface `DMCEnv` steps (`backend="envpool"`, issue 18 item 3).

`EnvPoolBatch(tasks, seed, action_repeat, max_episode_steps, num_threads)` looks to `DMCEnv` like a pool of one
`DMCSlice` (`infos`, `pids`, `call(method, payloads)`, `close`) and answers with the same result buffer
(`dmc_slice.result_views`), so everything above the pool — specs, the action check and rescale, partial resets,
true final observations, export facts — is `DMCEnv`'s own, whichever backend steps.

How EnvPool is driven (checked on envpool 1.2.5): one synchronous pool per task of the batch (`envpool.make_dm`,
``batch_size == num_envs``), stepped and reset on any subset of its env ids; ``max_episode_steps`` counts control
steps and ends an episode with a LAST step of discount 1 (a truncation; discount 0 is a termination). Action repeat
is done here, as `DMCSlice` does: an env whose episode ends inside the repeat is not stepped again (EnvPool would
reset it). EnvPool seeds envs only when it builds them, from int32 seeds: env i gets ``((seed + i) mod 2**32) mod
(2**31 - 1)``, and `seed` rebuilds the pools (every env then needs a reset). Its random initial states come from
its own generator, so the same seed does not give dm_control's episodes (with `group_size`, env i draws from
``i // group_size`` instead of i, as `DMCSlice`); observations are flattened in
dm_control's order (the layout is read from a dm_control env of the same task).

Tasks: the suite tasks EnvPool ports (`envpool_id`); this package's task families (`dmc_families.EXTRA_TASKS`)
are dm_control only.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Any

import numpy as np

from fasttd3_lora.tasks.dmc_families import EXTRA_TASKS
from fasttd3_lora.tasks.dmc_slice import DMCSlice, env_seed, result_nbytes, result_views

__all__ = ["envpool_id", "EnvPoolBatch", "INT32_MAX"]

INT32_MAX = 2**31 - 1  # EnvPool asserts -INT32_MAX <= seed < INT32_MAX
_LAST = 2  # dm_env.StepType.LAST


def envpool_id(domain: str, task: str) -> str:
    """EnvPool's name of a suite task: ``("ball_in_cup", "catch")`` -> ``"BallInCupCatch-v1"``."""
    parts = [p for p in f"{domain}_{task}".split("_") if p]
    return "".join(p[0].upper() + p[1:] for p in parts) + "-v1"


class EnvPoolBatch:
    """`len(tasks)` EnvPool envs, env i running ``tasks[i]`` (see the module docstring)."""

    def __init__(
        self,
        tasks: Sequence[tuple[str, str]],
        seed: int,
        action_repeat: int,
        max_episode_steps: int | None,
        num_threads: int = 1,
        group_size: int = 1,
    ) -> None:
        try:
            import envpool
        except ImportError:
            raise ValueError("backend=envpool: the envpool package is not installed (pip install 'fasttd3-lora[envpool]')") from None
        for domain, task in tasks:
            if (domain, task) in EXTRA_TASKS:
                raise ValueError(f"backend=envpool: dmc/{domain}-{task} is one of this package's task families, which "
                                 "EnvPool does not have; allowed backend=dm_control")  # fmt: skip
            if envpool_id(domain, task) not in envpool.list_all_envs():
                raise ValueError(f"backend=envpool: EnvPool has no dmc/{domain}-{task} ({envpool_id(domain, task)})")
        self._envpool, self._threads, self._group_size = envpool, num_threads, group_size
        self._num_envs, self._repeat = len(tasks), action_repeat
        # dm_control's own facts (layout, actuator names, bounds, control period, episode length) for the first
        # env's task; a dm_control slice also checks that the tasks share one embodiment
        reference = DMCSlice([tasks[start] for start, _ in self._runs(tasks)], seed, 0, action_repeat, max_episode_steps)
        self.infos = [reference.info()]
        self.pids: list[int] = []
        self._limit = self.infos[0]["max_episode_steps"]
        self._slots, offset = [], 0
        for key, shape in self.infos[0]["layout"]:
            size = int(np.prod(shape))
            self._slots.append((key, slice(offset, offset + size)))
            offset += size
        self._obs_dim = offset
        self._buf = bytearray(result_nbytes(self._num_envs, offset))
        self._obs, self._reward, self._terminated, self._truncated = result_views(self._buf, self._num_envs, offset)
        self._tasks = list(tasks)
        self._pools: list[tuple[int, Any]] = []  # (first env index, EnvPool env)
        self._build(seed)

    @staticmethod
    def _runs(tasks: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
        """[start, stop) ranges of consecutive envs with the same task."""
        runs, start = [], 0
        for _, group in groupby(tasks):
            stop = start + len(list(group))
            runs.append((start, stop))
            start = stop
        return runs

    def _build(self, seed: int) -> None:
        self._close_pools()
        for start, stop in self._runs(self._tasks):
            n = stop - start
            pool = self._envpool.make_dm(
                envpool_id(*self._tasks[start]), num_envs=n, batch_size=n, num_threads=min(self._threads, n),
                seed=0, env_seed=[env_seed(seed, i // self._group_size) % INT32_MAX for i in range(start, stop)],
                max_episode_steps=self._limit,
            )  # fmt: skip
            self._pools.append((start, pool))

    def _write(self, start: int, ids: np.ndarray, observation: Any) -> None:
        for key, slot in self._slots:
            self._obs[start + ids, slot] = np.asarray(getattr(observation, key), dtype=np.float32).reshape(len(ids), -1)

    def step(self, payload: Any) -> memoryview:
        """Every env steps `action_repeat` times with its action (float64, in the task's bounds), rewards summed."""
        actions = np.frombuffer(payload, dtype=np.float64).reshape(self._num_envs, -1)
        self._reward[:] = 0.0
        self._terminated[:] = False
        self._truncated[:] = False
        for start, pool in self._pools:
            running = np.arange(len(pool), dtype=np.int32)
            for _ in range(self._repeat):
                ts = pool.step(actions[start + running], running)
                ids = np.asarray(ts.observation.env_id, dtype=np.int32)
                self._reward[start + ids] += ts.reward.astype(np.float32)
                last = np.asarray(ts.step_type) == _LAST
                ended = ids[last]
                terminal = np.asarray(ts.discount)[last] == 0.0
                self._terminated[start + ended] = terminal
                self._truncated[start + ended] = ~terminal
                self._write(start, ids, ts.observation)
                running = ids[~last]
                if not len(running):
                    break
        return memoryview(self._buf)

    def reset(self, payload: Any) -> memoryview:
        """Reset the envs where the bool mask is True; the others keep their current observation."""
        mask = np.frombuffer(payload, dtype=np.bool_)
        for start, pool in self._pools:
            ids = np.flatnonzero(mask[start : start + len(pool)]).astype(np.int32)
            if len(ids):
                ts = pool.reset(ids)
                self._write(start, np.asarray(ts.observation.env_id, dtype=np.int32), ts.observation)
        self._reward[mask] = 0.0
        self._terminated[mask] = False
        self._truncated[mask] = False
        return memoryview(self._buf)

    def seed(self, payload: Any) -> memoryview:
        """Rebuild every pool from the new base seed (EnvPool seeds only at construction)."""
        (seed,) = np.frombuffer(payload, dtype=np.int64)
        self._build(int(seed))
        return memoryview(self._buf)

    def call(self, method: str, payloads: Sequence[Any]) -> list[Any]:
        (payload,) = payloads
        return [getattr(self, method)(payload)]

    def _close_pools(self) -> None:
        for _, pool in self._pools:
            pool.close()
        self._pools = []

    def close(self) -> None:
        self._close_pools()
