"""Learning: evaluation return of SAC runs against SimbaV2's published DMC curves (../shared/reference/simbav2/).

    python benchmarks/learning_curves.py RUN_DIR [RUN_DIR ...] --out docs/learning/cheetah-run.png

Prints a table (last evaluation per run, with wall time, and the reference mean ± std at the nearest reference
step) and writes one PNG: every run's eval curve, the reference mean with a ±2 std band.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from fasttd3_lora.reference import reference_curve  # noqa: E402
from fasttd3_lora.report import eval_curve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    tasks = set()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    print("| run | critic | last eval env_step | eval return | wall time (h) |")
    print("|---|---|---:|---:|---:|")
    for run in args.runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        task = cfg["task"]["name"].removeprefix("dmc/")
        tasks.add(task)
        steps, returns, walls = eval_curve(run)
        ax.plot(steps, returns, marker="o", label=f"{cfg['critic']['kind']} (seed {cfg['seed']})")
        if steps:
            print(f"| {run.name} | {cfg['critic']['kind']} | {steps[-1]} | {returns[-1]:.1f} | {walls[-1] / 3600:.2f} |")
    for task in sorted(tasks):
        ref = reference_curve(task)
        if ref:
            ref = [r for r in ref if r[0] <= 200_000]  # the budgets this CPU can reach
            s, m, sd = zip(*ref)
            ax.plot(s, m, color="k", lw=1, label=f"SimbaV2 reference ({task}, 10 seeds)")
            ax.fill_between(s, [a - 2 * b for a, b in zip(m, sd)], [a + 2 * b for a, b in zip(m, sd)], color="k", alpha=0.1)
            print(f"reference {task}: " + ", ".join(f"{a // 1000}k {b:.0f} ± {c:.0f}" for a, b, c in ref[:3]))
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return (10 episodes)")
    ax.set_title(", ".join(sorted(tasks)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
