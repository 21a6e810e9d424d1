"""Run outcomes (status.json) and the experiment report (fasttd3_lora.report): a real two-seed multirun, plus a
stopped, an unfinished and a no-eval run, which are listed and never averaged."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttd3_lora.config import compose_config
from fasttd3_lora.report import main as report_main
from fasttd3_lora.report import write_report
from fasttd3_lora.run_status import read_status, recording_outcome, write_status
from fasttd3_lora.sac import SAC
from fasttd3_lora.loops.kit import NonFiniteError
from fasttd3_lora.runner import train
from tiny_runs import Crash, crash_at

# tests/test_train.py's tiny run: 150 agent steps of a 32-wide critic on cartpole-balance, evals every 100 env steps.
TINY = [
    "task=dmc/cartpole-balance", "task.max_episode_steps=50", "scale.critic_hidden_dim=32",
    "scale.critic_num_blocks=1", "critic.rank=8", "algo.actor_hidden_dim=16", "algo.batch_size=32",
    "algo.buffer_size=2000", "algo.learning_starts=50", "total_env_steps=300", "eval_every=100",
    "checkpoint_every=100", "eval_episodes=2",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "disabled"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    proc = subprocess.run(
        [sys.executable, "-m", "fasttd3_lora.train", "-m", *TINY, "critic.rank=8,64", "seed=0,1",
         f"hydra.sweep.dir={root / 'sweep'}"],
        cwd=root, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    # rank 64 > hidden 32: those two jobs are refused; the sweep still runs the others, then exits 1
    assert proc.returncode == 1 and "critic.rank=64: allowed an integer in [1, 32]" in proc.stderr, proc.stderr[-2000:]
    mp = pytest.MonkeyPatch()  # a module-scoped fixture cannot use the function-scoped `monkeypatch`
    try:
        # stopped: the non-finite guard fires at the 7th update
        update = SAC.update

        def poisoned(self, batch):
            metrics = update(self, batch)
            if self.num_updates == 7:
                metrics["critic_loss"] = torch.tensor(float("nan"))
            return metrics

        mp.setattr(SAC, "update", poisoned)
        with pytest.raises(NonFiniteError):
            train(compose_config([*TINY, "seed=2"]), root / "stopped", TINY)
        mp.undo()
        # unfinished: dies at env_step 250, after its evaluations at 100 and 200
        crash_at(mp, 250)
        with pytest.raises(Crash):
            train(compose_config([*TINY, "seed=3"]), root / "unfinished", TINY)
    finally:
        mp.undo()
    # no-eval: a finished run whose metrics.csv has lost its evaluation rows
    first = sorted((root / "sweep").glob("0_*"))[0]
    shutil.copytree(first, root / "no_eval")
    lines = (root / "no_eval" / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("eval_return")
    kept = [lines[0], *[line for line in lines[1:] if not line.split(",")[column]]]
    (root / "no_eval" / "metrics.csv").write_text("\n".join(kept) + "\n")
    return root


def test_a_multirun_makes_one_directory_per_seed_each_marked_finished(runs: Path) -> None:
    jobs = sorted(p for p in (runs / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == [f"{i}_dmc-cartpole-balance_lora_s{i % 2}" for i in range(4)]
    for job in jobs[:2]:
        assert read_status(job) == {"outcome": "finished", "message": "", "env_step": 300}
    for job in jobs[2:]:
        assert read_status(job)["outcome"] == "error" and not (job / "metrics.csv").exists()
    assert read_status(runs / "stopped")["outcome"] == "stopped"
    assert "non-finite critic_loss" in read_status(runs / "stopped")["message"]
    assert read_status(runs / "unfinished") is None


def test_report_table_has_n2_and_lists_every_run_left_out(runs: Path, tmp_path: Path) -> None:
    report = write_report(runs, tmp_path / "report").read_text()
    (row,) = [line for line in report.splitlines() if line.startswith("| dmc/cartpole-balance")]
    assert "(n=2)" in row and "(+3 left out)" in row and row.count("**") == 2
    # the cell is the mean of the two finished seeds' last evaluations
    finals = []
    for job in sorted((runs / "sweep").glob("[01]_*")):  # the two finished jobs
        with (job / "metrics.csv").open(newline="") as f:
            finals += [float(r["eval_return"]) for r in csv.DictReader(f) if r["env_step"] == "300" and r["eval_return"]]
    assert len(finals) == 2
    assert f"{sum(finals) / 2:.1f} ±" in row
    left_out = report.split("## Runs left out")[1]
    assert "| `stopped` | stopped | non-finite critic_loss" in left_out
    assert "| `unfinished` | unfinished | no status.json: metrics.csv reaches env_step 200 of 300" in left_out
    assert "checkpoint at env_step 200" in left_out
    assert "| `no_eval` | no-eval |" in left_out
    assert left_out.count("| error | critic.rank=64: allowed an integer in [1, 32] |") == 2
    assert (tmp_path / "report" / "curves_dmc-cartpole-balance.png").stat().st_size > 1000
    assert (tmp_path / "report" / "critic_loss_dmc-cartpole-balance.png").stat().st_size > 1000


def test_missing_reference_is_said_not_fatal(runs: Path, tmp_path: Path) -> None:
    report = write_report(runs / "sweep", tmp_path / "r", reference=tmp_path / "absent.csv").read_text()
    assert "SimbaV2 reference: not found at" in report and "(n=2)" in report


def test_bad_path_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (tmp_path / "nope", tmp_path):  # missing; a directory without runs
        with pytest.raises(SystemExit) as exit_info:
            report_main([str(bad)])
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"fasttd3-report: {bad}")


def test_status_records_each_outcome_and_rejects_others(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with recording_outcome(tmp_path, NonFiniteError, (ValueError,)):
            raise RuntimeError("boom")
    assert read_status(tmp_path) == {"outcome": "crashed", "message": "RuntimeError: boom", "env_step": None}
    with pytest.raises(KeyboardInterrupt):
        with recording_outcome(tmp_path, NonFiniteError, (ValueError,)):
            raise KeyboardInterrupt("at env_step 5")
    assert read_status(tmp_path)["outcome"] == "interrupted"
    with recording_outcome(tmp_path, NonFiniteError, (ValueError,)) as outcome:
        assert read_status(tmp_path) is None  # cleared while the run is in progress
        outcome["env_step"] = 7
    assert read_status(tmp_path) == {"outcome": "finished", "message": "", "env_step": 7}
    with pytest.raises(ValueError, match="outcome='done': allowed one of finished"):
        write_status(tmp_path, "done")
    (tmp_path / "status.json").write_text("{}")
    with pytest.raises(ValueError, match="not a status record"):
        read_status(tmp_path)
