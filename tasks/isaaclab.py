"""Isaac Lab tasks as a batched TorchRL env (issue 4 items 3-4; DESIGN §6-§7; docs/isaaclab.md).

`IsaacLabEnv(gym_env, task=...)` wraps an Isaac Lab env that already exists (``gym.make`` output, or the GPU-free
stand-in of the tests); `make_isaaclab_env(name, num_envs, seed, device)` is the thin launcher that starts the
simulator, builds the task's config and makes that env. Isaac Lab is imported only inside the launcher, so
``import fasttd3_lora.tasks.isaaclab`` works without it; without it the launcher raises `IsaacLabUnavailable`
(one line saying how to get it), which the app turns into exit status 2.

The env is a `torchrl.envs.EnvBase` with ``batch_size=[num_envs]`` on the simulator's device:

* ``observation``: float32 ``(N, obs_dim)``, the task's ``policy`` observation group. ``critic_observation``:
  float32 ``(N, critic_dim)``, the ``critic`` group, present only when the task defines one (asymmetric critic).
* ``action``: float32 ``(N, act_dim)``. The wrapper clips it to [-1, 1] (NaN is rejected) and hands it to Isaac
  Lab unchanged, as FastTD3 does for Isaac Lab (its ``action_bounds`` is 1): Isaac Lab's action spaces are
  unbounded and its action terms apply their own map. ``action_scale`` / ``action_offset`` report that map, the
  joint command being ``action_offset + action_scale * action``, for export (DESIGN §8): read from manager-based
  action terms' ``_scale`` / ``_offset`` (the velocity tasks' joint-position term: ``default_joint_pos + 0.5 *
  action``), and for the Direct in-hand tasks from the joint limits that ``scale()`` maps [-1, 1] onto, with their
  ``act_moving_average`` as ``action_moving_average`` (per action, target ``<- m * command + (1 - m) * previous
  target``); Isaac Lab 3.0's Shadow hand ends its 20 actions with 4 tendon targets (``actuated_tendon_indices``,
  ``tendon_lower_limits`` / ``tendon_upper_limits``), mapped and named the same way, with no moving average.
  Where a term has no such map, or it differs between envs, they are ones / zeros and ``action_map_known`` is False.
* ``reward``: float32 ``(N, 1)``. ``terminated`` / ``truncated`` / ``done = terminated | truncated``: bool
  ``(N, 1)``. Time-outs are ``truncated``; a step that is both a termination and a time-out is ``terminated``
  only; a task whose config says ``is_finite_horizon`` reports its time-outs as ``terminated``.

Auto-reset. Isaac Lab resets finished envs inside ``step`` and returns the new episode's observation for them.
The wrapper keeps that observation and hands it out when TorchRL resets those envs
(`step_and_maybe_reset`, or `reset` with a ``_reset`` mask), without touching the simulator; a ``_reset`` mask
that names a running env is refused (Isaac Lab resets all envs or none), and stepping while a finished env is
still waiting for its reset raises. Under ``("next", "observation")`` a finished env gets:

* its true final observation when the env provides one (Isaac Lab 3.0 with ``compute_final_obs=True``, which
  the launcher sets; ``has_final_obs`` is then True), likewise ``("next", "critic_observation")``;
* otherwise (Isaac Lab 2.x has no final observation; ``has_final_obs`` is False) the reset observation. FastTD3's
  public code bootstraps its time-outs from that reset observation; FastTD3 here does the same on 2.x and uses
  the true final observation on 3.0 (DESIGN §6).

Also exposed: ``max_episode_steps``, ``control_period`` (``env.unwrapped.step_dt``, seconds per agent step),
``joint_names`` (in action order, when the task names them) and `observation_layout()` (the policy group's
terms and shapes, when the env has an observation manager), for export (DESIGN §8).

One Isaac Lab env per process: the simulation context is a singleton, so evaluation must use the training env.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from fasttd3_lora.tasks.isaaclab_names import IsaacLabTask, lookup_isaaclab_task

__all__ = [
    "DEFAULT_PHYSICS",
    "PHYSICS_BACKENDS",
    "IsaacLabEnv",
    "IsaacLabUnavailable",
    "detect_isaaclab",
    "launch_gym_env",
    "make_isaaclab_env",
    "wrap_or_close",
]

# Isaac Lab 3.0's physics presets of these tasks, chosen with parse_env_cfg(..., overrides=["physics=<name>"]),
# which keeps each task's tuned settings of that engine (passing `physics` to launch_simulation instead rebuilds
# every physics config from defaults: checked on the 3.0.0 wheel). `isaacsim_physx` is Isaac Sim's PhysX, the
# engine of the paper's (2.x) runs, and needs Isaac Sim; `physx` is Isaac Sim's PhysX where Kit runs, else OvPhysX;
# the Newton presets (3.0's own default for these tasks) run without Isaac Sim. A task may lack a preset
# (newton_kamino: locomotion only); Isaac Lab says which in one line.
PHYSICS_BACKENDS = ("isaacsim_physx", "physx", "ovphysx", "newton_mjwarp", "newton_kamino")
NEEDS_ISAAC_SIM = ("isaacsim_physx", "physx")
DEFAULT_PHYSICS = "isaacsim_physx"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
_GET_ISAACLAB = (
    "run it in the Docker image (`docker compose run --rm train task={task}`) or install Isaac Lab "
    "(`pip install 'isaaclab[isaacsim,all]' --extra-index-url https://pypi.nvidia.com`, Isaac Lab's pip guide; "
    "Python 3.10/3.11 for 2.x, 3.12 for 3.0)"
)


class IsaacLabUnavailable(RuntimeError):
    """Isaac Lab cannot be imported in this Python; the message is one line saying how to get it."""


def detect_isaaclab() -> str | None:
    """``"3.0"``, ``"2.x"`` or None (not installed), without importing Isaac Lab.

    3.0 is recognised by `launch_simulation` in ``isaaclab/app/`` (2.x has only `AppLauncher` there); the
    package's version number cannot tell, since source installs carry the extension's own 0.x version."""
    spec = importlib.util.find_spec("isaaclab")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for source in sorted((Path(root) / "app").glob("*.py")):
            if "def launch_simulation(" in source.read_text(encoding="utf-8", errors="replace"):
                return "3.0"
    return "2.x"


def _owned(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy: Isaac Lab overwrites its reward, done and observation buffers in place on the next step."""
    return value.to(dtype=dtype, copy=True)


