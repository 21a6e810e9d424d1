"""Meta-World (the Sawyer arm's manipulation tasks) through EnvPool's C++ port, as a batched TorchRL env
(`MetaWorldEnv`; a policy library's second embodiment, docs/library.md).

The `metaworld` package pins ``mujoco==3.3.0``, which dm_control 1.0.50 refuses; EnvPool 1.2.5 ships Meta-World
v3 in C++ with its assets (`envpool.make_gymnasium("MetaWorld/<Task>-v3")`, checked here: 39 observations, 4
actions in [-1, 1], 500-step episodes ending in a time-out, ``info["success"]``). `MetaWorldEnv` is `PooledEnv`'s
contract over it: several tasks split the envs evenly (all share the arm), a ``success`` flag per step (the task is
solved in that step; an episode succeeds if any of its steps does, Meta-World's success rate), env i seeded from
``seed + i`` (or its group's) when the pools are built.

`partially_observable=False` shows the goal position in the last 3 observation entries (single-task training needs
it); MT10 as Meta-World runs it hides it (True). The layout names follow Meta-World's `_get_obs`: hand position,
gripper opening, two objects' positions and quaternions, the same 18 of the previous step, the goal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fasttd3_lora.tasks.dmc_slice import slice_bounds
from fasttd3_lora.tasks.envpool_batch import EnvPoolBatch
from fasttd3_lora.tasks.pooled_env import MAX_SEED, PooledEnv, check_int

__all__ = ["PREFIX", "MT10", "metaworld_id", "MetaWorldPool", "MetaWorldEnv"]

PREFIX = "metaworld/"
MT10 = ("reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close", "button-press-topdown",
        "peg-insert-side", "window-open", "window-close")  # fmt: skip
_FRAME = [("hand_pos", (3,)), ("gripper_distance", (1,)), ("obj1_pos", (3,)), ("obj1_quat", (4,)),
          ("obj2_pos", (3,)), ("obj2_quat", (4,))]  # fmt: skip
LAYOUT = [*_FRAME, *((f"prev_{k}", s) for k, s in _FRAME), ("goal_pos", (3,))]
CONTROL_TIMESTEP = 0.0125  # MuJoCo's 2.5 ms step x Meta-World's frame skip of 5 (EnvPool's config)
EPISODE_STEPS = 500


def metaworld_id(task: str) -> str:
    """EnvPool's name: ``"metaworld/pick-place"`` (or ``"pick-place"``) -> ``"MetaWorld/PickPlace-v3"``."""
    name = task.removeprefix(PREFIX)
    return "MetaWorld/" + "".join(part.capitalize() for part in name.split("-")) + "-v3"


class MetaWorldPool(EnvPoolBatch):
    """`len(tasks)` EnvPool Meta-World envs, env i running ``tasks[i]``."""

    reports_success = True

    def __init__(self, tasks: Sequence[str], seed: int, action_repeat: int, max_episode_steps: int, num_threads: int,
                 partially_observable: bool, group_size: int = 1) -> None:  # fmt: skip
        super().__init__(tasks, action_repeat, num_threads, group_size)
        known = set(self._envpool.list_all_envs())
        for task in tasks:
            if metaworld_id(task) not in known:
                raise ValueError(f"{task}: EnvPool has no Meta-World task {metaworld_id(task)}")
        self._partially_observable = partially_observable
        self.infos = [{"layout": LAYOUT, "obs_dim": 39, "action_low": -np.ones(4), "action_high": np.ones(4),
                       "actuator_names": ["hand_dx", "hand_dy", "hand_dz", "gripper"],
                       "control_timestep": CONTROL_TIMESTEP, "max_episode_steps": max_episode_steps}]  # fmt: skip
        self._start(seed, 39)

    def _make(self, task: str, num_envs: int, seeds: list[int]) -> Any:
        return self._envpool.make_gymnasium(metaworld_id(task), num_envs=num_envs, batch_size=num_envs,
                                            num_threads=min(self._threads, num_envs), seed=0, env_seed=seeds,
                                            max_episode_steps=self._limit,
                                            partially_observable=self._partially_observable)  # fmt: skip

    def _step_pool(self, pool: Any, actions: np.ndarray, ids: np.ndarray) -> tuple[Any, ...]:
        obs, reward, terminated, truncated, info = pool.step(actions.astype(np.float32), ids)
        over = np.asarray(terminated) | np.asarray(truncated)
        success = np.asarray(info["success"]) > 0
        return np.asarray(info["env_id"], dtype=np.int32), reward, over, np.asarray(terminated)[over], obs, success

    def _reset_pool(self, pool: Any, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        obs, info = pool.reset(ids)
        return np.asarray(info["env_id"], dtype=np.int32), obs

    def _write(self, rows: np.ndarray, observation: Any) -> None:
        self._obs[rows] = observation


class MetaWorldEnv(PooledEnv):
    """`num_envs` Meta-World envs of one task or several (the envs split evenly in order), as `PooledEnv`."""

    def __init__(
        self,
        task: str | Sequence[str],
        num_envs: int = 1,
        *,
        action_repeat: int = 1,
        seed: int | None = None,
        max_episode_steps: int = EPISODE_STEPS,
        num_threads: int = 1,
        partially_observable: bool = False,
        group_size: int = 1,
    ) -> None:
        names = (task,) if isinstance(task, str) else tuple(task)
        if not names or any(not n.startswith(PREFIX) or n.removeprefix(PREFIX) == "" for n in names):
            raise ValueError(f"task must be metaworld/<task> or a non-empty sequence of them, got {task!r}")
        num_envs = check_int("num_envs", num_envs, 1)
        if num_envs % len(names):
            raise ValueError(f"num_envs={num_envs} must be a multiple of the {len(names)} tasks")
        seed = int(torch.randint(0, MAX_SEED, ()).item()) if seed is None else check_int("seed", seed, 0, MAX_SEED - 1)
        super().__init__(num_envs, names, check_int("action_repeat", action_repeat, 1), seed)
        per_task = num_envs // len(names)
        pool = MetaWorldPool([names[i // per_task] for i in range(num_envs)], seed, action_repeat,
                             check_int("max_episode_steps", max_episode_steps, 1), check_int("num_threads", num_threads, 1),
                             partially_observable, check_int("group_size", group_size, 1, num_envs))  # fmt: skip
        self._attach(pool, slice_bounds(num_envs, 1), reseed_restarts=True)
