"""N DeepMind Control environments stepped as one batch, as a TorchRL env (issue 3 item 1; DESIGN §5, §9).

`DMCEnv("dmc/cheetah-run", num_envs=N)` is a `torchrl.envs.EnvBase` with ``batch_size=[N]``:

* ``observation``: float32 ``(N, obs_dim)``, the task's observation dict flattened in the order of its
  ``observation_spec()`` (`observation_layout()` lists ``[(key, shape)]``; scalars take one slot).
* ``action``: float32 ``(N, act_dim)`` in [-1, 1], rescaled affinely to the task's bounds
  (``env_action = action_offset + action_scale * action``). Actions outside [-1, 1] (or NaN) are rejected with a
  `ValueError`, not clipped: a policy that leaves the box (a forgotten tanh, noise not clamped) is a bug to see.
* ``reward``: float32 ``(N, 1)``, summed over the ``action_repeat`` simulator steps of one agent step; repeating
  stops at the episode's end.
* ``terminated`` / ``truncated`` / ``done = terminated | truncated``: bool ``(N, 1)``. A dm_control time limit is
  a truncation; ``terminated`` is a LAST step with discount 0, which no time-limited suite task produces.

Episodes end after `max_episode_steps` *control* steps (the task's time limit, or the given override), i.e.
``ceil(max_episode_steps / action_repeat)`` agent steps; `control_period` is the seconds of one agent step,
``physics.timestep() * n_sub_steps * action_repeat``; `joint_names` names the actuator of each action dimension
(DMC names actuators after the joint or tendon they drive). Env i is seeded with ``(seed + i) mod 2**32`` whatever the number of
workers, so results do not depend on `num_workers`. Partial resets follow TorchRL: ``_reset`` masks in
`reset`, and `step_and_maybe_reset` keeps the true final observation under ``("next", "observation")``.

Stepping runs in forked worker processes (`vector_workers.ProcessPool`; each steps a contiguous slice of the
envs with numpy and sends back one buffer per step; workers never render, so no GL/EGL context is needed), or in
this process when ``num_workers=0`` (the default for one env). Close with `close()` or a ``with`` block;
workers never outlive the parent (see `vector_workers`).
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from fasttd3_lora.tasks.dmc_families import ALL_TASKS
from fasttd3_lora.tasks.dmc_slice import DMCSlice, result_views, slice_bounds
from fasttd3_lora.tasks.vector_workers import LocalPool, ProcessPool

PREFIX = "dmc/"
_METHODS = ("step", "reset", "seed", "render")
_MAX_SEED = 2**32  # dm_control seeds a numpy RandomState, which takes seeds in [0, 2**32)


BACKENDS = ("dm_control", "envpool")


def list_dmc_tasks() -> list[str]:
    """Every task of `dm_control.suite.ALL_TASKS` and of `dmc_families.EXTRA_TASKS` as ``dmc/<domain>-<task>``."""
    return [f"{PREFIX}{domain}-{task}" for domain, task in ALL_TASKS]


def parse_dmc_task(name: str) -> tuple[str, str]:
    """``"dmc/ball_in_cup-catch"`` -> ``("ball_in_cup", "catch")``; unknown names list close matches."""
    known = {f"{PREFIX}{domain}-{task}": (domain, task) for domain, task in ALL_TASKS}
    if name in known:
        return known[name]
    bare = [k.removeprefix(PREFIX) for k in known]
    close = difflib.get_close_matches(str(name).removeprefix(PREFIX), bare, n=5, cutoff=0.6)
    hint = ", ".join(PREFIX + c for c in close) if close else "none (see list_dmc_tasks())"
    raise ValueError(f"unknown DMC task {name!r}; expected dmc/<domain>-<task>, close matches: {hint}")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low or (
        high is not None and value > high
    ):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    return int(value)


class DMCEnv(EnvBase):
    """`num_envs` envs of one DMC task (or of several tasks of one embodiment) as a batched TorchRL env (see the
    module docstring for the contract).

    `task` is a name, or a sequence of names that split the envs evenly in order (env i runs
    ``tasks[i // (num_envs / len(tasks))]``; `task_ids` gives each env's index into `task_names`, None for one
    task). `seed=None` draws the base seed from torch's global generator (so ``torch.manual_seed`` makes runs
    reproducible). `backend="dm_control"` steps dm_control's Python envs: `num_workers=None` means one worker per
    CPU core, at most one per env, and none (in-process) for a single env; workers pay only when each has several
    expensive steps per batch step (measured on 2 vCPUs: humanoid N = 8 gains 1.2x over ``num_workers=0``, cheetah
    loses at every N; docs/env_throughput.md). `backend="envpool"` steps EnvPool's C++ port of the same tasks
    (`fasttd3_lora.tasks.dmc_envpool`; `num_workers` is then its thread count). `timeout_s` bounds the wait for
    any worker reply. `group_size=G` seeds env i from ``seed + i // G``: each run of G consecutive envs starts its
    episodes from the same states (group-relative fine-tuning, `fasttd3_lora.grpo`).
    """

    def __init__(
        self,
        task: str | Sequence[str],
        num_envs: int = 1,
        *,
        action_repeat: int = 1,
        seed: int | None = None,
        max_episode_steps: int | None = None,
        num_workers: int | None = None,
        timeout_s: float = 120.0,
        backend: str = "dm_control",
        group_size: int = 1,
    ) -> None:
        names = (task,) if isinstance(task, str) else tuple(task)
        if not names:
            raise ValueError("task must be a DMC task name or a non-empty sequence of them")
        parsed = [parse_dmc_task(name) for name in names]
        num_envs = _check_int("num_envs", num_envs, 1)
        group_size = _check_int("group_size", group_size, 1, num_envs)
        if num_envs % len(names):
            raise ValueError(f"num_envs={num_envs} must be a multiple of the {len(names)} tasks")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: allowed one of {', '.join(BACKENDS)}")
        action_repeat = _check_int("action_repeat", action_repeat, 1)
        if max_episode_steps is not None:
            max_episode_steps = _check_int("max_episode_steps", max_episode_steps, 1)
        if num_workers is None:
            num_workers = 0 if num_envs == 1 and backend == "dm_control" else min(num_envs, os.cpu_count() or 1)
        num_workers = _check_int("num_workers", num_workers, 0, num_envs)
        if seed is None:
            seed = int(torch.randint(0, _MAX_SEED, ()).item())
        seed = _check_int("seed", seed, 0, _MAX_SEED - 1)
        super().__init__(batch_size=torch.Size([num_envs]), device="cpu")

        self.task_name = names[0] if len(names) == 1 else ",".join(names)
        self.task_names = names
        per_task = num_envs // len(names)
        self.task_ids = None if len(names) == 1 else torch.arange(num_envs) // per_task
        env_tasks = [parsed[i // per_task] for i in range(num_envs)]
        self.num_envs = num_envs
        self.action_repeat = action_repeat
        self.base_seed = seed
        self.backend = backend
        if backend == "envpool":
            from fasttd3_lora.tasks.dmc_envpool import EnvPoolBatch

            self._bounds = slice_bounds(num_envs, 1)
            self._pool: LocalPool | ProcessPool | EnvPoolBatch = EnvPoolBatch(
                env_tasks, seed, action_repeat, max_episode_steps, num_threads=max(num_workers, 1), group_size=group_size)
        else:
            self._bounds = slice_bounds(num_envs, max(num_workers, 1))
            factories = [
                functools.partial(DMCSlice, env_tasks[lo:hi], seed, lo, action_repeat, max_episode_steps, group_size)
                for lo, hi in self._bounds
            ]
            if num_workers == 0:
                self._pool = LocalPool(factories, methods=_METHODS, name=self.task_name)
            else:
                self._pool = ProcessPool(factories, methods=_METHODS, name=self.task_name, timeout_s=timeout_s)
        self.is_closed = False
        info = self._pool.infos[0]
        if info["max_episode_steps"] is None:
            self.close()
            raise ValueError(f"{self.task_name} has no time limit; pass max_episode_steps (control steps per episode)")
        self.max_episode_steps: int = info["max_episode_steps"]
        self.control_period: float = info["control_timestep"] * action_repeat
        self._layout: list[tuple[str, tuple[int, ...]]] = info["layout"]
        self._obs_dim: int = info["obs_dim"]
        low, high = info["action_low"], info["action_high"]
        # float64 for the rescale done in numpy before sending; float32 copies for export metadata.
        self._scale_np = (high - low) / 2.0
        self._offset_np = (high + low) / 2.0
        self.action_scale = torch.as_tensor(self._scale_np, dtype=torch.float32)
        self.action_offset = torch.as_tensor(self._offset_np, dtype=torch.float32)
        # One name per action dimension, in action order (the export's "joint names in the trained order").
        self.joint_names: list[str] = info["actuator_names"]
        self._needs_reset = np.ones(num_envs, dtype=np.bool_)

        n, act_dim = num_envs, len(low)
        self._action_shape = (n, act_dim)
        self.observation_spec = Composite(
            observation=Unbounded(shape=(n, self._obs_dim), dtype=torch.float32), shape=(n,)
        )
        self.action_spec = Bounded(low=-1.0, high=1.0, shape=(n, act_dim), dtype=torch.float32)
        self.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32)
        flag = functools.partial(Categorical, 2, (n, 1), dtype=torch.bool)
        self.done_spec = Composite(done=flag(), terminated=flag(), truncated=flag(), shape=(n,))

    def observation_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(key, shape)]`` of the flattened observation, in order (a scalar has shape ``()``, one slot)."""
        return list(self._layout)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers (empty when stepping in-process)."""
        return self._pool.pids

    def _gather(self, replies: list[Any]) -> tuple[np.ndarray, ...]:
        """Copy the workers' result buffers into fresh arrays (the buffers are reused on the next call)."""
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
        # float64, what dm_control consumes; C order because the slices travel as raw buffers (a policy's output
        # can be a transposed view, and numpy keeps that layout)
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

    def render_frame(self, env_index: int = 0, height: int = 240, width: int = 320, camera_id: int = 0) -> np.ndarray:
        """A (height, width, 3) uint8 RGB frame of env `env_index` (videos, `fasttd3_lora.play`). Rendering needs
        MuJoCo's OpenGL (`fasttd3_lora.video.prepare_rendering` picks EGL or OSMesa before dm_control loads) and
        runs in this process: an env stepped by workers or by EnvPool is refused in one line."""
        if self.backend != "dm_control" or not isinstance(self._pool, LocalPool):
            raise ValueError(f"{self.task_name}: rendering needs backend=dm_control stepped in this process "
                             f"(num_workers=0); this env has backend={self.backend}, {len(self._pool.pids)} workers")  # fmt: skip
        _check_int("env_index", env_index, 0, self.num_envs - 1)
        payload = np.array([env_index, height, width, camera_id], dtype=np.int64)  # in-process: one slice of all
        (frame,) = self._pool.call("render", [payload])
        return np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3).copy()

    def step_and_maybe_reset(self, tensordict: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        """TorchRL's `EnvBase.step_and_maybe_reset` for this env, without its generic machinery (spec checks, key
        completion, `step_mdp`), which cost more than an EnvPool batch step at N = 8: `tensordict` gains ``next``
        (observation, reward and the done flags, the true final observation where an episode ended), and the
        returned root holds the next observations, those of the episodes that ended replaced by their reset
        observations (with cleared done flags). tests/test_dmc_env.py checks it against TorchRL's own."""
        nxt = self._step(tensordict)
        tensordict.set("next", nxt)
        done = nxt.get("done")
        root = {key: nxt.get(key) for key in ("observation", "done", "terminated", "truncated")}
        if bool(done.any()):
            reset = self._reset(TensorDict._new_unsafe({"_reset": done}, batch_size=self.batch_size))
            root = {key: reset.get(key) for key in root}  # the other envs' rows are their current (final) ones
        return tensordict, TensorDict._new_unsafe(root, batch_size=self.batch_size, device=self.device)

    def _set_seed(self, seed: int | None) -> None:
        """Env i's task RNG restarts from ``(seed + i) mod 2**32``; it applies from each env's next reset (EnvPool
        seeds only when it builds its envs: there every env restarts and must be reset before stepping)."""
        if seed is None:
            seed = int(torch.randint(0, _MAX_SEED, ()).item())
        seed = _check_int("seed", seed, 0, _MAX_SEED - 1)
        self._pool.call("seed", [np.array([seed], dtype=np.int64)] * len(self._bounds))
        if self.backend == "envpool":
            self._needs_reset[:] = True
        self.base_seed = seed

    def close(self, *, raise_if_closed: bool = True) -> None:
        pool = self.__dict__.get("_pool")
        if pool is not None:
            pool.close()
        super().close(raise_if_closed=raise_if_closed)

    def __enter__(self) -> DMCEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