def _joint_names(unwrapped: Any) -> list[str] | None:
    """Joint names in action order, when the task's action terms name them (None otherwise)."""
    manager = getattr(unwrapped, "action_manager", None)
    if manager is not None:  # manager-based: concatenated action terms, each a joint action naming its joints
        names: list[str] = []
        for term_name in manager.active_terms:
            term_joints = getattr(manager.get_term(term_name), "_joint_names", None)
            if term_joints is None:
                return None
            names.extend(term_joints)
        return names
    # Direct in-hand manipulation envs: action i drives hand.joint_names[actuated_dof_indices[i]]; Isaac Lab 3.0's
    # Shadow hand then pulls tendons with the last actions (hand.fixed_tendon_names[actuated_tendon_indices[j]]).
    hand, actuated = getattr(unwrapped, "hand", None), getattr(unwrapped, "actuated_dof_indices", None)
    if hand is None or actuated is None:
        return None
    names = [hand.joint_names[int(i)] for i in actuated]
    tendons = getattr(unwrapped, "actuated_tendon_indices", None)
    if tendons is not None:
        names += [hand.fixed_tendon_names[int(j)] for j in tendons]
    return names


def _per_action(value: Any, num_envs: int, dim: int) -> torch.Tensor | None:
    """A term's scale or offset (a float, or a tensor broadcastable to (num_envs, dim)) as one (dim,) row; None when
    it differs between envs (e.g. randomised default joint positions), which one deploy map cannot express."""
    rows = torch.as_tensor(value, dtype=torch.float32).cpu().expand(num_envs, dim)
    return rows[0].clone() if bool((rows == rows[0]).all()) else None


