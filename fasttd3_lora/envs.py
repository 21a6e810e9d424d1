"""The env families a run can train on: building the training and evaluation envs of a run, and what an env
says about its interface for deployment (DESIGN §7, §8).

`make_envs(EnvRequest(...))` dispatches on `task.family` (`ENV_BUILDERS`): `dmc` is the vectorised DeepMind
Control env (`fasttd3_lora.tasks.dmc`), `metaworld` Meta-World through EnvPool (`fasttd3_lora.tasks.metaworld`),
`isaaclab` Isaac Lab (`fasttd3_lora.tasks.isaaclab`, imported only when a run needs it), `vmas` / `mamujoco` /
`isaaclab_marl` the multi-agent families (`fasttd3_lora.tasks.multi_agent`). A request carries every value a
builder reads, taken from the run's algorithm config once, so nothing is written back into the Hydra config.
`env_deploy_facts(env)` is what checkpoints record for export.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fasttd3_lora.checks import ConfigError

if TYPE_CHECKING:
    from torchrl.envs import EnvBase

    from fasttd3_lora.tasks.dmc import DMCEnv
    from fasttd3_lora.tasks.isaaclab import IsaacLabEnv
    from fasttd3_lora.tasks.metaworld import MetaWorldEnv
    from fasttd3_lora.tasks.multi_agent import MultiAgentEnv

__all__ = ["EnvRequest", "ENV_BUILDERS", "TASK_FAMILIES", "make_envs", "env_deploy_facts"]


@dataclasses.dataclass(frozen=True)
class EnvRequest:
    """The envs one run (or one rank of it) steps."""

    task: Any  # the composed `task` group: name, family, max_episode_steps (dmc), physics and headless (isaaclab)
    num_envs: int  # training envs
    action_repeat: int
    seed: int
    device: str
    eval_envs: int  # one per evaluation episode (DMC: separate envs; Isaac Lab evaluates on the training env)
    tasks: tuple[str, ...] = ()  # several tasks of one embodiment splitting the envs (a policy library); () = task.name
    group_size: int = 1  # consecutive envs that start their training episodes from the same states (GRPO)
    render: bool = False  # the env that evaluates will be asked for frames (videos): Isaac Lab makes it with cameras

    @classmethod
    def of_run(cls, cfg: Any, num_envs: int, action_repeat: int, seed: int, device: str, **more: Any) -> "EnvRequest":
        """The request of a training run: its task, evaluation episodes and videos from the composed config."""
        render = bool(cfg.get("video", {}).get("every", 0))
        return cls(cfg.task, num_envs, action_repeat, seed, str(device), int(cfg.eval_episodes), render=render, **more)


def make_dmc_envs(request: EnvRequest) -> tuple[DMCEnv, DMCEnv]:
    """The training envs and the evaluation envs (one per eval episode, DESIGN §5; with several tasks, that many
    per task), stepped by `task.backend` (dm_control, or EnvPool's C++ port)."""
    # Each env family is imported by its builder: a run loads only its own simulator, and a bad command line
    # is refused before any simulator loads.
    from fasttd3_lora.tasks.dmc import DMCEnv

    tasks = request.tasks or (request.task.name,)
    backend = request.task.get("backend", "dm_control")
    spread = bool(request.task.get("spread_starts", False))  # GRPO's config refuses it

    def envs(num_envs: int, num_workers: int | None, group_size: int = 1, spread_starts: bool = False) -> DMCEnv:
        try:
            return DMCEnv(tasks, num_envs, action_repeat=request.action_repeat, seed=request.seed,
                          max_episode_steps=request.task.max_episode_steps, num_workers=num_workers,
                          backend=backend, group_size=group_size, spread_starts=spread_starts)  # fmt: skip
        except ValueError as err:  # a task family EnvPool lacks, tasks of different robots: one line, exit 2
            raise ConfigError(f"task.backend={backend}: {err}") from None

    # Evaluation steps its envs in this process: worker processes would compete with torch's threads for the
    # same cores (on a busy 2-core machine an eval step took 16 ms in-process vs 24 ms with workers, 260-320 ms
    # with 2 torch threads either way), and ten DMC envs cost little next to the actor. EnvPool's threads are
    # its own: one for evaluation.
    train_envs = envs(request.num_envs, None, request.group_size, spread)  # evaluation plays whole episodes
    return train_envs, envs(request.eval_envs * len(tasks), 1 if backend == "envpool" else 0)


def make_metaworld_envs(request: EnvRequest) -> tuple[MetaWorldEnv, MetaWorldEnv]:
    """Meta-World through EnvPool (`fasttd3_lora.tasks.metaworld`): the training envs (one EnvPool thread per core)
    and the evaluation envs (one per eval episode and task, one thread)."""
    from fasttd3_lora.tasks.metaworld import MetaWorldEnv

    task = request.task
    if request.render:
        raise ConfigError(f"video.every: Meta-World runs on EnvPool here, whose frames are not wired up; allowed 0 "
                          f"for {task.name}")  # fmt: skip
    if not isinstance(task.get("partially_observable"), bool):
        raise ConfigError(f"task.partially_observable={task.get('partially_observable')!r}: allowed true or false")
    tasks = request.tasks or (task.name,)

    def envs(num_envs: int, threads: int, group_size: int = 1) -> MetaWorldEnv:
        try:
            return MetaWorldEnv(tasks, num_envs, action_repeat=request.action_repeat, seed=request.seed,
                                max_episode_steps=task.max_episode_steps, num_threads=threads,
                                partially_observable=task.partially_observable, group_size=group_size)  # fmt: skip
        except ValueError as err:  # envpool missing, a task EnvPool lacks: one line, exit 2
            raise ConfigError(f"task.name={task.name}: {err}") from None

    return envs(request.num_envs, os.cpu_count() or 1, request.group_size), envs(request.eval_envs * len(tasks), 1)


def make_multi_agent_envs(request: EnvRequest) -> tuple[MultiAgentEnv, MultiAgentEnv]:
    """VMAS or MaMuJoCo (`fasttd3_lora.tasks.vmas`, `fasttd3_lora.tasks.mamujoco`): the training envs and the
    evaluation envs (one per eval episode), stepped in this process."""
    task = request.task
    if request.render:
        raise ConfigError(f"video.every: {task.family} frames are not wired up; allowed 0 for {task.name}")
    if task.family == "vmas":
        from fasttd3_lora.tasks.vmas import VMASEnv as family

        options = {}
    else:
        from fasttd3_lora.tasks.mamujoco import MaMuJoCoEnv as family

        options = {"agent_obsk": task.agent_obsk}

    def envs(num_envs: int, seed: int) -> MultiAgentEnv:
        try:
            return family(task.name, num_envs, seed=seed, max_episode_steps=task.max_episode_steps, **options)
        except ValueError as err:  # the family's package missing, an unknown scenario: one line, exit 2
            raise ConfigError(f"task.name={task.name}: {err}") from None

    return envs(request.num_envs, request.seed), envs(request.eval_envs, request.seed + request.num_envs)


def make_isaaclab_envs(request: EnvRequest) -> tuple[IsaacLabEnv, IsaacLabEnv]:
    """The Isaac Lab env, twice: Isaac Lab allows one env per process (its simulation context is a singleton),
    so evaluation runs on the training env (the loop restarts the training episodes after it)."""
    from fasttd3_lora.tasks import isaaclab  # looked up at call time: tests swap in a stand-in factory

    task = request.task
    if request.group_size > 1:
        raise ConfigError(f"group size {request.group_size}: Isaac Lab draws every env's episode start from its own "
                          "generator, so a group of envs cannot share one; group-relative runs need dmc tasks")  # fmt: skip
    if len(request.tasks) > 1:
        raise ConfigError(f"library.tasks={list(request.tasks)}: Isaac Lab runs one task per process (its simulation "
                          "context is a singleton); allowed one task")  # fmt: skip
    try:
        env = isaaclab.make_isaaclab_env(task.name, request.num_envs, request.seed, request.device, task.physics,
                                         task.headless, render=request.render)  # fmt: skip
    except (isaaclab.IsaacLabUnavailable, ValueError) as err:  # one line each: Isaac Lab missing, a bad task,
        raise ConfigError(str(err)) from None  # physics preset or argument; exit 2
    return env, env


def make_isaaclab_marl_envs(request: EnvRequest) -> tuple[MultiAgentEnv, MultiAgentEnv]:
    """An Isaac Lab multi-agent env (`fasttd3_lora.tasks.isaaclab_marl`), twice: one env per process, so the loop
    evaluates on the training env and restarts the training episodes after it."""
    from fasttd3_lora.tasks import isaaclab, isaaclab_marl  # looked up at call time: tests swap in a stand-in

    task = request.task
    if request.render:
        raise ConfigError(f"video.every: {task.family} frames are not wired up; allowed 0 for {task.name}")
    try:
        env = isaaclab_marl.make_isaaclab_marl_env(task.name, request.num_envs, request.seed, request.device,
                                                   task.physics, task.headless)  # fmt: skip
    except (isaaclab.IsaacLabUnavailable, ValueError) as err:  # one line each, exit 2
        raise ConfigError(str(err)) from None
    return env, env


# task.family -> (training envs, evaluation envs)
ENV_BUILDERS: dict[str, Callable[[EnvRequest], tuple[EnvBase, EnvBase]]] = {
    "dmc": make_dmc_envs,
    "metaworld": make_metaworld_envs,
    "vmas": make_multi_agent_envs,
    "mamujoco": make_multi_agent_envs,
    "isaaclab": make_isaaclab_envs,
    "isaaclab_marl": make_isaaclab_marl_envs,
}
TASK_FAMILIES = tuple(ENV_BUILDERS)


def make_envs(request: EnvRequest) -> tuple[EnvBase, EnvBase]:
    """The training and evaluation envs of `request.task.family` (the same object where a family has one)."""
    # Training never renders: without MUJOCO_GL, importing dm_control (DMC, and VMAS through torchrl) probes
    # GLFW/EGL and warns on machines without a display; a user's own MUJOCO_GL (videos set one) wins.
    os.environ.setdefault("MUJOCO_GL", "disabled")
    return ENV_BUILDERS[request.task.family](request)


# ----------------------------------------------------------------------------------------- deploy facts


def _floats(x: Any) -> list[float]:
    return torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1).tolist()


