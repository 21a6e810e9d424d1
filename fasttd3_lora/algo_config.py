"""The config dataclasses algorithms derive from: their fields are the keys of `configs/algo/<name>.yaml` (plus,
for the off-policy recipes, the critic's `CriticSettings`), built once from the composed Hydra config and handed
to the loop.

* `AlgorithmConfig`: what every algorithm has (envs, action repeat, the run's arithmetic) and the machinery:
  `from_hydra` maps `cfg.algo` onto the fields by name and type (no hand-written list), `hydra_values` is the hook
  for what a family or the task adds, `check_keys` states the user-facing ranges as one-line `ConfigError`s
  (`algo.tau=0: allowed a number in (0.0, 1.0]`), and `check_hydra` runs them before building the config, whose
  own `__post_init__` guards programmatic use.
* `OffPolicyConfig`: SAC's and FastTD3's shared recipe (replay, updates per step, the categorical critic of the
  `critic/` and `scale/` groups). An algorithm without that critic (PPO) derives from `AlgorithmConfig` alone, and
  the app then neither checks nor records the `critic/` group for it (`groups`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from omegaconf import DictConfig

from fasttd3_lora.checks import ConfigError, choice, int_in, number_in, positive
from fasttd3_lora.networks import CriticSettings
from fasttd3_lora.precision import choose_precision

__all__ = ["OPTIONAL_GROUPS", "AlgorithmConfig", "OffPolicyConfig", "check_positive_ints"]

OPTIONAL_GROUPS = ("critic", "scale", "library", "policy")  # configs/config.yaml's groups some algorithms do not use

_INF = float("inf")


def check_positive_ints(config: Any, fields: tuple[str, ...]) -> None:
    """`ValueError` naming the first of `fields` of `config` that is not an int >= 1."""
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{field} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """Base of every algorithm's config (`SACConfig`, `FastTD3Config`, `PPOConfig`, ...)."""

    name: ClassVar[str]
    # The optional config groups that configure this algorithm (`OPTIONAL_GROUPS`): the app checks them for it,
    # and drops the others from its config.yaml and checkpoints.
    groups: ClassVar[tuple[str, ...]] = ()

    num_envs: int
    action_repeat: int
    amp_bf16: bool

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)  # CriticSettings' checks for the off-policy recipes
        if parent is not None:
            parent()
        check_positive_ints(self, ("num_envs", "action_repeat"))

    @classmethod
    def group_fields(cls, cfg: DictConfig) -> dict[str, Any]:
        """Fields that come from groups other than `algo` (the off-policy recipes: the critic's)."""
        return {}

    @classmethod
    def _group_field_names(cls) -> set[str]:
        return set()

    @classmethod
    def algo_keys(cls) -> tuple[str, ...]:
        """The fields that come from `cfg.algo` (not the groups' fields, nor `amp_bf16`, which is `precision`)."""
        skip = cls._group_field_names() | {"amp_bf16"}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in skip)

    @classmethod
    def hydra_values(cls, cfg: DictConfig) -> dict[str, Any]:
        """The raw value of every algo field: `cfg.algo.<field>`, and bf16 autocast from the run's `precision`
        (`auto` resolved for `cfg.device`); subclasses add or replace some. A task family's `task.<algo name>`
        values reach `cfg.algo` by interpolation (configs/algo/<name>.yaml): a key no algo key reads is a typo."""
        family = cfg.task.get(cls.name, None) if "task" in cfg else None
        unknown = sorted(set(family or ()) - set(cfg.algo))
        if unknown:
            raise ValueError(f"task.{cls.name} has unknown keys {unknown}; allowed: {sorted(cfg.algo)}")
        values = {key: cfg.algo[key] for key in cls.algo_keys()}
        values["amp_bf16"] = choose_precision(cfg.precision, cfg.device)[0] == "bf16"
        return values

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> "AlgorithmConfig":
        """This algorithm's config from a composed config (`algo.name` must be `cls.name`)."""
        if cfg.algo.name != cls.name:
            raise ValueError(f"{cls.__name__}.from_hydra needs algo.name {cls.name!r}, got {cfg.algo.name!r}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        typed = {key: _cast(types[key], value) for key, value in cls.hydra_values(cfg).items()}
        return cls(**typed, **cls.group_fields(cfg))

    @classmethod
    def check_hydra(cls, cfg: DictConfig) -> "AlgorithmConfig":
        """Check the algo keys of a composed config in one line each (`ConfigError`), then build the config."""
        cls.check_keys(cfg)
        try:
            return cls.from_hydra(cfg)
        except ValueError as err:  # what only the built config can tell (a family's values, field relations)
            raise ConfigError(str(err)) from None

    @classmethod
    def check_keys(cls, cfg: DictConfig) -> None:
        """The user-facing range of every shared algo key; subclasses add theirs after `super().check_keys`."""
        for key in ("num_envs", "action_repeat"):
            int_in(cfg, f"algo.{key}", 1)


@dataclasses.dataclass(frozen=True)
class OffPolicyConfig(AlgorithmConfig, CriticSettings):
    """The replay-based recipes' shared fields (SAC, FastTD3) and their categorical critic (`CriticSettings`)."""

    groups: ClassVar[tuple[str, ...]] = ("critic", "scale")

    updates_per_step: int
    batch_size: int
    buffer_size: int
    learning_starts: int
    lr_init: float
    lr_final: float
    tau: float
    num_atoms: int
    v_min: float
    v_max: float
    num_critics: int
    lora_weight_decay: float
    actor_hidden_dim: int
    actor_num_blocks: int

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive_ints(self, ("updates_per_step", "batch_size", "buffer_size", "num_atoms", "actor_hidden_dim",
                                   "actor_num_blocks"))  # fmt: skip
        if self.num_atoms < 2:
            raise ValueError(f"{name}.num_atoms must be >= 2, got {self.num_atoms!r}")
        if self.learning_starts < 0:
            raise ValueError(f"{name}.learning_starts must be >= 0, got {self.learning_starts!r}")
        if not (self.lr_init > 0 and self.lr_final > 0):
            raise ValueError(f"{name} lr_init and lr_final must be > 0, got {self.lr_init!r}, {self.lr_final!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"{name}.tau must be in (0, 1], got {self.tau!r}")
        if not self.v_min < self.v_max:
            raise ValueError(f"{name} needs v_min < v_max, got v_min={self.v_min!r}, v_max={self.v_max!r}")
        if self.num_critics not in (1, 2):
            raise ValueError(f"{name}.num_critics must be 1 (single) or 2 (twin, clipped double Q), got "
                             f"{self.num_critics!r}")  # fmt: skip
        if self.lora_weight_decay < 0:
            raise ValueError(f"{name}.lora_weight_decay must be >= 0, got {self.lora_weight_decay!r}")

    @classmethod
    def group_fields(cls, cfg: DictConfig) -> dict[str, Any]:
        return CriticSettings.hydra_fields(cfg)

    @classmethod
    def _group_field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(CriticSettings)}

    @classmethod
    def check_keys(cls, cfg: DictConfig) -> None:
        super().check_keys(cfg)
        for key in ("updates_per_step", "batch_size", "buffer_size", "num_atoms", "actor_hidden_dim",
                    "actor_num_blocks"):  # fmt: skip
            int_in(cfg, f"algo.{key}", 2 if key == "num_atoms" else 1)
        int_in(cfg, "algo.learning_starts", 0)
        positive(cfg, "algo.lr_init")
        positive(cfg, "algo.lr_final")
        number_in(cfg, "algo.tau", 0.0, 1.0, lo_open=True, hi_open=False)
        v_min = number_in(cfg, "algo.v_min", -_INF, _INF, lo_open=True, hi_open=True)
        v_max = number_in(cfg, "algo.v_max", -_INF, _INF, lo_open=True, hi_open=True)
        if not v_min < v_max:
            raise ConfigError(f"algo.v_max={v_max!r}: allowed a number > algo.v_min ({v_min!r})")
        choice(cfg, "algo.num_critics", (1, 2))
        number_in(cfg, "algo.lora_weight_decay", 0.0, _INF, lo_open=False, hi_open=True)


def _cast(annotation: str, value: Any) -> Any:
    """Plain Python values from OmegaConf nodes, by the field's annotation ('int', 'float', 'str | None', ...)."""
    if value is None:
        return None
    base = annotation.split("|")[0].strip()
    if base.startswith("tuple"):  # tuple[int, ...]: a list in the yaml
        return tuple(int(v) for v in value)
    return {"int": int, "float": float, "bool": bool, "str": str}[base](value)