def _action_map(unwrapped: Any, act_dim: int) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
    """(scale, offset, moving average) of the task's action -> joint command map, or None when unknown."""
    n = int(unwrapped.num_envs)
    manager = getattr(unwrapped, "action_manager", None)
    if manager is not None:  # manager-based: processed = raw * _scale + _offset per term (JointAction and kin)
        scales, offsets = [], []
        for term_name in manager.active_terms:
            term = manager.get_term(term_name)
            if not (hasattr(term, "_scale") and hasattr(term, "_offset")):
                return None
            scale, offset = _per_action(term._scale, n, term.action_dim), _per_action(term._offset, n, term.action_dim)
            if scale is None or offset is None:
                return None
            scales.append(scale), offsets.append(offset)
        return torch.cat(scales), torch.cat(offsets), None
    # Direct in-hand envs: joint target = scale(action, lower, upper) = (upper + lower)/2 + (upper - lower)/2 *
    # action, then a moving average with the previous target; 3.0's Shadow hand maps its last actions onto tendon
    # targets the same way (tendon_lower/upper_limits), without the moving average.
    actuated = getattr(unwrapped, "actuated_dof_indices", None)
    lower, upper = getattr(unwrapped, "hand_dof_lower_limits", None), getattr(unwrapped, "hand_dof_upper_limits", None)
    if actuated is None or lower is None or upper is None:
        return None
    lows, highs = [lower[:, actuated]], [upper[:, actuated]]
    tendons = getattr(unwrapped, "actuated_tendon_indices", None)
    if tendons is not None:
        lows.append(unwrapped.tendon_lower_limits)
        highs.append(unwrapped.tendon_upper_limits)
    low, high = _per_action(torch.cat(lows, -1), n, act_dim), _per_action(torch.cat(highs, -1), n, act_dim)
    if low is None or high is None:
        return None
    average = getattr(unwrapped.cfg, "act_moving_average", None)
    if average is not None:  # per action: the joints' m, the tendons' 1 (no smoothing)
        average = torch.cat([torch.full((len(actuated),), float(average)), torch.ones(act_dim - len(actuated))])
    return (high - low) / 2, (high + low) / 2, average


def _flat_dim(spaces: Any, key: str) -> int:
    shape = tuple(spaces[key].shape)
    if len(shape) != 1:
        raise ValueError(f"observation group {key!r} has shape {shape}; only flat (concatenated) groups are supported")
    return shape[0]


