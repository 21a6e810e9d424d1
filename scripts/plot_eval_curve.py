"""Plot a run's evaluation curve (eval_return ± eval_return_std against env steps) from its metrics.csv.

    python scripts/plot_eval_curve.py <run dir> <out.png> [--title TEXT]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def eval_rows(metrics_csv: Path) -> list[tuple[int, float, float, float]]:
    """(env_step, wall_time, eval_return, eval_return_std) of every evaluation row."""
    with metrics_csv.open() as f:
        return [(int(r["env_step"]), float(r["wall_time"]), float(r["eval_return"]), float(r["eval_return_std"]))
                for r in csv.DictReader(f) if r.get("eval_return")]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows = eval_rows(args.run_dir / "metrics.csv")
    if not rows:
        raise SystemExit(f"{args.run_dir / 'metrics.csv'}: no eval_return rows yet")
    steps, _, mean, std = zip(*rows, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, mean, marker="o", ms=3)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return")
    ax.set_title(args.title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    for step, wall, m, s in rows:
        print(f"{step:>8} {wall / 60:7.1f} min {m:8.1f} ± {s:.1f}")


if __name__ == "__main__":
    main()
