"""A contiguous slice of DeepMind Control environments, stepped with numpy only.

This is the unit of work of one worker process of `fasttd3_lora.tasks.dmc.DMCEnv` (or of the parent itself when
it runs in-process). It runs numpy and the simulator only, no torch ops.

Every method takes a bytes-like payload and returns the same result buffer, laid out by `result_views`:
``[observation float32 (n, obs_dim)] [reward float32 (n,)] [terminated bool (n,)] [truncated bool (n,)]``.
Sending that one buffer over a pipe is the whole per-step message of a worker.

Observations are flattened in the order of the task's own ``observation_spec()`` (the order dm_control's
``flat_observation`` uses); ``observation_layout`` lists it as ``[(key, shape)]``. Episode length is counted in
control steps (simulator steps of the dm_control ``Environment``), before action repeat.

Snapshots (`snapshot` / `restore`: a run's checkpoint keeps its running episodes, so none is cut). An env's
episode is: MuJoCo's integration state (``mj_getState(..., mjSTATE_INTEGRATION)``: time, qpos, qvel, act, the
solver's warm start, controls, applied forces, mocap), the model arrays its task changed at the episode's start
(reacher's and fish's targets, finger's damping, stacker's blocks, ...: every array that differs from the model as
loaded), the task's random generator, and the step counters. Restoring sets them into a freshly loaded env and
runs ``mj_step1`` (what dm_control runs after each step, so the position- and velocity-derived quantities are
current); scripts/check_dmc_snapshots.py checks that every task continues bit for bit (tests/test_dmc_env.py
checks a sample).
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Sequence
from typing import Any

import mujoco
import numpy as np

from fasttd3_lora.tasks.dmc_families import load

# Offsets of the result buffer are multiples of 4 bytes before the bool columns, so float32 views are aligned.
_F32 = np.dtype(np.float32).itemsize
_STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # everything mj_step reads that is not derived or in the model


def result_nbytes(num_envs: int, obs_dim: int) -> int:
    """Size in bytes of the result buffer of a slice of `num_envs` envs."""
    return num_envs * (obs_dim + 1) * _F32 + 2 * num_envs


def result_views(
    buf: Any, num_envs: int, obs_dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(observation (n, obs_dim) f32, reward (n,) f32, terminated (n,) bool, truncated (n,) bool) viewing `buf`."""
    n_obs = num_envs * obs_dim
    obs = np.frombuffer(buf, np.float32, n_obs, 0).reshape(num_envs, obs_dim)
    reward = np.frombuffer(buf, np.float32, num_envs, n_obs * _F32)
    flags_at = (n_obs + num_envs) * _F32
    terminated = np.frombuffer(buf, np.bool_, num_envs, flags_at)
    truncated = np.frombuffer(buf, np.bool_, num_envs, flags_at + num_envs)
    return obs, reward, terminated, truncated