class IsaacLabEnv(EnvBase):
    """An existing Isaac Lab env (``gym.make`` output) as a batched TorchRL env; see the module docstring.

    `task` names the task (any id of `fasttd3_lora.tasks.isaaclab_names`; others are accepted without the size
    check). `close_fn` runs after the env is closed (the launcher passes the simulator's shutdown)."""

    def __init__(self, env: Any, *, task: str, close_fn: Callable[[], None] | None = None) -> None:
        unwrapped = env.unwrapped
        num_envs = int(unwrapped.num_envs)
        super().__init__(batch_size=torch.Size([num_envs]), device=torch.device(unwrapped.device))
        self._env = env
        self._close_fn = close_fn
        self.task_name = task
        self.num_envs = num_envs
        self.max_episode_steps = int(unwrapped.max_episode_length)
        self.control_period = float(unwrapped.step_dt)
        self.has_final_obs = bool(getattr(unwrapped.cfg, "compute_final_obs", False))
        self.finite_horizon = bool(getattr(unwrapped.cfg, "is_finite_horizon", False))
        self.joint_names = _joint_names(unwrapped)

        spaces = unwrapped.single_observation_space.spaces
        obs_dim = _flat_dim(spaces, "policy")
        self.critic_dim = _flat_dim(spaces, "critic") if "critic" in spaces else None
        (act_dim,) = tuple(unwrapped.single_action_space.shape)
        self._check_sizes(obs_dim, act_dim)
        action_map = _action_map(unwrapped, act_dim)
        self.action_map_known = action_map is not None
        self.action_scale, self.action_offset, self.action_moving_average = action_map or (
            torch.ones(act_dim), torch.zeros(act_dim), None
        )

        n, dev = num_envs, self.device
        obs_specs = {"observation": Unbounded(shape=(n, obs_dim), dtype=torch.float32, device=dev)}
        if self.critic_dim is not None:
            obs_specs["critic_observation"] = Unbounded(shape=(n, self.critic_dim), dtype=torch.float32, device=dev)
        self.observation_spec = Composite(obs_specs, shape=(n,), device=dev)
        self.action_spec = Bounded(low=-1.0, high=1.0, shape=(n, act_dim), dtype=torch.float32, device=dev)
        self.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32, device=dev)
        flag = functools.partial(Categorical, 2, (n, 1), dtype=torch.bool, device=dev)
        self.done_spec = Composite(done=flag(), terminated=flag(), truncated=flag(), shape=(n,), device=dev)

        # Observations Isaac Lab returned for envs it reset inside the last step, handed out by `_reset`.
        self._reset_obs: dict[str, torch.Tensor] | None = None
        self._pending = torch.zeros(n, dtype=torch.bool, device=dev)
        self._any_pending = False
        self.is_closed = False

    def _check_sizes(self, obs_dim: int, act_dim: int) -> None:
        try:
            known: IsaacLabTask | None = lookup_isaaclab_task(self.task_name)
        except ValueError:
            known = None
        if known is not None and (known.obs_dim, known.act_dim) != (obs_dim, act_dim):
            warnings.warn(
                f"{self.task_name}: the env has obs/act dims {obs_dim}/{act_dim}, the paper's runs "
                f"{known.obs_dim}/{known.act_dim} (DESIGN §7); the env's are used",
                stacklevel=3,
            )

    def render_frame(self, env_index: int = 0, height: int = 0, width: int = 0, camera_id: int = 0) -> np.ndarray:
        """The viewport camera's frame, (H, W, 3) uint8 (videos, `fasttd3_lora.play`): the gym env's ``render()``
        with ``render_mode="rgb_array"`` (make the env with ``render=True``). Isaac Lab renders its viewer's
        camera (``cfg.viewer``), not one env or a size of our choosing, so the other arguments are not used."""
        if getattr(self._env, "render_mode", None) != "rgb_array":
            raise ValueError(f"{self.task_name}: frames need the env made with render=True (cameras on, "
                             "render_mode='rgb_array')")  # fmt: skip
        frame = self._env.render()
        return np.asarray(frame.cpu() if isinstance(frame, torch.Tensor) else frame, dtype=np.uint8)[..., :3].copy()

    def observation_layout(self) -> list[tuple[str, tuple[int, ...]]] | None:
        """``[(term, shape)]`` of the policy observation in order, when the env has an observation manager."""
        manager = getattr(self._env.unwrapped, "observation_manager", None)
        if manager is None:
            return None
        terms, dims = manager.active_terms["policy"], manager.group_obs_term_dim["policy"]
        return [(str(name), tuple(int(d) for d in dim)) for name, dim in zip(terms, dims, strict=True)]

    def _observations(self, obs: Any) -> dict[str, torch.Tensor]:
        out = {"observation": _owned(obs["policy"], torch.float32)}
        if self.critic_dim is not None:
            out["critic_observation"] = _owned(obs["critic"], torch.float32)
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action")
        if action.shape != self.action_spec.shape:
            raise ValueError(
                f"{self.task_name}: action must have shape {tuple(self.action_spec.shape)}, got {tuple(action.shape)}"
            )
        if self._any_pending:
            ids = self._pending.nonzero().squeeze(-1).tolist()
            raise RuntimeError(
                f"{self.task_name}: envs {ids} finished an episode and must be reset before stepping: "
                "use step_and_maybe_reset() or reset() with their _reset mask"
            )
        if bool(action.isnan().any()):
            raise ValueError(f"{self.task_name}: actions contain {int(action.isnan().sum())} NaN values")
        obs, reward, terminated, truncated, extras = self._env.step(action.detach().clamp(-1.0, 1.0))

        terminated = _owned(terminated, torch.bool)
        truncated = _owned(truncated, torch.bool)
        if self.finite_horizon:  # Isaac Lab's flag: time-outs end the episode without a bootstrap
            terminated |= truncated
        truncated &= ~terminated
        done = terminated | truncated
        reset_obs = self._observations(obs)
        next_obs = dict(reset_obs)
        self._any_pending = bool(done.any())
        if self._any_pending:
            final = extras.get("final_obs") if self.has_final_obs else None
            if final is not None:  # 3.0: every env's observation from before the in-step reset
                final_obs = self._observations(final)
                rows = done.unsqueeze(-1)
                next_obs = {key: torch.where(rows, final_obs[key], value) for key, value in reset_obs.items()}
        self._reset_obs = reset_obs
        self._pending = done
        flags = {"terminated": terminated, "truncated": truncated, "done": done}
        return TensorDict(
            {**next_obs, "reward": _owned(reward, torch.float32).reshape(self.num_envs, 1),
             **{key: flag.unsqueeze(-1) for key, flag in flags.items()}},
            batch_size=self.batch_size,
            device=self.device,
        )

    def _reset(self, tensordict: TensorDictBase | None, **kwargs: Any) -> TensorDictBase:
        mask = None if tensordict is None else tensordict.get("_reset", None)
        if mask is not None:
            mask = mask.reshape(self.num_envs).to(self.device)
        if mask is not None and self._reset_obs is not None and not bool((mask & ~self._pending).any()):
            # Isaac Lab already reset these envs inside the last step: hand back (copies of) what it returned.
            obs = {key: value.clone() for key, value in self._reset_obs.items()}
            self._pending = self._pending & ~mask
            self._any_pending = bool(self._pending.any())
        elif mask is None or bool(mask.all()):
            obs_dict, _ = self._env.reset()
            obs = self._observations(obs_dict)
            self._pending = torch.zeros_like(self._pending)
            self._any_pending = False
        else:
            running = (mask & ~self._pending).nonzero().squeeze(-1).tolist()
            raise ValueError(
                f"{self.task_name}: cannot reset running envs {running}: Isaac Lab resets all envs or none "
                "(reset() without a mask), and finished envs by itself"
            )
        flag = torch.zeros(self.num_envs, 1, dtype=torch.bool, device=self.device)
        return TensorDict(
            {**obs, "done": flag, "terminated": flag.clone(), "truncated": flag.clone()},
            batch_size=self.batch_size,
            device=self.device,
        )

    spreads_starts = True  # FastTD3's random start, always (`randomize_episode_starts`)

    def randomize_episode_starts(self, seed: int) -> None:
        """FastTD3's `random_start_init`: every env's episode clock (`episode_length_buf`) jumps to a random step in
        [0, max_episode_length), drawn from `seed`, so the first time-outs spread over an episode instead of all
        envs timing out together (and restarting together ever after). Call right after a full reset."""
        unwrapped = self._env.unwrapped
        buf = unwrapped.episode_length_buf
        generator = torch.Generator(device=buf.device).manual_seed(int(seed))
        unwrapped.episode_length_buf = torch.randint(0, self.max_episode_steps, buf.shape, generator=generator,
                                                     device=buf.device, dtype=buf.dtype)  # fmt: skip

    def _set_seed(self, seed: int | None) -> None:
        """Isaac Lab's `seed` seeds its global generators; the task config's seed (set at creation) governs the
        scene, so this only matters for what is drawn from now on."""
        if seed is not None:
            self._env.unwrapped.seed(int(seed))

    def close(self, *, raise_if_closed: bool = True) -> None:
        if self.__dict__.get("is_closed", True):
            if raise_if_closed:
                raise RuntimeError(f"{self.task_name}: the env is already closed")
            return
        try:
            self._env.close()
        finally:
            self.is_closed = True
            if self._close_fn is not None:
                self._close_fn()
        super().close(raise_if_closed=False)

    def __enter__(self) -> IsaacLabEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(raise_if_closed=False)


