"""SimbaV2's published DMC learning curves (`../shared/reference/simbav2/dmc_simbav2_utd2_summary.csv`; its
README gives the columns: task, env_step, mean_return, std_return, n_seeds; 10 seeds, population std)."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["REFERENCE", "reference_curve"]

# The shared folder next to the repository (the checkout's parent), where the project keeps reference data.
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "simbav2" / "dmc_simbav2_utd2_summary.csv"


def reference_curve(task: str, path: str | Path = REFERENCE) -> list[tuple[int, float, float]]:
    """(env_step, mean, std) of SimbaV2's curve for `task` (`cheetah-run`, no `dmc/`), sorted by step; empty when
    the task has none or the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = [(int(r["env_step"]), float(r["mean_return"]), float(r["std_return"]))
                for r in csv.DictReader(f) if r["task"] == task]  # fmt: skip
    return sorted(rows)
