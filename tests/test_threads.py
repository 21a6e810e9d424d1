"""The `threads` key: auto counts the cores other processes leave idle (measured from /proc/stat), OMP_NUM_THREADS
and explicit counts win, bad values are refused in one line, and a resumed run keeps its count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fasttd3_lora import threads as threads_mod
from fasttd3_lora.checkpoint import save_checkpoint
from fasttd3_lora.config import ConfigError, compose_config, drop_unused_groups, validate_config
from fasttd3_lora.threads import apply_threads, auto_threads, busy_cores, choose_threads
from fasttd3_lora.train import prepare_command_line


@given(st.integers(1, 256), st.floats(0.0, 512.0), st.floats(0.0, 512.0))
def test_auto_leaves_busy_cores_alone_and_keeps_one(cores: int, busy: float, more: float) -> None:
    n = auto_threads(cores, busy)
    assert 1 <= n <= cores
    assert auto_threads(cores, busy + more) <= n  # more work elsewhere never gets more threads
    assert n == max(1, cores - round(busy)) or busy % 1 == 0.5  # round half up, not to even


def test_auto_on_the_machines_that_motivated_it() -> None:
    assert auto_threads(2, 0.1) == 2  # an idle 2-core machine: torch's default
    assert auto_threads(2, 1.0) == 1  # another training run on one core: the measured 20x case
    assert auto_threads(2, 0.5) == 1  # a core busy half the time counts as taken
    assert auto_threads(16, 6.4) == 10
    assert auto_threads(4, 9.0) == 1


def test_choose_follows_the_setting_then_omp_then_the_busy_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads_mod, "_usable_cpus", lambda: set(range(8)))
    monkeypatch.setattr(threads_mod, "_measure_busy", lambda cpus: (2.7, "2.7 busy"))
    assert choose_threads(3, environ={"OMP_NUM_THREADS": "1"}) == (3, "threads=3")
    torch.set_num_threads(1)
    assert choose_threads("auto", environ={"OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS=1")
    assert choose_threads("auto", environ={}) == (5, "auto: 8 cores, 2.7 busy")


def stat(*cpus: tuple[int, int, int, int]) -> str:
    """/proc/stat text: the aggregate line, then per cpu (user, idle, iowait, steal) with zeros elsewhere."""
    lines = ["cpu  1 2 3 4 5 6 7 8 9 10"]
    for n, (user, idle, iowait, steal) in enumerate(cpus):
        lines.append(f"cpu{n} {user} 0 0 {idle} {iowait} 0 0 {steal} {user} 0")  # guest (= user) is not added
    return "\n".join([*lines, "intr 5 0 0", "ctxt 9"])


def test_busy_cores_counts_user_and_steal_not_idle_or_iowait_on_the_allowed_cpus() -> None:
    before = stat((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0))
    # cpu0: 50 busy of 100; cpu1: 90 user + 10 steal, all busy; cpu2 (not ours): all busy
    after = stat((50, 40, 10, 0), (90, 0, 0, 10), (100, 0, 0, 0))
    assert busy_cores(before, after, {0, 1}) == pytest.approx(1.5)
    assert busy_cores(before, after, {0}) == pytest.approx(0.5)
    assert busy_cores(before, before, {0, 1}) == 0.0  # no ticks elapsed: nothing known to be busy


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux only")
def test_measured_busy_cores_lie_within_the_usable_cores() -> None:
    cpus = threads_mod._usable_cpus()
    busy, how = threads_mod._measure_busy(cpus)
    assert 0.0 <= busy <= len(cpus) + 1e-9 and how == f"{busy:.1f} busy"


def test_apply_sets_torch_threads() -> None:
    assert torch.get_num_threads() == 1
    assert apply_threads(2)[0] == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "threads=0: allowed an integer >= 1 or auto"),
        ("-2", "threads=-2: allowed an integer >= 1 or auto"),
        ("many", "threads='many': allowed an integer >= 1 or auto"),
        ("1.5", "threads=1.5: allowed an integer >= 1 or auto"),
    ],
)
def test_bad_thread_counts_are_refused_in_one_line(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config([f"threads={value}"], check=False))
    assert str(info.value) == expected


def test_a_resumed_run_keeps_its_thread_count_unless_told(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    resolved = OmegaConf.to_container(drop_unused_groups(compose_config(["threads=auto"])), resolve=True)
    resolved["threads"] = 2  # what train() records: the count auto chose
    save_checkpoint(run_dir / "checkpoints" / "latest.pt", {"meta": {"config": resolved, "overrides": []}})
    assert prepare_command_line([f"resume={run_dir}"])[:-1] == [f"resume={run_dir}", "threads=2"]
    assert prepare_command_line([f"resume={run_dir}", "threads=1"])[:-1] == [f"resume={run_dir}", "threads=1"]