# ------------------------------------------------------------------------------------------------- launcher


def _check_args(num_envs: Any, seed: Any, device: Any, physics: Any) -> None:
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be cpu, cuda or cuda:<index>, got {device!r}")
    if physics is not None and physics not in PHYSICS_BACKENDS:
        raise ValueError(f"physics must be None or one of {', '.join(PHYSICS_BACKENDS)}, got {physics!r}")


def _make_2x(stack: contextlib.ExitStack, gym_id: str, num_envs: int, seed: int, device: str, headless: bool,
             render: bool) -> Any:  # fmt: skip
    """Isaac Lab 2.x: the app must run before anything imports the task modules (they import omni.*). `render`:
    cameras on and ``render_mode="rgb_array"``, as Isaac Lab's own play.py does for ``--video``."""
    from isaaclab.app import AppLauncher

    launcher = AppLauncher(headless=headless, device=device, enable_cameras=render)
    stack.callback(launcher.app.close)
    import gymnasium as gym
    import isaaclab_tasks  # noqa: F401  (registers the gym ids)
    from isaaclab_tasks.utils import parse_env_cfg

    cfg = parse_env_cfg(gym_id, device=device, num_envs=num_envs)
    cfg.seed = seed
    return gym.make(gym_id, cfg=cfg, render_mode="rgb_array" if render else None)


