"""One-line checks of composed config values: each failure is a `ConfigError` naming the key, the value and what
is allowed (`algo.lr_init=-0.0001: allowed a number > 0.0`), which the app prints before exiting with code 2.
The app's config (`fasttd3_lora.config`) and every algorithm's config (`fasttd3_lora.algo_config`) use them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["MISSING", "ConfigError", "get", "int_in", "number_in", "positive", "choice", "boolean"]

MISSING = object()  # OmegaConf.select's default for "no such key" (None is a legal value)


class ConfigError(ValueError):
    """A bad command line or config value; the message is one line."""


def get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=MISSING)
    if value is MISSING:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is not None and leaf in node and OmegaConf.is_missing(node, leaf):  # `???`: the user must give it
            raise ConfigError(f"{key}=???: required here; give it on the command line ({key}=...)")
        raise ConfigError(f"{key}: missing from the config (compose it from configs/, see docs/training.md)")
    return value


def int_in(cfg: DictConfig, key: str, lo: int, hi: int | None = None, or_else: str = "") -> int:
    value = get(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        bound = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise ConfigError(f"{key}={value!r}: allowed {bound}{or_else}")
    return value


def number_in(cfg: DictConfig, key: str, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    value = get(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        allowed = f"a number > {lo}" if hi == float("inf") and lo_open else f"a number in {left}{lo}, {hi}{right}"
        raise ConfigError(f"{key}={value!r}: allowed {allowed}")
    return float(value)


def positive(cfg: DictConfig, key: str) -> float:
    return number_in(cfg, key, 0.0, float("inf"), lo_open=True, hi_open=True)


def choice(cfg: DictConfig, key: str, allowed: Iterable[Any]) -> Any:
    value = get(cfg, key)
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed one of {', '.join(map(str, allowed))}")
    return value


def boolean(cfg: DictConfig, key: str) -> bool:
    value = get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: allowed true or false")
    return value
