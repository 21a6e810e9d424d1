"""Isaac Lab's multi-agent direct envs (``DirectMARLEnv``) as a multi-agent env of
`fasttd3_lora.tasks.multi_agent`'s contract, for MAPPO (docs/mappo.md; issue 16).

`IsaacLabMARLEnv(gym_env, task=...)` wraps an env that already exists (``gym.make`` output, or the tests' GPU-free
stand-in); `make_isaaclab_marl_env(name, num_envs, seed, device)` starts Isaac Lab through the single-agent
launcher (`fasttd3_lora.tasks.isaaclab.launch_gym_env`: 2.x or 3.0, 3.0's physics presets, one-line errors) and
wraps what it makes. What it reads of Isaac Lab's API (``isaaclab/envs/direct_marl_env.py`` of the 3.0.0 wheel;
2.x has the same calls):

* ``possible_agents``, ``observation_spaces`` / ``action_spaces`` (dicts of boxes; flat shapes only),
  ``state_space``, ``num_envs``, ``device``, ``max_episode_length``, ``step_dt``;
* ``reset(seed=) -> (obs dict, extras)``, ``step(actions dict) -> (obs, rewards, terminated, time_outs, extras)``,
  every value a dict of (num_envs, ...) tensors keyed by agent, on the simulation device; ``state()`` the
  (num_envs, state_dim) global state (the agents' observations concatenated when the config's ``state_space`` is
  -1). An env resets inside ``step`` when all its agents terminated or all timed out (Isaac Lab's ``reset_buf``);
  so does this wrapper's episode end: ``terminated`` is every agent terminated, ``truncated`` every agent timed
  out and not terminated.
* True final observations: 3.0 with ``cfg.compute_final_obs=True`` (which the launcher sets) stores each agent's
  observations from before the reset under ``extras[agent]["final_obs"]`` on steps that reset an env (the key
  then stays from an earlier step: it is read only on steps where an episode ended). Isaac Lab has no final
  *state*: the wrapper takes ``_get_states()`` just before Isaac Lab resets finished envs (a hook on the env's
  ``_reset_idx``, which ``step`` calls after computing the final observations), or concatenates the final
  observations when the state is that concatenation. Isaac Lab 2.x has no final observation: the reset one is
  used, as the single-agent wrapper does (``has_final_obs`` False; DESIGN §6).

Actions: Isaac Lab's action spaces are unbounded and each task maps [-1, 1] onto its joints itself, so every
agent's [-1, 1] actions go through unchanged (``action_low`` -1, ``action_high`` 1). Agents whose spaces differ
(the cart-pole's cart sees 4 numbers, its pendulum 3) are padded as on the other families. One Isaac Lab env per
process: evaluation runs on the training env (`fasttd3_lora.envs.make_isaaclab_marl_envs`).

Tasks (CLI name: Isaac Lab 2.x id; the 3.0 id is accepted too): ``Isaac-Cart-Double-Pendulum-Direct-v0``
(3.0: ``Isaac-Pendulum-MARL-Direct``) and ``Isaac-Shadow-Hand-Over-Direct-v0`` (3.0: ``Isaac-Shadow-Handover-Direct``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fasttd3_lora.tasks.multi_agent import MultiAgentEnv, MultiAgentObs, MultiAgentStep

__all__ = ["MARL_TASKS", "IsaacLabMARLEnv", "lookup_marl_task", "make_isaaclab_marl_env"]

# CLI name (the 2.x id) -> the 3.0 id (3.0 moved both into isaaclab_tasks/core and renamed them)
MARL_TASKS: dict[str, str] = {
    "Isaac-Cart-Double-Pendulum-Direct-v0": "Isaac-Pendulum-MARL-Direct",
    "Isaac-Shadow-Hand-Over-Direct-v0": "Isaac-Shadow-Handover-Direct",
}


def lookup_marl_task(name: str) -> tuple[str, str]:
    """(2.x id, 3.0 id) of a multi-agent task named by either id; an unknown name raises `ValueError` naming the
    supported ones."""
    for id_2x, id_3x in MARL_TASKS.items():
        if name in (id_2x, id_3x):
            return id_2x, id_3x
    known = [*MARL_TASKS, *MARL_TASKS.values()]
    close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.6)
    raise ValueError(f"unknown Isaac Lab multi-agent task {name!r}; supported: {', '.join(MARL_TASKS)}"
                     + (f" (close: {', '.join(close)})" if close else ""))  # fmt: skip


def _flat_dim(space: Any, what: str) -> int:
    shape = getattr(space, "shape", None)
    if shape is None or len(shape) != 1:
        raise ValueError(f"{what}: only flat box spaces are supported, got {space!r}")
    return int(shape[0])


class IsaacLabMARLEnv(MultiAgentEnv):
    """A ``DirectMARLEnv`` (module docstring); `close_fn` runs after the env closes (the simulation context)."""

    def __init__(self, gym_env: Any, task: str, close_fn: Callable[[], None] | None = None) -> None:
        self._env, self._close_fn = gym_env, close_fn
        raw = gym_env.unwrapped
        self._raw = raw
        names = list(raw.possible_agents)
        obs_dims = [_flat_dim(raw.observation_spaces[a], f"{task} agent {a} observation") for a in names]
        act_dims = [_flat_dim(raw.action_spaces[a], f"{task} agent {a} action") for a in names]
        self._concatenated_state = isinstance(raw.cfg.state_space, int) and raw.cfg.state_space < 0
        if raw.state_space is None:
            raise ValueError(f"{task}: the env has no global state (state_space 0); MAPPO's critic needs one")
        state_dim = _flat_dim(raw.state_space, f"{task} state")
        super().__init__(task, int(raw.num_envs), names, obs_dims, [-torch.ones(d) for d in act_dims],
                         [torch.ones(d) for d in act_dims], state_dim, device=raw.device)  # fmt: skip
        self.max_episode_steps = int(raw.max_episode_length)
        self.control_period = float(raw.step_dt)
        self.has_final_obs = bool(getattr(raw.cfg, "compute_final_obs", False))
        self._seed: int | None = None
        self._pre_reset_state: Tensor | None = None
        if not self._concatenated_state:
            reset_idx = raw._reset_idx

            def remembering_reset(env_ids: Any) -> None:
                self._pre_reset_state = raw._get_states().clone()  # Isaac Lab overwrites its buffers in place
                reset_idx(env_ids)

            raw._reset_idx = remembering_reset

    def _per_agent(self, values: dict[str, Tensor]) -> list[Tensor]:
        return [values[name].reshape(self.num_envs, -1).float() for name in self.agent_names]

    def _state(self, obs: dict[str, Tensor]) -> Tensor:
        if self._concatenated_state:
            return torch.cat(self._per_agent(obs), dim=-1)
        return self._raw.state().reshape(self.num_envs, -1).float().clone()

    def set_seed(self, seed: int) -> None:
        self._seed = int(seed)

    def reset(self) -> MultiAgentObs:
        obs, _ = self._env.reset(seed=self._seed)
        self._seed = None
        return MultiAgentObs(self.pad(self._per_agent(obs)), self._state(obs))

    def step(self, actions: Tensor) -> MultiAgentStep:
        per_agent = self.agent_actions(actions.to(self.device))
        obs, rewards, terminated, time_outs, extras = self._env.step(dict(zip(self.agent_names, per_agent)))
        padded, state = self.pad(self._per_agent(obs)), self._state(obs)
        ended = torch.stack(self._per_agent(terminated)).flatten(1).all(0)
        timed_out = torch.stack(self._per_agent(time_outs)).flatten(1).all(0) & ended.logical_not()
        done = (ended | timed_out).unsqueeze(-1)
        final_obs, final_state = padded, state
        if bool(done.any()):
            if self.has_final_obs:
                finals = {name: extras[name]["final_obs"] for name in self.agent_names}
                final_obs = torch.where(done.unsqueeze(-1), self.pad(self._per_agent(finals)), padded)
                if self._concatenated_state:
                    final_state = torch.where(done, self._state(finals), state)
            if not self._concatenated_state and self._pre_reset_state is not None:
                final_state = torch.where(done, self._pre_reset_state.reshape(self.num_envs, -1).float(), state)
        reward = torch.stack(self._per_agent(rewards), dim=1).reshape(self.num_envs, self.num_agents)
        return MultiAgentStep(padded, state, final_obs, final_state, reward, ended, timed_out)

    def close(self) -> None:
        if self._env is None:
            return
        try:
            self._env.close()
        finally:
            self._env = None
            if self._close_fn is not None:
                self._close_fn()


def make_isaaclab_marl_env(name: str, num_envs: int, seed: int, device: str = "cuda:0", physics: str | None = None,
                           headless: bool = True) -> IsaacLabMARLEnv:  # fmt: skip
    """Start Isaac Lab and make the multi-agent task `name` (either id) as an `IsaacLabMARLEnv`. Raises
    `ValueError` for an unknown task or a bad argument, `IsaacLabUnavailable` when Isaac Lab cannot start."""
    from fasttd3_lora.tasks.isaaclab import launch_gym_env, wrap_or_close

    id_2x, id_3x = lookup_marl_task(name)
    env, close = launch_gym_env(id_2x, lambda api: id_2x if api == "2.x" else id_3x, num_envs, seed, device, physics,
                                headless)  # fmt: skip
    return wrap_or_close(lambda e, c: IsaacLabMARLEnv(e, task=id_2x, close_fn=c), env, close)
