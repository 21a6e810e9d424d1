"""The policy-library experiment's tables and figure (docs/library.md): LoRA adapters against full fine-tuning and
training from scratch, per task and seed, from the runs of `experiment=library_walker`, `library_walker_single`
and `library_walker_scratch` (or any PPO runs of one task family).

    python -m fasttd3_lora.experiments.library report --runs DIR [--out DIR]

Reads every PPO run below DIR (`fasttd3_lora.report`: a run of several tasks counts as one run per task, with its
share of the env steps), keeps those whose per-task budget is the most common one (the base run and tuning runs
drop out), and writes into --out (default DIR/library_report):

* library_returns.md: per task, the final eval return (mean ± std over seeds, n) of every method (`ppo-lora-r4` in
  one run of all tasks, `... one task per run`, `ppo-full`, `ppo` from scratch, other ranks), and LoRA against
  full fine-tuning: the difference with its standard error and Welch's t-test p-value ("no significant
  difference" is the seed paper's claim: the table says where it holds at p < 0.05 and where not);
* one_run_vs_many.md: for the rank of the one-run library, per task, the task's env steps and the wall-clock at
  which each of the two ways first reaches 90% of the lower of their final returns, and the total wall-clock;
* library_returns.png: the returns per task and method, with the seeds' spread;
* library_returns.csv: every (task, method, seed, final return, wall-clock).
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fasttd3_lora.experiments.grid import command_line, fail
from fasttd3_lora.report import Run, find_runs, load_run, per_task



def _method(run: Run) -> str:
    library = run.config.get("library") or {}
    if library.get("path") is None:
        return "ppo (scratch)"
    if str(library.get("rank")) == "full":
        return "ppo-full"
    tasks = library.get("tasks") or []
    return f"ppo-lora-r{library['rank']}" + (" (one run of all tasks)" if len(tasks) > 1 else " (one task per run)")


def _wall(run: Run) -> float | None:
    """The run's training wall-clock (a per-task view of a multi-task run: its run's)."""
    path = run.path if (run.path / "metrics.csv").is_file() else run.path.parent
    with open(path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["wall_time"]) if rows else None


def collect(root: Path) -> list[dict[str, Any]]:
    """(task, method, seed, final return, per-task budget, wall-clock, eval curve) of every finished PPO run."""
    runs = [r for r in per_task([load_run(p) for p in find_runs(root)]) if r.config.get("algo", {}).get("name") == "ppo"]
    rows = []
    for run in runs:
        if run.final_return is None:
            continue
        rows.append({"task": run.config["task"]["name"], "method": _method(run), "seed": int(run.config["seed"]),
                     "final_return": run.final_return, "budget": int(run.config["total_env_steps"]),
                     "wall_s": _wall(run), "curve": run.evals})  # fmt: skip
    if not rows:
        return rows
    budget = Counter(r["budget"] for r in rows).most_common(1)[0][0]
    return [r for r in rows if r["budget"] == budget]


def _pm(values: Sequence[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f} (n={len(values)})"


def returns_table(rows: list[dict[str, Any]]) -> str:
    from scipy import stats

    methods = sorted({r["method"] for r in rows}, key=lambda m: (not m.startswith("ppo-lora-r4 (one run"), m))
    tasks = sorted({r["task"] for r in rows})
    cell: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        cell[(r["task"], r["method"])].append(r["final_return"])
    lora, full = methods[0], "ppo-full"
    lines = ["| task | " + " | ".join(methods) + f" | {lora.split(' ')[0]} − full (± s.e.) | Welch p |",
             "|---|" + "---:|" * (len(methods) + 2)]  # fmt: skip
    verdicts = []
    for task in tasks:
        a, b = cell[(task, lora)], cell[(task, full)]
        diff, p = "—", "—"
        if len(a) >= 2 and len(b) >= 2:
            se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
            p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
            diff, p = f"{statistics.mean(a) - statistics.mean(b):+.1f} ± {se:.1f}", f"{p_value:.2f}"
            verdicts.append((task, p_value, statistics.mean(a) - statistics.mean(b)))
        lines.append(f"| {task} | " + " | ".join(_pm(cell[(task, m)]) for m in methods) + f" | {diff} | {p} |")
    lines.append("| average over tasks | " + " | ".join(
        f"{statistics.mean(statistics.mean(cell[(t, m)]) for t in tasks):.1f}" if all(cell[(t, m)] for t in tasks)
        else "—" for m in methods) + " | | |")  # fmt: skip
    held = [t for t, p, _ in verdicts if p >= 0.05]
    differ = [f"{t} ({'LoRA' if d > 0 else 'full'} higher, p = {p:.2f})" for t, p, d in verdicts if p < 0.05]
    lines += ["", f"No significant difference (Welch's t-test, p ≥ 0.05) on {len(held)} of {len(verdicts)} tasks"
              + (f"; a significant one on {', '.join(differ)}" if differ else "") + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _first_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, value in curve if value >= target), None)


def one_run_vs_many(rows: list[dict[str, Any]], rank_method: str) -> str:
    """Env steps (of the task) and wall-clock to 90% of the lower final return, one run of all tasks vs one per task."""
    many = rank_method.replace("(one run of all tasks)", "(one task per run)")
    one_rows = {r["task"]: r for r in rows if r["method"] == rank_method and r["seed"] == 0}
    many_rows = {r["task"]: r for r in rows if r["method"] == many and r["seed"] == 0}
    tasks = sorted(set(one_rows) & set(many_rows))
    if not tasks:
        return "No task has both a one-run and a one-task-per-run library run of seed 0.\n"
    lines = ["| task | target (90% of the lower final) | one run: task env steps | one task per run: env steps |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for task in tasks:
        a, b = one_rows[task], many_rows[task]
        target = 0.9 * min(a["final_return"], b["final_return"])
        steps = [_first_reach(r["curve"], target) for r in (a, b)]
        lines.append(f"| {task} | {target:.1f} | " + " | ".join("—" if s is None else f"{s:,}" for s in steps) + " |")
    one_wall = one_rows[tasks[0]]["wall_s"]
    many_wall = sum(many_rows[t]["wall_s"] or 0.0 for t in tasks)
    lines += ["", f"Wall-clock for all {len(tasks)} tasks: one run {one_wall / 60:.1f} min, {len(tasks)} runs "
              f"{many_wall / 60:.1f} min in sum (same env steps per task, one process each)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_returns(returns_csv: Path, path: Path) -> None:
    """The returns per task and method (mean and std over seeds), from library_returns.csv."""
    with open(returns_csv, newline="") as f:
        rows = [{**r, "final_return": float(r["final_return"])} for r in csv.DictReader(f)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows}, key=lambda m: (not m.startswith("ppo-lora-r4 (one run"), m))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(tasks)), 4.5))
    for i, method in enumerate(methods):
        values = [[r["final_return"] for r in rows if (r["task"], r["method"]) == (t, method)] for t in tasks]
        xs = np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(xs, [np.mean(v) if v else 0 for v in values], width, yerr=[np.std(v) if v else 0 for v in values],
               capsize=2, label=method)  # fmt: skip
    ax.set_xticks(np.arange(len(tasks)), [t.removeprefix("dmc/") for t in tasks], rotation=20)
    ax.set(ylabel="final eval return", title="Policy library: LoRA adapters vs full fine-tuning vs scratch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fail(message: str) -> NoReturn:
    fail("fasttd3-library-report", message)


def main(argv: Sequence[str] | None = None) -> None:
    parser = command_line("fasttd3_lora.experiments.library", "fasttd3-library-report", __doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=type(parser))
    rep = commands.add_parser("report")
    rep.add_argument("--runs", type=Path, required=True)
    rep.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.runs.is_dir():
        _fail(f"--runs {args.runs}: no such directory")
    rows = collect(args.runs)
    if not rows:
        _fail(f"--runs {args.runs}: no finished PPO run below it")
    out = args.out or args.runs / "library_report"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "library_returns.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "method", "seed", "final_return", "budget", "wall_s"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in rows)
    (out / "library_returns.md").write_text(returns_table(rows))
    one_run = next((m for m in sorted({r["method"] for r in rows}) if "(one run of all tasks)" in m), None)
    (out / "one_run_vs_many.md").write_text(one_run_vs_many(rows, one_run) if one_run else "No one-run library.\n")
    plot_returns(out / "library_returns.csv", out / "library_returns.png")
    print((out / "library_returns.md").read_text())
    print((out / "one_run_vs_many.md").read_text())


if __name__ == "__main__":
    main()
