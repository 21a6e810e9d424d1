"""The algorithm registry: one entry per `algo.name`, the only place that lists them (docs/architecture.md).

An entry names the algorithm's config dataclass (built once from the composed Hydra config and handed to the
loop), the task families it runs on, how export rebuilds its actor from a checkpoint (`build_actor(meta,
actor_state, obs_dim, act_dim)` with the checkpoint's `meta` (config, env, ...): a module with
`deterministic_action(obs)`, weights not yet loaded), and the module of its training loop. That module is imported when a run starts, not here: a loop uses the app's shared pieces
(config checks, the loop kit), which in turn look algorithms up here, and a bad command line is refused before
any loop (or simulator) loads. A loop module defines

    run(cfg, algo_cfg, run_dir, overrides) -> Counters     one run, or its resumption (`fasttd3_lora.loops.kit`)

Adding an algorithm: its module (agent + config + loop), `configs/algo/<name>.yaml`, and one line below.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fasttd3_lora.algo_config import AlgorithmConfig
from fasttd3_lora.fasttd3 import FastTD3Config
from fasttd3_lora.grpo import FULL as GRPO_FULL
from fasttd3_lora.grpo import GaussianView, GRPOConfig, adapt
from fasttd3_lora.mlp_policy import GaussianPolicy
from fasttd3_lora.networks import DeterministicActor, TanhGaussianActor
from fasttd3_lora.mappo import MAPPOConfig, SeparatePolicies, policy_from_state_dict
from fasttd3_lora.ppo import PPOConfig
from fasttd3_lora.sac import SACConfig

__all__ = ["Algorithm", "ALGORITHMS", "algorithm"]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What the app, the loop dispatch and export need to know of one algorithm."""

    config: type[AlgorithmConfig]
    actor: type[nn.Module]  # the deterministic policy export rebuilds from `agent.actor` in a checkpoint
    families: tuple[str, ...]  # the task families (`task.family`) it runs on
    loop_module: str  # defines run(cfg, algo_cfg, run_dir, overrides)
    build_actor: Callable[[Mapping[str, Any], Mapping[str, Any], int, int], nn.Module]  # (meta, actor state, dims)
    # An actor of several tasks or agents takes each row's index as a second input: its ONNX input's name
    index_input: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def run(self) -> Callable[..., Any]:
        """The training loop (its module imported now)."""
        return importlib.import_module(self.loop_module).run


def _simbav2_actor(actor: type[nn.Module]) -> Callable[[Mapping[str, Any], Mapping[str, Any], int, int], nn.Module]:
    """SAC's and FastTD3's actors: SimbaV2 encoders sized by `algo.actor_hidden_dim` / `algo.actor_num_blocks`."""

    def build(meta: Mapping[str, Any], state: Mapping[str, Any], obs_dim: int, act_dim: int) -> nn.Module:
        algo = meta["config"]["algo"]
        return actor(obs_dim, act_dim, int(algo["actor_hidden_dim"]), int(algo["actor_num_blocks"]))

    return build


def _mlp_policy(meta: Mapping[str, Any], state: Mapping[str, Any], obs_dim: int, act_dim: int) -> nn.Module:
    """PPO's policy, sized (and adapted, for a library run) as its saved state and config say."""
    return _adapted_policy(state, meta["config"].get("library", {}))


def _adapted_policy(state: Mapping[str, Any], group: Mapping[str, Any],
                    load: Callable[..., nn.Module] = GaussianPolicy.from_state_dict) -> nn.Module:  # fmt: skip
    """A policy from its state (`load`: a `from_state_dict`), with the rank and alpha its config group (`library`,
    `policy`) asked for."""
    rank, alpha = group.get("rank"), group.get("alpha")
    return load(dict(state), alpha=None if alpha is None else float(alpha), rank=rank if isinstance(rank, int) else None)


def _grpo_policy(meta: Mapping[str, Any], state: Mapping[str, Any], obs_dim: int, act_dim: int) -> nn.Module:
    """A GRPO run's policy: the source run's actor (`meta["source"]`, recorded by the GRPO loop) in a
    `GaussianView`, adapted as the run's `algo.rank` / `algo.alpha` say."""
    source, algo = meta["source"], meta["config"]["algo"]
    name = source["config"]["algo"]["name"]
    if name == "ppo":
        actor = GaussianPolicy(obs_dim, act_dim, source["config"]["algo"]["actor_hidden_dims"])
    else:
        actor = ALGORITHMS[name].build_actor(source, {}, obs_dim, act_dim)
    view = GaussianView(actor, float(algo["init_std"]))
    rank = algo["rank"]
    adapt(view, None if rank == GRPO_FULL else int(rank), None if algo["alpha"] is None else float(algo["alpha"]))
    return view


def _mappo_actor(meta: Mapping[str, Any], state: Mapping[str, Any], obs_dim: int, act_dim: int) -> nn.Module:
    """MAPPO's actor as its saved state says: one shared network (with LoRASA's adapters, or not) or one per agent."""
    if any(key.startswith("policies.") for key in state):
        return SeparatePolicies.from_state_dict(dict(state))
    return _adapted_policy(state, meta["config"].get("policy", {}), policy_from_state_dict)


ALGORITHMS: dict[str, Algorithm] = {
    entry.name: entry
    for entry in (
        Algorithm(SACConfig, TanhGaussianActor, ("dmc",), "fasttd3_lora.loops.sac", _simbav2_actor(TanhGaussianActor)),
        Algorithm(FastTD3Config, DeterministicActor, ("dmc", "isaaclab"), "fasttd3_lora.loops.fasttd3",
                  _simbav2_actor(DeterministicActor)),
        Algorithm(PPOConfig, GaussianPolicy, ("dmc", "metaworld", "isaaclab"), "fasttd3_lora.loops.ppo", _mlp_policy,
                  index_input="task_id"),
        # Isaac Lab draws each env's start from its own generator: a group of envs cannot share one (docs/drift.md)
        Algorithm(GRPOConfig, GaussianView, ("dmc", "metaworld"), "fasttd3_lora.loops.grpo", _grpo_policy),
        Algorithm(MAPPOConfig, GaussianPolicy, ("vmas", "mamujoco", "isaaclab_marl"), "fasttd3_lora.loops.mappo",
                  _mappo_actor, index_input="agent_id"),
    )
}


def algorithm(name: str) -> Algorithm:
    """The registry entry of `algo.name`; an unknown name raises KeyError naming the known ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"algo.name={name!r}: allowed one of {', '.join(ALGORITHMS)}") from None
