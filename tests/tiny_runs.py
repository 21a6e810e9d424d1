"""Pieces the end-to-end training tests share: tiny-network overrides and a run that dies mid-way."""

from __future__ import annotations

import pytest

from fasttd3_lora.run_logging import RunLogger
from fasttd3_lora.loops.kit import UpdateMetrics

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


class Crash(BaseException):
    """A process dying mid-run (SIGKILL-like: no `except Exception` sees it, so no status.json is written)."""


def crash_at(monkeypatch: pytest.MonkeyPatch, env_step: int) -> None:
    """Make the next training run raise `Crash` once it has logged the updates of `env_step`; `monkeypatch.undo()`
    (or the fixture's teardown) restores the real logger."""
    add = UpdateMetrics.add

    def dying_add(self, updates, step, num_updates):  # noqa: ANN001
        add(self, updates, step, num_updates)
        if step == env_step:
            raise Crash

    monkeypatch.setattr(UpdateMetrics, "add", dying_add)


def crash_after_log(monkeypatch: pytest.MonkeyPatch, env_step: int) -> None:
    """Make the next training run raise `Crash` right after it has written the metrics row of `env_step` (the
    moment a SIGKILL leaves rows on disk that the resumed run will log again)."""
    log = RunLogger.log

    def dying_log(self, step, wall_time, metrics):  # noqa: ANN001
        log(self, step, wall_time, metrics)
        if step == env_step:
            raise Crash

    monkeypatch.setattr(RunLogger, "log", dying_log)
