"""The algorithm registry: one entry per `algo.name`, the only place that lists them (docs/architecture.md).

An entry names the algorithm's config dataclass (built once from the composed Hydra config and handed to the
loop), the task families it runs on, how export rebuilds its actor from a checkpoint (`build_actor(config,
actor_state, obs_dim, act_dim)`: a module with `deterministic_action(obs)`, weights not yet loaded), and the
module of its training loop. That module is imported when a run starts, not here: a loop uses the app's shared pieces
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
from fasttd3_lora.mlp_policy import GaussianPolicy
from fasttd3_lora.networks import DeterministicActor, TanhGaussianActor
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
    build_actor: Callable[[Mapping[str, Any], Mapping[str, Any], int, int], nn.Module]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def run(self) -> Callable[..., Any]:
        """The training loop (its module imported now)."""
        return importlib.import_module(self.loop_module).run


def _simbav2_actor(actor: type[nn.Module]) -> Callable[[Mapping[str, Any], Mapping[str, Any], int, int], nn.Module]:
    """SAC's and FastTD3's actors: SimbaV2 encoders sized by `algo.actor_hidden_dim` / `algo.actor_num_blocks`."""

    def build(config: Mapping[str, Any], state: Mapping[str, Any], obs_dim: int, act_dim: int) -> nn.Module:
        algo = config["algo"]
        return actor(obs_dim, act_dim, int(algo["actor_hidden_dim"]), int(algo["actor_num_blocks"]))

    return build


def _mlp_policy(config: Mapping[str, Any], state: Mapping[str, Any], obs_dim: int, act_dim: int) -> nn.Module:
    """PPO's policy, sized (and adapted, for a library run) as its saved state says; loaded here."""
    alpha = config.get("library", {}).get("alpha")
    return GaussianPolicy.from_state_dict(dict(state), alpha=None if alpha is None else float(alpha))


ALGORITHMS: dict[str, Algorithm] = {
    entry.name: entry
    for entry in (
        Algorithm(SACConfig, TanhGaussianActor, ("dmc",), "fasttd3_lora.loops.sac", _simbav2_actor(TanhGaussianActor)),
        Algorithm(FastTD3Config, DeterministicActor, ("dmc", "isaaclab"), "fasttd3_lora.loops.fasttd3",
                  _simbav2_actor(DeterministicActor)),
        Algorithm(PPOConfig, GaussianPolicy, ("dmc", "isaaclab"), "fasttd3_lora.loops.ppo", _mlp_policy),
    )
}


def algorithm(name: str) -> Algorithm:
    """The registry entry of `algo.name`; an unknown name raises KeyError naming the known ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"algo.name={name!r}: allowed one of {', '.join(ALGORITHMS)}") from None
