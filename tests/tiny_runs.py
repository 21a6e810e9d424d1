"""Pieces the end-to-end training tests share: tiny-network overrides and a run that dies mid-way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.config import compose_config, expand_shorthands
from fasttd3_lora.loops.kit import Counters, UpdateMetrics
from fasttd3_lora.run_logging import RunLogger
from fasttd3_lora.runner import train

# Networks small enough that a whole FastTD3 / SAC run takes seconds on one CPU thread.
SMALL_NETS = [
    "scale.critic_hidden_dim=32",
    "scale.critic_num_blocks=1",
    "critic.rank=8",
    "critic.alpha=8",
    "algo.num_atoms=11",
    "algo.actor_hidden_dim=16",
    "precision=fp32",
]


def train_one_thread(overrides: list[str], run_dir: Path) -> Counters:
    """A whole run of the app in this process on one torch thread (the command line's shorthands expanded)."""
    overrides = expand_shorthands(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(compose_config(overrides), run_dir, overrides)
    finally:
        torch.set_num_threads(threads)


class Crash(BaseException):
    """A process dying mid-run (SIGKILL-like: no `except Exception` sees it, so no status.json is written)."""


def _crash_after(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, env_step: int, step_of) -> None:  # noqa: ANN001
    """Make `owner.name` raise `Crash` right after the call whose env step (`step_of(args)`) is `env_step`."""
    original = getattr(owner, name)

    def dying(self, *args):  # noqa: ANN001, ANN202
        original(self, *args)
        if step_of(args) == env_step:
            raise Crash

    monkeypatch.setattr(owner, name, dying)


def crash_at(monkeypatch: pytest.MonkeyPatch, env_step: int) -> None:
    """Make the next training run raise `Crash` once it has logged the updates of `env_step`; `monkeypatch.undo()`
    (or the fixture's teardown) restores the real logger."""
    _crash_after(monkeypatch, UpdateMetrics, "add", env_step, lambda args: args[1])  # add(updates, env_step, n)


def crash_after_log(monkeypatch: pytest.MonkeyPatch, env_step: int) -> None:
    """Make the next training run raise `Crash` right after it has written the metrics row of `env_step` (the
    moment a SIGKILL leaves rows on disk that the resumed run will log again)."""
    _crash_after(monkeypatch, RunLogger, "log", env_step, lambda args: args[0])  # log(env_step, wall_time, row)


def crash_and_resume(monkeypatch: pytest.MonkeyPatch, overrides: list[str], run_dir: Path, env_step: int) -> Counters:
    """A run of `overrides` into `run_dir` that dies once it has logged `env_step`, then its resumption."""
    crash_at(monkeypatch, env_step)
    with pytest.raises(Crash):
        train_one_thread(overrides, run_dir)
    monkeypatch.undo()
    return train_one_thread([*overrides, f"resume={run_dir}"], run_dir)


def assert_same_agent(a_dir: Path, b_dir: Path, keys: tuple[str, ...]) -> None:
    """The latest checkpoints of two runs hold bit-identical `agent[key]` tensors for every key."""
    a = load_checkpoint(a_dir / "checkpoints" / "latest.pt")["agent"]
    b = load_checkpoint(b_dir / "checkpoints" / "latest.pt")["agent"]
    for key in keys:
        assert a[key].keys() == b[key].keys(), key
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