def _maybe_call(value: Any) -> Any:
    return value() if callable(value) else value


def env_deploy_facts(env: Any) -> dict[str, Any]:
    """What an env says about its interface, as plain containers (the ``observation``/``action`` parts of
    deploy.yaml and ``control_period_s``).

    Read where the env exposes them (`fasttd3_lora.tasks.dmc.DMCEnv` and `fasttd3_lora.tasks.isaaclab.IsaacLabEnv`
    do): ``observation_layout()`` (``[(key, shape)]`` in flattening order, or None),
    ``observation_spec["observation"]``, ``action_spec`` (its bounds are the clip range; the policy's
    ``actions`` are mapped with ``action_offset + action_scale * clip(actions)``), ``action_scale`` /
    ``action_offset`` (default 1 / 0; ``action_map_known`` False when the env could not read its own map),
    ``action_moving_average`` (Isaac Lab's in-hand tasks smooth joint targets: ``m * command + (1 - m) *
    previous``), ``joint_names`` (attribute or method; one name per action dimension, in the trained order),
    ``control_period`` (seconds per policy step), ``agent_names`` / ``obs_dims`` / ``act_dims`` / ``action_low`` /
    ``action_high`` (a multi-agent env: each agent's own sizes within the padded ones, and the range its first
    act_dim actions map onto, ``low + (a + 1) / 2 * (high - low)``). Missing facts are ``None``.
    """
    terms = env.observation_layout() if callable(getattr(env, "observation_layout", None)) else None
    layout = None
    if terms is not None:
        layout, start = [], 0
        for name, shape in terms:
            size = math.prod(shape)
            layout.append({"name": str(name), "shape": [int(d) for d in shape], "start": start, "size": size})
            start += size
    obs_dim = int(env.observation_spec["observation"].shape[-1])
    if layout is not None and sum(e["size"] for e in layout) != obs_dim:
        raise ValueError(f"observation_layout() covers {sum(e['size'] for e in layout)} values, observations have {obs_dim}")
    spec = env.action_spec
    act_dim = int(spec.shape[-1])
    space = getattr(spec, "space", None)
    low = _floats(space.low.reshape(-1, act_dim)[0]) if space is not None else [-1.0] * act_dim
    high = _floats(space.high.reshape(-1, act_dim)[0]) if space is not None else [1.0] * act_dim
    scale = getattr(env, "action_scale", None)
    offset = getattr(env, "action_offset", None)
    scale = [1.0] * act_dim if scale is None else _floats(torch.as_tensor(scale).expand(act_dim))
    offset = [0.0] * act_dim if offset is None else _floats(torch.as_tensor(offset).expand(act_dim))
    joints = _maybe_call(getattr(env, "joint_names", None))
    if joints is not None:
        joints = [str(j) for j in joints]
        if len(joints) != act_dim:
            raise ValueError(f"env names {len(joints)} joints for {act_dim} action dimensions")
    period = _maybe_call(getattr(env, "control_period", None))
    agents = None
    if getattr(env, "agent_names", None) is not None:  # a multi-agent env: one policy row per agent, each padded
        agents = [{"name": str(name), "obs_dim": int(o), "act_dim": int(a), "low": _floats(low), "high": _floats(high)}
                  for name, o, a, low, high in zip(env.agent_names, env.obs_dims, env.act_dims, env.action_low,
                                                    env.action_high, strict=True)]  # fmt: skip
    average = getattr(env, "action_moving_average", None)  # per action dimension, or None
    return {
        "observation": {"dim": obs_dim, "layout": layout},
        "action": {"dim": act_dim, "scale": scale, "offset": offset, "clip": {"low": low, "high": high},
                   "joint_names": joints, "map_known": bool(getattr(env, "action_map_known", True)),
                   "moving_average": None if average is None else _floats(torch.as_tensor(average).expand(act_dim))},  # fmt: skip
        "control_period_s": None if period is None else float(period),
        **({} if agents is None else {"agents": agents}),
    }
