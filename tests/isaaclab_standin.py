"""A GPU-free stand-in for an Isaac Lab RL env, reproducing the API `fasttd3_lora.tasks.isaaclab` relies on.

What it copies from Isaac Lab (``ManagerBasedRLEnv`` / ``DirectRLEnv``, 2.x and 3.0, read from their source):

* ``reset() -> (obs_dict, extras)`` and ``step(action) -> (obs_dict, reward, terminated, time_outs, extras)``,
  torch tensors on ``device``; ``obs_dict["policy"]`` always, ``obs_dict["critic"]`` with an asymmetric critic.
* Same-step auto-reset: envs whose episode ended are reset inside ``step``, so the returned observation of a
  done env is its new episode's. ``cfg.compute_final_obs=True`` (3.0) stores the observation computed *before*
  that reset, for every env, under ``extras["final_obs"]`` on steps that reset any env (absent on the others).
* Time-outs are the fourth return value. ``extras["time_outs"]`` is *not* set by the env: that key is added by
  isaaclab_rl's RSL-RL wrapper, so a wrapper of the raw env must not look for it.
* Reward, termination and time-out tensors are persistent buffers overwritten in place on the next step (as
  ``reward_buf`` / ``reset_terminated`` / ``reset_time_outs`` are in Isaac Lab), so a consumer must copy them.
* ``num_envs``, ``device``, ``step_dt``, ``max_episode_length``, ``episode_length_buf``, ``cfg.is_finite_horizon``,
  ``single_observation_space`` (a dict space whose ``spaces`` hold ``policy`` and maybe ``critic`` boxes),
  ``single_action_space`` (an unbounded box: the action term maps the action to the joint command),
  ``seed()``, ``close()``, and the outer ``gym.make`` wrapper whose ``unwrapped`` is the env and which refuses a
  step before the first reset (gymnasium's order enforcing).
* ``workflow="manager"`` exposes ``observation_manager`` (term names and dims per group) and ``action_manager``
  (a joint-action term with ``_joint_names``, ``action_dim``, ``_scale`` (a float) and ``_offset`` (an
  (num_envs, dim) tensor, as ``use_default_offset`` makes it), ``processed = raw * _scale + _offset``);
  ``workflow="direct"`` exposes ``hand.joint_names``, the sorted ``actuated_dof_indices``, the
  (num_envs, joints) ``hand_dof_lower_limits`` / ``hand_dof_upper_limits`` and ``cfg.act_moving_average`` of
  Isaac Lab's in-hand manipulation envs, whose target is ``m * scale(action, lower, upper) + (1 - m) * previous``.
  ``tendons=k`` makes the last k actions tendon targets as Isaac Lab 3.0's Shadow hand has them (16 joints + 4
  tendons): ``hand.fixed_tendon_names``, ``actuated_tendon_indices``, (num_envs, k) ``tendon_lower_limits`` /
  ``tendon_upper_limits``, target ``unscale_transform(action, lower, upper)`` clamped to the limits, no moving
  average.

Dynamics: each env is a point mass in ``dim`` dimensions pushed by its action toward a target; the reward is the
decrease of the distance to the target. Episodes end by a random termination (probability
``termination_prob`` per step), by leaving the box ``|x| <= bound`` (termination), or after
``max_episode_length`` steps (time-out), so every path of a consumer is hit within a few dozen steps.

Rendering (``render_mode="rgb_array"`` at ``gym.make``, as Isaac Lab's play.py asks for videos): ``render()`` returns
the viewport as a (48, 64, 3) uint8 array; here a white column at env 0's first coordinate on a black frame.

Ground truth for tests: after each step, ``last_pre_reset_obs`` holds copies of the observations of every env
computed before the in-step reset and ``last_reset_mask`` the envs that were reset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Box:
    """The part of ``gymnasium.spaces.Box`` the wrapper reads."""

    shape: tuple[int, ...]


@dataclass
class DictSpace:
    """The part of ``gymnasium.spaces.Dict`` the wrapper reads."""

    spaces: dict[str, Box] = field(default_factory=dict)


class SeededResets:
    """Isaac Lab's `seed` (its generators) and the start of `reset` (seed, then `_reset_idx` of every env), shared
    by the single- and multi-agent stand-ins (which hold `_gen`, `num_envs`, `device` and `_reset_idx`)."""

    def seed(self, seed: int = -1) -> int:
        self._gen.manual_seed(seed)
        return seed

    def _reset_all(self, seed: int | None) -> None:
        if seed is not None:
            self.seed(seed)
        self._reset_idx(torch.arange(self.num_envs, device=self.device))


class StandInIsaacLabEnv(SeededResets):
    """The unwrapped env (``env.unwrapped`` in Isaac Lab); see the module docstring."""

    is_vector_env = True

    def __init__(
        self,
        num_envs: int = 64,
        dim: int = 3,
        *,
        critic: bool = True,
        final_obs: bool = False,
        workflow: str = "manager",
        max_episode_length: int = 40,
        termination_prob: float = 0.01,
        bound: float = 4.0,
        action_scale: float = 0.5,
        action_offset: float = 0.0,
        act_moving_average: float = 1.0,
        tendons: int = 0,
        step_dt: float = 0.02,
        is_finite_horizon: bool = False,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if workflow not in ("manager", "direct"):
            raise ValueError(f"workflow={workflow!r}: allowed manager or direct")
        if tendons and (workflow != "direct" or not 0 < tendons < dim):
            raise ValueError(f"tendons={tendons}: the direct workflow's last actions, fewer than dim={dim}")
        self.num_envs = num_envs
        self.dim = dim
        self.device = device
        self.step_dt = step_dt
        self.max_episode_length = max_episode_length
        self.termination_prob = termination_prob
        self.bound = bound
        self.action_scale = action_scale
        self.has_critic = critic
        self.workflow = workflow
        self.cfg = SimpleNamespace(seed=seed, compute_final_obs=final_obs, is_finite_horizon=is_finite_horizon,
                                   act_moving_average=act_moving_average)  # fmt: skip
        self._gen = torch.Generator(device=device).manual_seed(seed)

        n = num_envs
        self.pos = torch.zeros(n, dim, device=device)
        self.vel = torch.zeros(n, dim, device=device)
        self.target = torch.zeros(n, dim, device=device)
        self.episode_length_buf = torch.zeros(n, dtype=torch.long, device=device)
        self.reward_buf = torch.zeros(n, device=device)
        self.reset_terminated = torch.zeros(n, dtype=torch.bool, device=device)
        self.reset_time_outs = torch.zeros(n, dtype=torch.bool, device=device)
        self.raw_actions = torch.zeros(n, dim, device=device)
        self.processed_actions = torch.zeros(n, dim, device=device)
        self.extras: dict[str, Any] = {}
        self.last_pre_reset_obs: dict[str, Tensor] = {}
        self.last_reset_mask = torch.zeros(n, dtype=torch.bool, device=device)
        self.closed = False
        self.num_resets_called = 0

        spaces = {"policy": Box((2 * dim,))}
        if critic:
            spaces["critic"] = Box((3 * dim + 1,))
        self.single_observation_space = DictSpace(spaces)
        self.single_action_space = Box((dim,))
        joints = [f"joint_{i}" for i in range(dim)]
        if workflow == "manager":
            terms = {"policy": ["target_offset", "velocity"], "critic": ["position", "velocity", "target", "phase"]}
            dims = {"policy": [(dim,), (dim,)], "critic": [(dim,), (dim,), (dim,), (1,)]}
            groups = ["policy", "critic"] if critic else ["policy"]
            self.observation_manager = SimpleNamespace(
                active_terms={g: terms[g] for g in groups}, group_obs_term_dim={g: dims[g] for g in groups}
            )
            # per-joint "default joint positions", the same in every env
            offset = (action_offset * torch.arange(1, dim + 1, dtype=torch.float32, device=device)).expand(n, dim)
            term = SimpleNamespace(_joint_names=joints, action_dim=dim, _scale=action_scale, _offset=offset.clone())
            self.action_manager = SimpleNamespace(
                active_terms=["joint_pos"], get_term=lambda name: term, total_action_dim=dim
            )
        else:
            # An articulation with one passive joint; the actuated ones in index order, as Isaac Lab sorts them.
            actuated = dim - tendons
            self.hand = SimpleNamespace(joint_names=["passive_joint", *joints[:actuated]],
                                        fixed_tendon_names=["unused_tendon", *(f"tendon_{j}" for j in range(tendons))])
            self.actuated_dof_indices = list(range(1, actuated + 1))
            joint = torch.arange(actuated + 1, dtype=torch.float32, device=device)
            self.hand_dof_lower_limits = (-1.0 - 0.1 * joint).expand(n, actuated + 1).clone()
            self.hand_dof_upper_limits = (0.5 + 0.2 * joint).expand(n, actuated + 1).clone()
            if tendons:
                self.actuated_tendon_indices = torch.arange(1, tendons + 1, device=device)
                self.tendon_lower_limits = torch.full((n, tendons), -0.02, device=device)
                self.tendon_upper_limits = torch.full((n, tendons), 0.03, device=device)

    def _uniform(self, shape: tuple[int, ...], low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(shape, generator=self._gen, device=self.device)

    def _observations(self) -> dict[str, Tensor]:
        obs = {"policy": torch.cat([self.target - self.pos, self.vel], dim=-1)}
        if self.has_critic:
            phase = (self.episode_length_buf.float() / self.max_episode_length).unsqueeze(-1)
            obs["critic"] = torch.cat([self.pos, self.vel, self.target, phase], dim=-1)
        return obs

    def _reset_idx(self, env_ids: Tensor) -> None:
        k = len(env_ids)
        self.pos[env_ids] = self._uniform((k, self.dim), -1.0, 1.0)
        self.vel[env_ids] = 0.0
        self.target[env_ids] = self._uniform((k, self.dim), -2.0, 2.0)
        self.episode_length_buf[env_ids] = 0
        self.raw_actions[env_ids] = 0.0

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, Tensor], dict]:
        self.num_resets_called += 1
        self._reset_all(seed)
        return self._observations(), self.extras

    def step(self, action: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict]:
        self.raw_actions[:] = action.to(self.device)
        if self.workflow == "manager":
            term = self.action_manager.get_term("joint_pos")
            self.processed_actions = self.raw_actions * term._scale + term._offset
        else:
            k = len(self.actuated_dof_indices)
            low = self.hand_dof_lower_limits[:, self.actuated_dof_indices]
            high = self.hand_dof_upper_limits[:, self.actuated_dof_indices]
            target = 0.5 * (self.raw_actions[:, :k] + 1.0) * (high - low) + low  # Isaac Lab's `scale`
            m = self.cfg.act_moving_average
            processed = self.processed_actions.clone()
            processed[:, :k] = m * target + (1.0 - m) * self.processed_actions[:, :k]
            if k < self.dim:  # tendon targets: unscale_transform, clamped (saturate), no moving average
                t_low, t_high = self.tendon_lower_limits, self.tendon_upper_limits
                tendon = 0.5 * (self.raw_actions[:, k:] + 1.0) * (t_high - t_low) + t_low
                processed[:, k:] = torch.minimum(torch.maximum(tendon, t_low), t_high)
            self.processed_actions = processed
        before = (self.target - self.pos).norm(dim=-1)
        self.vel = 0.9 * self.vel + self.processed_actions * self.step_dt * 10.0
        self.pos = self.pos + self.vel * self.step_dt * 10.0
        self.episode_length_buf += 1
        self.reward_buf[:] = before - (self.target - self.pos).norm(dim=-1)
        drawn = torch.rand(self.num_envs, generator=self._gen, device=self.device) < self.termination_prob
        self.reset_terminated[:] = drawn | (self.pos.abs().amax(dim=-1) > self.bound)
        self.reset_time_outs[:] = self.episode_length_buf >= self.max_episode_length
        reset = self.reset_terminated | self.reset_time_outs
        self.last_reset_mask = reset.clone()
        self.last_pre_reset_obs = {k: v.clone() for k, v in self._observations().items()}
        self.extras.pop("final_obs", None)
        env_ids = reset.nonzero(as_tuple=False).squeeze(-1)
        if len(env_ids) > 0:
            if self.cfg.compute_final_obs:
                self.extras["final_obs"] = self._observations()
            self.extras["log"] = {"Episode_Termination/time_out": self.reset_time_outs.float().mean()}
            self._reset_idx(env_ids)
        return self._observations(), self.reward_buf, self.reset_terminated, self.reset_time_outs, self.extras

    def close(self) -> None:
        self.closed = True


class GymMadeEnv:
    """What ``gym.make`` returns around an Isaac Lab env: forwards calls, refuses a step before the first reset."""

    def __init__(self, env: StandInIsaacLabEnv, render_mode: str | None = None) -> None:
        self.unwrapped = env
        self.render_mode = render_mode
        self._has_reset = False

    def reset(self, **kwargs: Any) -> tuple[dict[str, Tensor], dict]:
        self._has_reset = True
        return self.unwrapped.reset(**kwargs)

    def step(self, action: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict]:
        if not self._has_reset:
            raise RuntimeError("Cannot call env.step() before calling env.reset()")
        return self.unwrapped.step(action)

    def close(self) -> None:
        self.unwrapped.close()

    def render(self) -> Any:
        if self.render_mode != "rgb_array":
            return None
        import numpy as np

        frame = np.zeros((48, 64, 3), dtype=np.uint8)
        column = int((float(self.unwrapped.pos[0, 0]) / self.unwrapped.bound + 1.0) * 31.5)
        frame[:, min(max(column, 0), 63)] = 255
        return frame


def make_standin(num_envs: int = 64, dim: int = 3, render_mode: str | None = None, **kwargs: Any) -> GymMadeEnv:
    """A stand-in env as ``gym.make`` would hand it over (other keyword arguments go to `StandInIsaacLabEnv`)."""
    return GymMadeEnv(StandInIsaacLabEnv(num_envs, dim, **kwargs), render_mode=render_mode)
