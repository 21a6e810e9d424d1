"""N simulated environments stepped by a pool, as one batched TorchRL env: what `DMCEnv` (DeepMind Control) and
`MetaWorldEnv` (Meta-World through EnvPool) share.

A pool is the thing that steps the envs: `LocalPool` / `ProcessPool` of `DMCSlice`s (in this process, or in worker
processes), or an EnvPool batch. It has ``infos`` (what the first slice says about the task: observation layout and
size, action bounds, actuator names, control period, episode length), ``pids``, ``call(method, payloads)`` with
methods ``step``, ``reset``, ``seed`` answering with the result buffer of `dmc_slice.result_views`, and ``close``.
One payload per slice of `bounds`. A pool with ``reports_success`` also sets ``success`` (bool per env) each step,
which the env hands out as a ``success`` entry (Meta-World's task-solved flag).

The env's contract (what `DMCEnv`'s module docstring details): float32 observations flattened in the layout's order,
actions in [-1, 1] (refused outside it, rescaled to the task's bounds here), rewards summed over the action repeat,
``terminated`` / ``truncated`` / ``done`` flags, partial resets, true final observations under ``("next",
"observation")`` from `step_and_maybe_reset`, env i seeded from ``seed + i`` (or its group's).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from fasttd3_lora.tasks.dmc_slice import result_views

__all__ = ["MAX_SEED", "check_int", "PooledEnv"]

MAX_SEED = 2**32  # numpy RandomStates (and so our env seeds) take seeds in [0, 2**32)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low or (
        high is not None and value > high
    ):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    return int(value)


class PooledEnv(EnvBase):
    """The batched TorchRL face of a pool (module docstring). Subclasses build the pool and call `_attach`."""

    def __init__(self, num_envs: int, task_names: Sequence[str], action_repeat: int, seed: int) -> None:
        super().__init__(batch_size=torch.Size([num_envs]), device="cpu")
        self.task_names = tuple(task_names)
        self.task_name = self.task_names[0] if len(self.task_names) == 1 else ",".join(self.task_names)
        per_task = num_envs // len(self.task_names)
        # each env's index into task_names (None for one task: the agent needs no per-row task then)
        self.task_ids = None if len(self.task_names) == 1 else torch.arange(num_envs) // per_task
        self.num_envs, self.action_repeat, self.base_seed = num_envs, action_repeat, seed
        self.is_closed = False

    def _attach(self, pool: Any, bounds: Sequence[tuple[int, int]], *, reseed_restarts: bool = False) -> None:
        """Take `pool` (its slices cover `bounds`) and build the specs from what its first slice says.
        `reseed_restarts`: the pool rebuilds its envs when seeded (EnvPool), so every env needs a reset after."""
        self._pool, self._bounds, self._reseed_restarts = pool, list(bounds), reseed_restarts
        info = pool.infos[0]
        if info["max_episode_steps"] is None:
            self.close()
            raise ValueError(f"{self.task_name} has no time limit; pass max_episode_steps (control steps per episode)")
        self.max_episode_steps: int = info["max_episode_steps"]
        self.control_period: float = info["control_timestep"] * self.action_repeat
        self._layout: list[tuple[str, tuple[int, ...]]] = info["layout"]
        self._obs_dim: int = info["obs_dim"]
        low, high = info["action_low"], info["action_high"]
        # float64 for the rescale done in numpy before sending; float32 copies for export metadata.
        self._scale_np = (high - low) / 2.0
        self._offset_np = (high + low) / 2.0
        self.action_scale = torch.as_tensor(self._scale_np, dtype=torch.float32)
        self.action_offset = torch.as_tensor(self._offset_np, dtype=torch.float32)
        # One name per action dimension, in action order (the export's "joint names in the trained order").
        self.joint_names: list[str] | None = info["actuator_names"]
        self._needs_reset = np.ones(self.num_envs, dtype=np.bool_)
        self._reports_success = bool(getattr(pool, "reports_success", False))

        n, act_dim = self.num_envs, len(low)
        self._action_shape = (n, act_dim)
        flag = functools.partial(Categorical, 2, (n, 1), dtype=torch.bool)
        observations = {"observation": Unbounded(shape=(n, self._obs_dim), dtype=torch.float32)}
        if self._reports_success:
            observations["success"] = flag()
        self.observation_spec = Composite(observations, shape=(n,))
        self.action_spec = Bounded(low=-1.0, high=1.0, shape=(n, act_dim), dtype=torch.float32)
        self.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32)
        self.done_spec = Composite(done=flag(), terminated=flag(), truncated=flag(), shape=(n,))

    def observation_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(key, shape)]`` of the flattened observation, in order (a scalar has shape ``()``, one slot)."""
        return list(self._layout)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers (empty when stepping in-process)."""
        return self._pool.pids

    def _gather(self, replies: list[Any]) -> tuple[np.ndarray, ...]:
        """Copy the slices' result buffers into fresh arrays (the buffers are reused on the next call)."""
        n = self.num_envs
        obs = np.empty((n, self._obs_dim), dtype=np.float32)
        reward = np.empty((n, 1), dtype=np.float32)
        terminated = np.empty((n, 1), dtype=np.bool_)
        truncated = np.empty((n, 1), dtype=np.bool_)
        columns = (obs, reward[:, 0], terminated[:, 0], truncated[:, 0])
        for (lo, hi), buf in zip(self._bounds, replies, strict=True):
            for column, view in zip(columns, result_views(buf, hi - lo, self._obs_dim), strict=True):
                column[lo:hi] = view
        return obs, reward, terminated, truncated

    def _output(self, **arrays: np.ndarray) -> TensorDict:
        # from_numpy shares the fresh arrays (no copy). `_new_unsafe` skips the per-entry validation of the
        # constructor (about 15 us of the per-step overhead): every entry is built here with batch dim N on CPU.
        if self._reports_success:
            arrays["success"] = self._pool.success.reshape(self.num_envs, 1).copy()
        return TensorDict._new_unsafe(
            {k: torch.from_numpy(v) for k, v in arrays.items()}, batch_size=self.batch_size, device=self.device
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action").detach().cpu().numpy()
        if action.shape != self._action_shape:
            raise ValueError(f"{self.task_name}: action must have shape {self._action_shape}, got {action.shape}")
        if not (np.abs(action) <= 1.0).all():
            raise ValueError(
                f"{self.task_name}: actions must lie in [-1, 1] (they are rescaled to the task's bounds here), "
                f"got min {action.min():.6g}, max {action.max():.6g} ({int(np.isnan(action).sum())} NaN)"
            )
        if self._needs_reset.any():
            raise RuntimeError(
                f"{self.task_name}: envs {np.flatnonzero(self._needs_reset).tolist()} must be reset before "
                "stepping (new env or episode over): use reset() or step_and_maybe_reset()"
            )
        # float64, what the simulators consume; C order because the slices travel as raw buffers (a policy's
        # output can be a transposed view, and numpy keeps that layout)
        scaled = np.ascontiguousarray(self._offset_np + self._scale_np * action)
        obs, reward, terminated, truncated = self._gather(
            self._pool.call("step", [scaled[lo:hi] for lo, hi in self._bounds])
        )
        done = terminated | truncated
        self._needs_reset = done[:, 0].copy()
        return self._output(observation=obs, reward=reward, done=done, terminated=terminated, truncated=truncated)

    def _reset(self, tensordict: TensorDictBase | None, **kwargs: Any) -> TensorDictBase:
        mask = None if tensordict is None else tensordict.get("_reset", None)
        if mask is None:
            mask_np = np.ones(self.num_envs, dtype=np.bool_)
        else:
            mask_np = mask.reshape(self.num_envs).cpu().numpy()
        obs, _, terminated, truncated = self._gather(
            self._pool.call("reset", [mask_np[lo:hi] for lo, hi in self._bounds])
        )
        self._needs_reset &= ~mask_np
        return self._output(observation=obs, done=terminated | truncated, terminated=terminated, truncated=truncated)

    def step_and_maybe_reset(self, tensordict: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        """TorchRL's `EnvBase.step_and_maybe_reset` for this env, without its generic machinery (spec checks, key
        completion, `step_mdp`), which cost more than an EnvPool batch step at N = 8: `tensordict` gains ``next``
        (observation, reward and the done flags, the true final observation where an episode ended), and the
        returned root holds the next observations, those of the episodes that ended replaced by their reset
        observations (with cleared done flags). tests/test_dmc_env.py checks it against TorchRL's own."""
        nxt = self._step(tensordict)
        tensordict.set("next", nxt)
        done = nxt.get("done")
        keys = ("observation", "done", "terminated", "truncated", *(("success",) if self._reports_success else ()))
        root = {key: nxt.get(key) for key in keys}
        if bool(done.any()):
            reset = self._reset(TensorDict._new_unsafe({"_reset": done}, batch_size=self.batch_size))
            root = {key: reset.get(key) for key in root}  # the other envs' rows are their current (final) ones
        return tensordict, TensorDict._new_unsafe(root, batch_size=self.batch_size, device=self.device)

    def _set_seed(self, seed: int | None) -> None:
        """Env i's RNG restarts from ``(seed + i) mod 2**32``; it applies from each env's next reset (a pool that
        seeds only when it builds its envs, EnvPool, restarts every env: each must be reset before stepping)."""
        if seed is None:
            seed = int(torch.randint(0, MAX_SEED, ()).item())
        seed = check_int("seed", seed, 0, MAX_SEED - 1)
        self._pool.call("seed", [np.array([seed], dtype=np.int64)] * len(self._bounds))
        if self._reseed_restarts:
            self._needs_reset[:] = True
        self.base_seed = seed

    def close(self, *, raise_if_closed: bool = True) -> None:
        pool = self.__dict__.get("_pool")
        if pool is not None:
            pool.close()
        super().close(raise_if_closed=raise_if_closed)

    def __enter__(self) -> PooledEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