def _make_3x(
    stack: contextlib.ExitStack, gym_id: str, num_envs: int, seed: int, device: str, physics: str, headless: bool,
    render: bool,
) -> Any:
    """Isaac Lab 3.0: the config resolves before launch, with ``physics`` as the task's preset (its tuned settings
    of that engine); `launch_simulation` starts what the config needs (Kit for Isaac Sim's PhysX) and stays open
    (a context) for the env's lifetime."""
    import gymnasium as gym
    import isaaclab_tasks  # noqa: F401  (registers the gym ids)
    from isaaclab.app import launch_simulation
    from isaaclab_tasks.utils import parse_env_cfg

    try:
        cfg = parse_env_cfg(gym_id, device=device, num_envs=num_envs, overrides=[f"physics={physics}"])
    except ValueError as err:  # "Unknown preset(s): ..."
        raise ValueError(f"physics={physics}: {gym_id} has no such preset ({str(err).splitlines()[0]})") from None
    cfg.seed = seed
    cfg.compute_final_obs = True  # extras["final_obs"]: true final observations for time-out bootstrapping
    launcher_args = {"device": device, "visualizer": "none" if headless else "kit"}
    if render:  # AppLauncher's argument, which launch_simulation hands on (not checked on the 3.0 wheel)
        launcher_args["enable_cameras"] = True
    stack.enter_context(launch_simulation(cfg, launcher_args))
    return gym.make(gym_id, cfg=cfg, render_mode="rgb_array" if render else None)


def launch_gym_env(
    name: str, gym_id_of: Callable[[str], str], num_envs: int, seed: int, device: str, physics: str | None,
    headless: bool, render: bool = False,
) -> tuple[Any, Callable[[], None]]:
    """Start Isaac Lab (2.x or 3.0, whichever is installed) and ``gym.make`` the task whose CLI name is `name` and
    whose gym id under an API version is ``gym_id_of(api)``; returns the gym env and the call that closes the
    simulation after it. Raises `ValueError` for a bad argument or physics preset, `IsaacLabUnavailable` when
    Isaac Lab cannot be imported or cannot start the physics (one line each); nothing is left open on a failure."""
    _check_args(num_envs, seed, device, physics)
    api = detect_isaaclab()
    hint = _GET_ISAACLAB.format(task=name)
    if api is None:
        raise IsaacLabUnavailable(f"{name} needs Isaac Lab, which is not installed in {sys.executable}: {hint}")
    if api == "2.x" and physics not in (None, DEFAULT_PHYSICS):
        raise ValueError(f"physics={physics!r} needs Isaac Lab 3.0; the installed 2.x runs {DEFAULT_PHYSICS} only")
    gym_id = gym_id_of(api)
    stack = contextlib.ExitStack()
    try:
        if api == "2.x":
            env = _make_2x(stack, gym_id, num_envs, seed, device, headless, render)
        else:
            env = _make_3x(stack, gym_id, num_envs, seed, device, physics or DEFAULT_PHYSICS, headless, render)
        return env, stack.close
    except ImportError as exc:
        stack.close()
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IsaacLabUnavailable(
            f"{name}: Isaac Lab {api} is installed but failed to import ({first}): {hint}"
        ) from exc
    except SystemExit as exc:  # Isaac Lab's kit launcher exits (after logging why) when Isaac Sim is missing
        stack.close()
        engine = physics or DEFAULT_PHYSICS
        raise IsaacLabUnavailable(
            f"{name}: Isaac Lab {api} could not start physics={engine} (exit status {exc.code}): "
            f"{'/'.join(NEEDS_ISAAC_SIM)} need Isaac Sim, which is not installed here; "
            "task.physics=newton_mjwarp runs without it (Isaac Lab 3.0), or " + hint
        ) from None
    except BaseException:
        stack.close()
        raise


def wrap_or_close(wrap: Callable[[Any, Callable[[], None]], Any], env: Any, close: Callable[[], None]) -> Any:
    """``wrap(env, close)``; a wrapper that cannot be built leaves no gym env or simulation context open."""
    try:
        return wrap(env, close)
    except BaseException:
        try:
            env.close()
        finally:
            close()
        raise


def make_isaaclab_env(
    name: str,
    num_envs: int,
    seed: int,
    device: str = "cuda:0",
    physics: str | None = None,
    headless: bool = True,
    render: bool = False,
) -> IsaacLabEnv:
    """Start Isaac Lab (2.x or 3.0, whichever is installed) and make `name` (either id) as an `IsaacLabEnv`
    (`render`: with cameras and ``render_mode="rgb_array"``, for `IsaacLabEnv.render_frame`).

    `physics` picks 3.0's engine (default `DEFAULT_PHYSICS`, the paper's PhysX); 2.x has PhysX only. Raises
    `ValueError` for an unknown task or a bad argument, `IsaacLabUnavailable` when Isaac Lab cannot be imported."""
    task = lookup_isaaclab_task(name)
    env, close = launch_gym_env(task.id_2x, task.gym_id, num_envs, seed, device, physics, headless, render)
    return wrap_or_close(lambda e, c: IsaacLabEnv(e, task=task.id_2x, close_fn=c), env, close)
