"""Envs stepped by EnvPool (C++, threads) behind the pool interface `PooledEnv` drives (`tasks/pooled_env.py`):
what the DMC backend (`dmc_envpool.DMCEnvPool`) and Meta-World (`metaworld.MetaWorldPool`) share.

How EnvPool is driven (checked on envpool 1.2.5): one synchronous pool per task of the batch (``batch_size ==
num_envs``), stepped and reset on any subset of its env ids; ``max_episode_steps`` ends an episode with a truncation.
Action repeat is done here: an env whose episode ends inside the repeat is not stepped again (EnvPool would reset
it). EnvPool seeds envs only when it builds them, from int32 seeds: env i gets ``((seed + i // group_size) mod
2**32) mod (2**31 - 1)``, and `seed` rebuilds the pools (every env then needs a reset). The result buffer is
`dmc_slice.result_views`'s, so everything above the pool is the same whichever simulator steps.

A subclass says how to build one task's pool (`_make`), how to read a step and a reset (`_step_pool`,
`_reset_pool`) and how to write an observation into the buffer (`_write`), and sets `infos` (the task's facts).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Any

import numpy as np

from fasttd3_lora.tasks.dmc_slice import env_seed, result_nbytes, result_views

__all__ = ["INT32_MAX", "EnvPoolBatch", "import_envpool"]

INT32_MAX = 2**31 - 1  # EnvPool asserts -INT32_MAX <= seed < INT32_MAX


def import_envpool() -> Any:
    try:
        import envpool
    except ImportError:
        raise ValueError("the envpool package is not installed (pip install 'fasttd3-lora[envpool]')") from None
    return envpool


class EnvPoolBatch:
    """`len(tasks)` EnvPool envs, env i running ``tasks[i]`` (module docstring); a subclass sets `infos` and calls
    `_start(seed)`."""

    infos: list[dict[str, Any]]
    reports_success = False

    def __init__(self, tasks: Sequence[Any], action_repeat: int, num_threads: int, group_size: int) -> None:
        self._envpool = import_envpool()
        self._tasks, self._num_envs = list(tasks), len(tasks)
        self._repeat, self._threads, self._group_size = action_repeat, num_threads, group_size
        self.pids: list[int] = []
        self._pools: list[tuple[int, int, Any]] = []  # (first env index, its envs, EnvPool env)

    def _start(self, seed: int, obs_dim: int) -> None:
        self._limit = self.infos[0]["max_episode_steps"]
        self._buf = bytearray(result_nbytes(self._num_envs, obs_dim))
        self._obs, self._reward, self._terminated, self._truncated = result_views(self._buf, self._num_envs, obs_dim)
        self.success = np.zeros(self._num_envs, dtype=np.bool_)
        self._build(seed)

    def _runs(self) -> list[tuple[int, int]]:
        """[start, stop) ranges of consecutive envs with the same task."""
        runs, start = [], 0
        for _, group in groupby(self._tasks):
            stop = start + len(list(group))
            runs.append((start, stop))
            start = stop
        return runs

    def _build(self, seed: int) -> None:
        self._close_pools()
        for start, stop in self._runs():
            seeds = [env_seed(seed, i // self._group_size) % INT32_MAX for i in range(start, stop)]
            # the size kept here: EnvPool's len() rebuilds its config dict on every call (~5 us)
            self._pools.append((start, stop - start, self._make(self._tasks[start], stop - start, seeds)))

    # -- what a subclass provides
    def _make(self, task: Any, num_envs: int, seeds: list[int]) -> Any:
        raise NotImplementedError

    def _step_pool(self, pool: Any, actions: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, ...]:
        """(env ids, rewards, episode over, terminal (of those over), observation, success or None)."""
        raise NotImplementedError

    def _reset_pool(self, pool: Any, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        """(env ids, observation)."""
        raise NotImplementedError

    def _write(self, rows: np.ndarray, observation: Any) -> None:
        """Write the observation of the buffer's `rows` (env indices) into the buffer."""
        raise NotImplementedError

    # -- the pool interface
    def step(self, payload: Any) -> memoryview:
        """Every env steps `action_repeat` times with its action (float64, in the task's bounds), rewards summed."""
        actions = np.frombuffer(payload, dtype=np.float64).reshape(self._num_envs, -1)
        self._reward[:] = 0.0
        self._terminated[:] = False
        self._truncated[:] = False
        self.success[:] = False
        for start, size, pool in self._pools:
            running = np.arange(size, dtype=np.int32)
            for _ in range(self._repeat):
                ids, reward, over, terminal, obs, success = self._step_pool(pool, actions[start + running], running)
                rows = ids + start
                self._reward[rows] += reward
                ended = rows[over]
                self._terminated[ended] = terminal
                self._truncated[ended] = ~terminal
                if success is not None:
                    self.success[rows] |= success
                self._write(rows, obs)
                running = ids[~over]
                if not len(running):
                    break
        return memoryview(self._buf)

    def reset(self, payload: Any) -> memoryview:
        """Reset the envs where the bool mask is True; the others keep their current observation."""
        mask = np.frombuffer(payload, dtype=np.bool_)
        for start, size, pool in self._pools:
            ids = np.flatnonzero(mask[start : start + size]).astype(np.int32)
            if len(ids):
                reset_ids, obs = self._reset_pool(pool, ids)
                self._write(reset_ids + start, obs)
        self._reward[mask] = 0.0
        self._terminated[mask] = False
        self._truncated[mask] = False
        self.success[mask] = False
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
        for _, _, pool in self._pools:
            pool.close()
        self._pools = []

    def close(self) -> None:
        self._close_pools()
