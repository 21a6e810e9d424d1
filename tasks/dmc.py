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

``spread_starts=True`` (dm_control only) makes `randomize_episode_starts` cut every env's current episode short at
a random step, as FastTD3's ``random_start_init`` does on Isaac Lab, so a batch of envs does not time out (and
restart) in lockstep: the training loops call it after each start of all episodes (`fasttd3_lora.loops.kit`).

With ``backend="dm_control"`` the running episodes can be saved and continued exactly (`snapshot` /
`restore_episodes`; `fasttd3_lora.tasks.dmc_slice` says what an episode's state is), so a training run's
checkpoint cuts none of them (`can_snapshot`). EnvPool's envs cannot be saved.
"""

from __future__ import annotations

import difflib
import functools
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from fasttd3_lora.tasks.dmc_families import ALL_TASKS
from fasttd3_lora.tasks.dmc_slice import DMCSlice, slice_bounds
from fasttd3_lora.tasks.pooled_env import MAX_SEED, PooledEnv, check_int
from fasttd3_lora.tasks.vector_workers import LocalPool, ProcessPool

PREFIX = "dmc/"
_METHODS = ("step", "reset", "seed", "render", "shorten", "snapshot", "restore")


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


def _map_arrays(fn: Any, state: dict[str, Any]) -> dict[str, Any]:
    """An env's snapshot (`DMCSlice.snapshot`: values and one level of named model arrays) with `fn` applied to
    every value: numpy arrays to tensors for a checkpoint, and back."""
    return {k: {n: fn(a) for n, a in v.items()} if isinstance(v, dict) else fn(v) for k, v in state.items()}


class DMCEnv(PooledEnv):
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
    episodes from the same states (group-relative fine-tuning, `fasttd3_lora.grpo`). `spread_starts`: see the
    module docstring.
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
        spread_starts: bool = False,
    ) -> None:
        names = (task,) if isinstance(task, str) else tuple(task)
        if not names:
            raise ValueError("task must be a DMC task name or a non-empty sequence of them")
        parsed = [parse_dmc_task(name) for name in names]
        num_envs = check_int("num_envs", num_envs, 1)
        group_size = check_int("group_size", group_size, 1, num_envs)
        if num_envs % len(names):
            raise ValueError(f"num_envs={num_envs} must be a multiple of the {len(names)} tasks")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: allowed one of {', '.join(BACKENDS)}")
        action_repeat = check_int("action_repeat", action_repeat, 1)
        if max_episode_steps is not None:
            max_episode_steps = check_int("max_episode_steps", max_episode_steps, 1)
        if num_workers is None:
            num_workers = 0 if num_envs == 1 and backend == "dm_control" else min(num_envs, os.cpu_count() or 1)
        num_workers = check_int("num_workers", num_workers, 0, num_envs)
        if seed is None:
            seed = int(torch.randint(0, MAX_SEED, ()).item())
        seed = check_int("seed", seed, 0, MAX_SEED - 1)
        if spread_starts and backend != "dm_control":
            raise ValueError(f"spread_starts=True needs backend=dm_control, got backend={backend}")
        super().__init__(num_envs, names, action_repeat, seed)
        self.backend, self.spreads_starts = backend, bool(spread_starts)
        per_task = num_envs // len(names)
        env_tasks = [parsed[i // per_task] for i in range(num_envs)]
        if backend == "envpool":
            from fasttd3_lora.tasks.dmc_envpool import DMCEnvPool

            pool = DMCEnvPool(env_tasks, seed, action_repeat, max_episode_steps, num_threads=max(num_workers, 1),
                                group_size=group_size)  # fmt: skip
            self._attach(pool, slice_bounds(num_envs, 1), reseed_restarts=True)
            return
        bounds = slice_bounds(num_envs, max(num_workers, 1))
        factories = [functools.partial(DMCSlice, env_tasks[lo:hi], seed, lo, action_repeat, max_episode_steps, group_size)
                     for lo, hi in bounds]  # fmt: skip
        if num_workers == 0:
            self._attach(LocalPool(factories, methods=_METHODS, name=self.task_name), bounds)
        else:
            self._attach(ProcessPool(factories, methods=_METHODS, name=self.task_name, timeout_s=timeout_s), bounds)

    def randomize_episode_starts(self, seed: int) -> None:
        """End every env's current episode after a random number of control steps, uniform in [1,
        max_episode_steps] and drawn from `seed` (a time-out), so the first ends spread over an episode (no-op
        without ``spread_starts``). Call right after a full reset."""
        if not self.spreads_starts:
            return
        lengths = np.random.default_rng(int(seed)).integers(1, self.max_episode_steps, self.num_envs, endpoint=True)
        self._pool.call("shorten", [lengths[lo:hi].astype(np.int64) for lo, hi in self._bounds])

    @property
    def can_snapshot(self) -> bool:
        """Whether `snapshot` / `restore_episodes` work: dm_control's envs, not EnvPool's."""
        return self.backend == "dm_control"

    def snapshot(self) -> dict[str, Any]:
        """Every env's running episode as tensors and numbers (a checkpoint holds it; ``weights_only`` loads it):
        ``{"tasks": [task of each env], "envs": [one dict per env]}``. Take it between steps, after the finished
        envs were reset (`step_and_maybe_reset`)."""
        if not self.can_snapshot:
            raise ValueError(f"{self.task_name}: backend={self.backend} cannot save its envs' episodes")
        if self._needs_reset.any():
            raise RuntimeError(f"{self.task_name}: envs {np.flatnonzero(self._needs_reset).tolist()} wait for a reset; "
                               "snapshot between steps, after step_and_maybe_reset")  # fmt: skip
        replies = self._pool.call("snapshot", [b""] * len(self._bounds))
        envs = [state for reply in replies for state in pickle.loads(reply)]  # from our own workers
        as_tensor = lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v  # noqa: E731
        return {"tasks": self._env_tasks(), "envs": [_map_arrays(as_tensor, state) for state in envs]}

    def restore_episodes(self, saved: dict[str, Any]) -> TensorDict:
        """Continue the episodes of `snapshot` (from an env of the same tasks and size); returns the current
        observations as `reset` does. A snapshot of other envs raises `ValueError` in one line."""
        if saved.get("tasks") != self._env_tasks():
            theirs = saved.get("tasks") or []
            raise ValueError(f"{self.task_name}: the saved episodes are of {len(theirs)} envs of "
                             f"{sorted(set(theirs))}, this env has {self.num_envs} of {list(self.task_names)}")  # fmt: skip
        as_numpy = lambda v: v.numpy() if isinstance(v, torch.Tensor) else v  # noqa: E731
        envs = [_map_arrays(as_numpy, state) for state in saved["envs"]]
        replies = self._pool.call("restore", [pickle.dumps(envs[lo:hi]) for lo, hi in self._bounds])
        obs, _, terminated, truncated = self._gather(replies)
        self._needs_reset[:] = False
        return self._output(observation=obs, done=terminated | truncated, terminated=terminated, truncated=truncated)

    def _env_tasks(self) -> list[str]:
        per_task = self.num_envs // len(self.task_names)
        return [self.task_names[i // per_task] for i in range(self.num_envs)]

    def render_frame(self, env_index: int = 0, height: int = 240, width: int = 320, camera_id: int = 0) -> np.ndarray:
        """A (height, width, 3) uint8 RGB frame of env `env_index` (videos, `fasttd3_lora.play`). Rendering needs
        MuJoCo's OpenGL (`fasttd3_lora.video.prepare_rendering` picks EGL or OSMesa before dm_control loads) and
        runs in this process: an env stepped by workers or by EnvPool is refused in one line."""
        if self.backend != "dm_control" or not isinstance(self._pool, LocalPool):
            raise ValueError(f"{self.task_name}: rendering needs backend=dm_control stepped in this process "
                             f"(num_workers=0); this env has backend={self.backend}, {len(self._pool.pids)} workers")  # fmt: skip
        check_int("env_index", env_index, 0, self.num_envs - 1)
        payload = np.array([env_index, height, width, camera_id], dtype=np.int64)  # in-process: one slice of all
        (frame,) = self._pool.call("render", [payload])
        return np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3).copy()