class DMCSlice:
    """Envs ``first_index .. first_index + len(tasks) - 1`` of a vector of DMC envs; env j of the slice runs
    ``tasks[j]`` (a ``(domain, task)`` of `dmc_families.ALL_TASKS`; several tasks must share one embodiment).

    Env ``i`` (global index) is seeded with ``(seed + i // group_size) mod 2**32``: consecutive groups of
    `group_size` envs draw the same episode starts (group-relative fine-tuning compares rollouts from one start).
    ``max_episode_steps=None`` keeps the task's own time limit; an int replaces it (the dm_control limit is switched
    off and this slice counts control steps).
    """

    def __init__(
        self,
        tasks: Sequence[tuple[str, str]],
        seed: int,
        first_index: int,
        action_repeat: int,
        max_episode_steps: int | None,
        group_size: int = 1,
    ) -> None:
        task_kwargs: dict[str, Any] = {}
        if max_episode_steps is not None:
            task_kwargs["time_limit"] = float("inf")
        self._first_index, self._group_size = first_index, group_size
        num_envs = len(tasks)
        self._envs = [
            load(domain, task, task_kwargs={**task_kwargs, "random": env_seed(seed, (first_index + j) // group_size)})
            for j, (domain, task) in enumerate(tasks)
        ]
        env = self._envs[0]
        self._action_repeat = action_repeat
        # dm_control ends an episode once its step count reaches `_step_limit` (time_limit / control_timestep,
        # a float), i.e. after ceil(_step_limit) steps; it is inf for tasks without a time limit (LQR).
        self.max_episode_steps: int | None = max_episode_steps
        if max_episode_steps is None and math.isfinite(env._step_limit):
            self.max_episode_steps = math.ceil(env._step_limit)
        self._limit = math.inf if self.max_episode_steps is None else self.max_episode_steps
        self.layout = [(key, tuple(spec.shape)) for key, spec in env.observation_spec().items()]
        for (domain, task), other in zip(tasks, self._envs):
            theirs = [(key, tuple(spec.shape)) for key, spec in other.observation_spec().items()]
            if theirs != self.layout or other.action_spec().shape != env.action_spec().shape:
                raise ValueError(f"dmc/{domain}-{task} does not share the embodiment of dmc/{'-'.join(tasks[0])} "
                                 "(observations or actions differ); the tasks of one vector env must")  # fmt: skip
        self._slots = []
        offset = 0
        for key, shape in self.layout:
            size = math.prod(shape)
            self._slots.append((key, slice(offset, offset + size)))
            offset += size
        self.obs_dim = offset
        self._buf = bytearray(result_nbytes(num_envs, offset))
        self._obs, self._reward, self._terminated, self._truncated = result_views(self._buf, num_envs, offset)
        self._steps = np.zeros(num_envs, dtype=np.int64)
        # each env's current episode length: the limit, or less for a spread start's first episode (`shorten`)
        self._episode_limit = np.full(num_envs, float(self._limit))
        # the models as loaded: a snapshot keeps the arrays a task changed since (`snapshot`)
        self._pristine = [copy.copy(env.physics.model.ptr) for env in self._envs]
        self._model_arrays = [name for name in dir(self._pristine[0])
                              if not name.startswith("_") and isinstance(getattr(self._pristine[0], name), np.ndarray)]  # fmt: skip

    def info(self) -> dict[str, Any]:
        """What the parent needs to build specs and attributes (sent once, pickled)."""
        env = self._envs[0]
        spec = env.action_spec()
        model = env.physics.model
        return {
            # action i drives actuator i; DMC names each actuator after the joint (or tendon) it moves
            "actuator_names": [model.id2name(i, "actuator") for i in range(model.nu)],
            "layout": self.layout,
            "obs_dim": self.obs_dim,
            "action_low": np.asarray(spec.minimum, dtype=np.float64),
            "action_high": np.asarray(spec.maximum, dtype=np.float64),
            "control_timestep": float(env.control_timestep()),
            "max_episode_steps": self.max_episode_steps,
        }

    def _write_obs(self, i: int, observation: dict[str, np.ndarray]) -> None:
        row = self._obs[i]
        for key, slot in self._slots:
            row[slot] = np.ravel(observation[key])

    def step(self, payload: Any) -> memoryview:
        """Step every env with its action (float64, already in the task's bounds), repeating it.

        No env may be past its episode end (dm_control would silently reset it): `DMCEnv` checks that first.
        """
        actions = np.frombuffer(payload, dtype=np.float64).reshape(len(self._envs), -1)
        for i, env in enumerate(self._envs):
            total, limit = 0.0, self._episode_limit[i]
            for _ in range(self._action_repeat):
                ts = env.step(actions[i])
                total += ts.reward
                self._steps[i] += 1
                if ts.last() or self._steps[i] >= limit:
                    break
            # dm_control marks a true termination by a LAST step with discount 0; a time limit keeps discount 1.
            terminated = ts.last() and ts.discount == 0.0
            self._terminated[i] = terminated
            self._truncated[i] = not terminated and (ts.last() or self._steps[i] >= limit)
            self._reward[i] = total
            self._write_obs(i, ts.observation)
        return memoryview(self._buf)

    def reset(self, payload: Any) -> memoryview:
        """Reset the envs where the bool mask is True; the others keep their current observation."""
        mask = np.frombuffer(payload, dtype=np.bool_)
        for i in np.flatnonzero(mask):
            ts = self._envs[i].reset()
            self._steps[i] = 0
            self._episode_limit[i] = self._limit
            self._write_obs(i, ts.observation)
        self._reward[mask] = 0.0
        self._terminated[mask] = False
        self._truncated[mask] = False
        return memoryview(self._buf)

    def render(self, payload: Any) -> memoryview:
        """A (height, width, 3) uint8 frame of env ``index`` from MuJoCo camera ``camera`` (payload: int64
        ``[index, height, width, camera]``). Needs an OpenGL backend (MUJOCO_GL=egl or osmesa), so it runs in the
        process that asked for it (`DMCEnv.render_frame`), never in a worker."""
        index, height, width, camera = (int(v) for v in np.frombuffer(payload, dtype=np.int64))
        frame = self._envs[index].physics.render(height=height, width=width, camera_id=camera)
        return memoryview(np.ascontiguousarray(frame, dtype=np.uint8)).cast("B")

    def shorten(self, payload: Any) -> memoryview:
        """End each env's current episode as a time-out after the given number of control steps (int64, one per
        env; a spread start, `DMCEnv.randomize_episode_starts`); later episodes keep the full limit."""
        self._episode_limit[:] = np.minimum(self._limit, np.frombuffer(payload, dtype=np.int64))
        return memoryview(self._buf)

    def snapshot(self, payload: Any) -> bytes:
        """Every env's running episode (module docstring) as a pickled list of dicts of numpy arrays and numbers,
        for the parent (`DMCEnv.snapshot`), which turns them into tensors."""
        states = []
        for env, pristine, steps, limit in zip(self._envs, self._pristine, self._steps, self._episode_limit, strict=True):
            model, data = env.physics.model.ptr, env.physics.data.ptr
            integration = np.empty(mujoco.mj_stateSize(model, _STATE))
            mujoco.mj_getState(model, data, integration, _STATE)
            changed = {}
            for name in self._model_arrays:
                now, loaded = getattr(model, name), getattr(pristine, name)
                if not np.array_equal(now, loaded, equal_nan=now.dtype.kind in "fc"):
                    changed[name] = now.copy()
            _, keys, pos, has_gauss, cached_gaussian = env.task.random.get_state()
            states.append({"integration": integration, "model": changed, "rng_keys": keys.astype(np.int64),
                           "rng": np.array([pos, has_gauss], dtype=np.int64), "rng_gaussian": float(cached_gaussian),
                           "step_count": int(env._step_count), "steps": int(steps), "episode_limit": float(limit)})  # fmt: skip
        return pickle.dumps(states)

    def restore(self, payload: Any) -> memoryview:
        """Set every env to its saved episode (a pickled list from `snapshot`, one entry per env of this slice);
        the buffer then holds their current observations, with cleared rewards and flags."""
        states = pickle.loads(payload)  # pickled by DMCEnv from a checkpoint's tensors (loaded weights_only)
        if len(states) != len(self._envs):
            raise ValueError(f"restore: {len(states)} saved envs for a slice of {len(self._envs)}")
        for i, (env, pristine, state) in enumerate(zip(self._envs, self._pristine, states, strict=True)):
            model, data = env.physics.model.ptr, env.physics.data.ptr
            for name in self._model_arrays:  # the loaded model, then what the saved episode changed in it
                getattr(model, name)[...] = state["model"].get(name, getattr(pristine, name))
            mujoco.mj_setState(model, data, np.ascontiguousarray(state["integration"], dtype=np.float64), _STATE)
            mujoco.mj_step1(model, data)  # derived quantities, as after dm_control's own step
            pos, has_gauss = (int(v) for v in state["rng"])
            env.task.random.set_state(("MT19937", state["rng_keys"].astype(np.uint32), pos, has_gauss,
                                       state["rng_gaussian"]))  # fmt: skip
            env._step_count, env._reset_next_step = state["step_count"], False
            self._steps[i] = state["steps"]
            self._episode_limit[i] = state["episode_limit"]
            self._write_obs(i, env.task.get_observation(env.physics))
        self._reward[:] = 0.0
        self._terminated[:] = False
        self._truncated[:] = False
        return memoryview(self._buf)

    def seed(self, payload: Any) -> memoryview:
        """Re-seed env i's task RNG with ``(seed + i // group_size) mod 2**32``; it takes effect at each env's next
        reset."""
        (seed,) = np.frombuffer(payload, dtype=np.int64)
        for j, env in enumerate(self._envs):
            env.task.random.seed(env_seed(int(seed), (self._first_index + j) // self._group_size))
        return memoryview(self._buf)


def env_seed(seed: int, index: int) -> int:
    """Env `index`'s task seed: ``(seed + index) mod 2**32``, so every base seed numpy accepts works for any number
    of envs (dm_control seeds a numpy RandomState, which takes [0, 2**32))."""
    return (seed + index) % 2**32


def slice_bounds(num_envs: int, num_slices: int) -> Sequence[tuple[int, int]]:
    """Contiguous [lo, hi) ranges splitting `num_envs` into `num_slices` parts whose sizes differ by at most 1."""
    base, extra = divmod(num_envs, num_slices)
    bounds, lo = [], 0
    for k in range(num_slices):
        hi = lo + base + (k < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds
