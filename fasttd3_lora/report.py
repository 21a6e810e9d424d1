"""Experiment report: `python -m fasttd3_lora.report RUNS_DIR [--out DIR] [--reference CSV]` (docs/experiments.md).

Collects every run directory below RUNS_DIR (a directory with `config.yaml` and `metrics.csv`, as
`fasttd3_lora.train` writes them; also a directory with only `status.json`, a job that failed before starting)
and writes into `--out` (default `RUNS_DIR/report`):

    report.md                  a table per algorithm in the form of the paper's Tables 6/7: rows tasks, columns
                               method x scale, cell = final return mean ± std over seeds (n shown), best per row
                               in bold, an average row; then the runs left out of the table, with reasons
    curves_<task>.png          eval return vs env steps: mean and ±1 std band per column over its finished runs,
                               other runs as thin dashed lines, SimbaV2's published mean ± std where it has the task
    critic_loss_<task>.png     mean training critic loss over the finished runs of each column

Final return: the evaluation at the end of a finished run (env_step = total_env_steps; `eval_episodes`
deterministic episodes). Only runs whose status.json says `finished` (or, for runs older than status.json, whose
metrics reach total_env_steps with that evaluation) enter the table; every other run is listed with its reason.

Runs are grouped by their whole resolved config except the seed and the keys that only steer a run (device,
logging, checkpoint cadence); a column is named by critic kind, scale, and every config key that differs
between runs of the same task (an ablation's `critic.rank=48`, Sparse's S when it is not the scale's default).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fasttd3_lora.checkpoint import CHECKPOINT_DIR, LATEST, CheckpointError, load_checkpoint
from fasttd3_lora.config import config_dir, group_options, path_safe, run_tag
from fasttd3_lora.reference import REFERENCE, reference_curve
from fasttd3_lora.run_status import STATUS_FILE, read_status

__all__ = ["Run", "find_runs", "load_run", "per_task", "eval_curve", "write_curves", "plot_curves", "column_labels",
           "write_report", "main"]

EXIT_BAD_PATH = 2
# Keys that steer a run without changing what it learns or how it is measured: not part of a run's group.
STEERING = ("seed", "resume", "logger", "wandb", "device", "checkpoint_every", "save_buffer",
            "keep_eval_checkpoints", "algo.compile", "algo.compile_mode")  # fmt: skip
# Columns in the paper's order; ablation variants follow their kind.
KIND_ORDER = ("simbav2", "sparse", "lora")


@dataclass
class Run:
    """One run directory, read."""

    path: Path
    config: dict[str, Any]
    outcome: str  # finished | stopped | interrupted | error | crashed | unfinished
    reason: str = ""
    evals: list[tuple[int, float]] = field(default_factory=list)  # (env_step, eval_return)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (env_step, critic_loss) of training rows
    task_evals: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # a library run's eval_return/<task>

    @property
    def total(self) -> int | None:
        return self.config.get("total_env_steps")

    @property
    def final_return(self) -> float | None:
        """The end-of-run evaluation of a finished run (module docstring), else None."""
        if self.outcome != "finished" or not self.evals or self.total is None or self.evals[-1][0] < self.total:
            return None
        return self.evals[-1][1]


def eval_curve(run_dir: str | Path) -> tuple[list[int], list[float], list[float]]:
    """(env_steps, eval returns, wall times) of a run's evaluation rows in metrics.csv."""
    rows = _metrics_rows(Path(run_dir))
    rows = [r for r in rows if r.get("eval_return")]
    return [int(r["env_step"]) for r in rows], [float(r["eval_return"]) for r in rows], [float(r["wall_time"]) for r in rows]


def write_curves(path: Path, curves: dict[str, Sequence[tuple[int, float]]]) -> None:
    """Eval curves as one CSV (label, env_step, eval_return): the committed data a figure is redrawn from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "env_step", "eval_return"])
        for label, points in curves.items():
            writer.writerows([label, step, value] for step, value in points)


def plot_curves(curves_csv: Path, path: Path, title: str, reference_task: str | None = None,
                reference: Path = REFERENCE) -> None:  # fmt: skip
    """Every curve of a `write_curves` file, with SimbaV2's published mean ± std of `reference_task` if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(curves_csv, newline="") as f:
        for row in csv.DictReader(f):
            curves[row["label"]].append((int(row["env_step"]), float(row["eval_return"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    top = max(step for points in curves.values() for step, _ in points)
    ref = [r for r in reference_curve(reference_task, reference) if r[0] <= top] if reference_task else []
    if ref:
        s, m, sd = (np.array(x) for x in zip(*ref))
        ax.plot(s, m, color="k", lw=1, label="SimbaV2 reference (mean ± std, 10 seeds)")
        ax.fill_between(s, m - sd, m + sd, color="k", alpha=0.1)
    ax.set(xlabel="env steps", ylabel="eval return", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def find_runs(root: Path) -> list[Path]:
    """Run directories below `root` (itself included): config.yaml + metrics.csv, or a lone status.json.
    Hydra's own `.hydra/config.yaml` has no metrics.csv beside it, so it is not mistaken for a run."""
    found = {p.parent for p in root.rglob("config.yaml") if (p.parent / "metrics.csv").is_file()}
    found |= {p.parent for p in root.rglob(STATUS_FILE)}
    return sorted(found)


def _ago(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def load_run(path: Path) -> Run:
    """Read one run directory; problems (no config, unreadable files) become the run's outcome and reason."""
    try:
        status = read_status(path)
    except ValueError as err:
        return Run(path, {}, "crashed", str(err))
    if not (path / "config.yaml").is_file() or not (path / "metrics.csv").is_file():
        assert status is not None  # find_runs returned it for its status.json
        return Run(path, {}, status["outcome"] if status["outcome"] != "finished" else "crashed",
                   status["message"] or "finished without config.yaml / metrics.csv")  # fmt: skip
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
        rows = _metrics_rows(path)
        evals = [(int(r["env_step"]), float(r["eval_return"])) for r in rows if r.get("eval_return")]
        losses = [(int(r["env_step"]), float(r["critic_loss"])) for r in rows if r.get("critic_loss")]
        task_evals = {key.removeprefix("eval_return/"): [(int(r["env_step"]), float(r[key])) for r in rows if r.get(key)]
                      for key in (rows[0] if rows else {}) if key.startswith("eval_return/")}  # fmt: skip
    except (OSError, ValueError, KeyError, yaml.YAMLError) as err:
        return Run(path, {}, "crashed", f"unreadable config.yaml / metrics.csv ({type(err).__name__}: {err})")
    run = Run(path, config, "finished", evals=evals, losses=losses, task_evals=task_evals)
    last_step = max([int(r["env_step"]) for r in rows if r.get("env_step")], default=0)
    if status is not None:
        run.outcome, run.reason = status["outcome"], status["message"]
    elif run.total is not None and evals and evals[-1][0] >= run.total:
        run.reason = "no status.json (a run older than it), inferred from its final evaluation"
    else:
        stale = time.time() - (path / "metrics.csv").stat().st_mtime
        try:
            counters = load_checkpoint(path / CHECKPOINT_DIR / LATEST, mmap=True)["meta"]["counters"]
            resumable = f"; checkpoint at env_step {counters['env_step']}"
        except (CheckpointError, KeyError) as err:
            resumable = f"; no usable checkpoint ({err})"
        run.outcome = "unfinished"
        run.reason = (f"no status.json: metrics.csv reaches env_step {last_step} of {run.total}, last written "
                      f"{_ago(stale)} ago (still running, or killed){resumable}")  # fmt: skip
    if run.outcome == "finished" and run.final_return is None:
        run.outcome = "no-eval"
        run.reason = f"finished but metrics.csv has no evaluation at env_step {run.total} (last row {last_step})"
    return run


def per_task(runs: Sequence[Run]) -> list[Run]:
    """A run that trained several tasks (a policy library run) as one run per task: that task's evaluations, its
    share of the env steps (steps and budget divided by the number of tasks), the task as `task.name`; others
    as they are."""
    out = []
    for run in runs:
        tasks = (run.config.get("library") or {}).get("tasks") or []
        if len(tasks) < 2 or not run.task_evals:
            out.append(run)
            continue
        n = len(tasks)
        for task in tasks:
            config = {**run.config, "task": {**run.config["task"], "name": task},
                      "total_env_steps": run.config["total_env_steps"] // n}  # fmt: skip
            evals = [(step // n, value) for step, value in run.task_evals.get(task, [])]
            out.append(Run(run.path / path_safe(task), config, run.outcome, run.reason, evals, []))
    return out


# ------------------------------------------------------------------------------------------------- grouping


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _steering(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in STEERING)


def _scale_presets() -> dict[str, dict[str, Any]]:
    return {name: yaml.safe_load((config_dir() / "scale" / f"{name}.yaml").read_text()) for name in group_options("scale")}


def _scale_and_sparsity(config: dict[str, Any], presets: dict[str, dict[str, Any]]) -> str:
    """The scale's preset name (or d x L), plus S when a Sparse critic departs from the preset's sparsity."""
    scale, kind = config["scale"], config["critic"]["kind"]
    name = next((n for n, p in presets.items() if (p["critic_hidden_dim"], p["critic_num_blocks"]) ==
                 (scale["critic_hidden_dim"], scale["critic_num_blocks"])), None)  # fmt: skip
    label = name or f"{scale['critic_hidden_dim']}x{scale['critic_num_blocks']}"
    if kind == "sparse" and (name is None or presets[name]["sparsity"] != scale["sparsity"]):
        label += f", S={scale['sparsity']}"
    return label


def _distinguishing(config: dict[str, Any]) -> dict[str, Any]:
    """The keys that can tell two runs of one task apart in a column name: all but the task, the seed, the
    steering keys, the scale group (named by `_scale_and_sparsity`), the library's place and base (a library
    run's method is its rank; several tasks in one run show as `tasks per run`) and the multi-agent policy's mode
    and source (the method names the mode; rank and alpha count for LoRASA only)."""
    flat = _flatten(config)
    lorasa = (config.get("policy") or {}).get("mode") == "lorasa"
    keys = {k: v for k, v in flat.items() if not _steering(k) and not k.startswith(("task.", "scale.", "library."))
            and k not in ("critic.kind", "policy.mode", "policy.from") and (lorasa or not k.startswith("policy."))}  # fmt: skip
    tasks = (config.get("library") or {}).get("tasks") or []
    if len(tasks) > 1:
        keys["tasks per run"] = len(tasks)
    return keys


def _method(config: dict[str, Any]) -> str:
    """What learnt: the critic kind (SAC, FastTD3), else the algorithm and its library or multi-agent policy mode
    (`ppo-lora-r4`, `mappo-lorasa`)."""
    if "critic" in config:
        return str(config["critic"]["kind"])
    library, policy = config.get("library") or {}, config.get("policy") or {}
    return run_tag(config["algo"]["name"], None, library.get("path"), library.get("rank"), policy.get("mode"))


def column_labels(runs: Sequence[Run]) -> dict[Path, str]:
    """Column name of every run (module docstring): kind, scale, and the keys that differ within a task."""
    presets = _scale_presets()
    by_task: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_task[run.config["task"]["name"]].append(run)
    varying: set[str] = set()
    for task_runs in by_task.values():
        values: dict[str, set[str]] = defaultdict(set)
        for run in task_runs:
            for key, value in _distinguishing(run.config).items():
                values[key].add(repr(value))
        varying |= {k for k, v in values.items() if len(v) > 1}
    labels = {}
    for run in runs:
        flat = _distinguishing(run.config)
        extras = [f"{k}={flat[k]}" for k in sorted(varying) if k in flat]
        method = ", ".join([_method(run.config), *extras])
        labels[run.path] = f"{method} / {_scale_and_sparsity(run.config, presets)}" if "scale" in run.config else method
    return labels


def _column_order(label: str) -> tuple[int, str]:
    kind = label.split(",")[0].split(" /")[0]
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), label)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (as SimbaV2's reference CSV reports its seeds)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std())


# -------------------------------------------------------------------------------------------------- writing


def _table(algo: str, runs: list[Run], labels: dict[Path, str], reference: Path) -> list[str]:
    tasks = sorted({r.config["task"]["name"] for r in runs})
    columns = sorted({labels[r.path] for r in runs}, key=_column_order)
    cells: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        cells[(run.config["task"]["name"], labels[run.path])].append(run)
    budgets = sorted({r.total for r in runs if r.total is not None})
    show_reference = len(budgets) == 1 and any(task.startswith("dmc/") for task in tasks)  # SimbaV2's DMC curves
    header = ["task", *columns] + (["SimbaV2 reference"] if show_reference else [])
    lines = [f"### {algo}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    means: dict[str, list[float]] = defaultdict(list)
    for task in tasks:
        stats = {}
        for column in columns:
            finals = [r.final_return for r in cells.get((task, column), []) if r.final_return is not None]
            if finals:
                stats[column] = (*_mean_std(finals), len(finals))
        best = max((s[0] for s in stats.values()), default=None)
        row = [task]
        for column in columns:
            members = cells.get((task, column), [])
            left_out = sum(r.final_return is None for r in members)
            if column not in stats:
                row.append(f"— ({left_out} left out)" if left_out else "")
                continue
            mean, std, n = stats[column]
            means[column].append(mean)
            text = f"{mean:.1f} ± {std:.1f} (n={n})"
            text = f"**{text}**" if mean == best else text
            row.append(text + (f" (+{left_out} left out)" if left_out else ""))
        if show_reference:
            ref = {step: (m, s) for step, m, s in reference_curve(task.removeprefix("dmc/"), reference)}
            row.append(f"{ref[budgets[0]][0]:.1f} ± {ref[budgets[0]][1]:.1f} (n=10)" if budgets[0] in ref else "—")
        lines.append("| " + " | ".join(row) + " |")
    average = ["average"]
    for column in columns:
        values = means[column]
        average.append(f"{np.mean(values):.1f}" if len(values) == len(tasks) else f"— ({len(values)} of {len(tasks)} tasks)")
    lines.append("| " + " | ".join(average + ([""] if show_reference else [])) + " |")
    budget = ", ".join(f"{b:,}" for b in budgets)
    lines += ["", f"Budget: {budget} env steps. Cells: final return, mean ± std (population) over seeds, n = "
              "finished seeds; bold = best mean of the row; average = mean of the row means over tasks (only for "
              "a column with every task).", ""]  # fmt: skip
    return lines


def _plot_task(task: str, runs: list[Run], labels: dict[Path, str], reference: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    columns = sorted({labels[r.path] for r in runs}, key=_column_order)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fig_loss, ax_loss = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = 0
    for i, column in enumerate(columns):
        colour = colours[i % len(colours)]
        members = [r for r in runs if labels[r.path] == column]
        finished = [r for r in members if r.final_return is not None]
        if finished:
            steps = sorted(set.intersection(*[{s for s, _ in r.evals} for r in finished]))
            values = np.array([[dict(r.evals)[s] for s in steps] for r in finished])
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, color=colour, label=f"{column} (n={len(finished)})")
            ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.2)
            top = max(top, steps[-1])
            with_loss = [r for r in finished if r.losses]
            if with_loss:
                end = min(r.losses[-1][0] for r in with_loss)
                grid = np.linspace(max(r.losses[0][0] for r in with_loss), end, 100)
                curves = np.array([np.interp(grid, *zip(*r.losses)) for r in with_loss])
                ax_loss.plot(grid, curves.mean(0), color=colour, label=f"{column} (n={len(with_loss)})")
                ax_loss.fill_between(grid, curves.mean(0) - curves.std(0), curves.mean(0) + curves.std(0),
                                     color=colour, alpha=0.2)  # fmt: skip
        for run in members:
            if run.final_return is None and run.evals:  # shown, never averaged
                s, v = zip(*run.evals)
                ax.plot(s, v, color=colour, lw=0.8, ls="--", label=f"{column}, seed {run.config['seed']}: {run.outcome}")
                top = max(top, s[-1])
    ref = [r for r in reference_curve(task.removeprefix("dmc/"), reference) if r[0] <= max(top, 1)]
    if ref:
        s, m, sd = (np.array(x) for x in zip(*ref))
        ax.plot(s, m, color="k", lw=1, label="SimbaV2 reference (mean ± std, 10 seeds)")
        ax.fill_between(s, m - sd, m + sd, color="k", alpha=0.1)
    for axis, ylabel in ((ax, "eval return"), (ax_loss, "critic loss (training rows)")):
        axis.set_xlabel("env steps")
        axis.set_ylabel(ylabel)
        axis.set_title(task)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    has_loss = any(r.losses for r in runs)  # on-policy runs (PPO, GRPO) have no critic
    for figure, stem in ((fig, "curves"), (fig_loss, "critic_loss")):
        name = f"{stem}_{path_safe(task)}.png"
        if stem == "curves" or has_loss:
            figure.tight_layout()
            figure.savefig(out / name, dpi=100)
            names.append(name)
        plt.close(figure)
    return names


def write_report(root: Path, out: Path, reference: Path = REFERENCE) -> Path:
    """Read every run below `root`, write report.md and the plots into `out`; returns report.md's path.
    Raises ValueError when `root` is not a directory or holds no run."""
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory (give the folder that holds the run directories)")
    paths = find_runs(root)
    if not paths:
        raise ValueError(f"{root}: no run directory below it (a run directory holds config.yaml and metrics.csv)")
    runs = per_task([load_run(p) for p in paths])
    out.mkdir(parents=True, exist_ok=True)
    readable = [r for r in runs if r.config]
    labels = column_labels(readable)
    lines = [f"# Experiment report: {root}", "",
             f"{len(runs)} run directories: " + ", ".join(f"{sum(r.outcome == o for r in runs)} {o}"
             for o in sorted({r.outcome for r in runs})) + ".", "",  # fmt: skip
             "**Final return** = the evaluation at the end of a finished run (env_step = total_env_steps), the "
             "mean return of its `eval_episodes` deterministic episodes. Only finished runs enter the tables; "
             "every other run is listed under *Runs left out*, never averaged.", ""]  # fmt: skip
    if reference.exists():
        lines += [f"SimbaV2 reference: `{reference}` (published curves, 10 seeds, mean ± population std).", ""]
    else:
        lines += [f"SimbaV2 reference: not found at `{reference}`; no reference column or curves.", ""]
    lines += ["## Final return", ""]
    by_algo: dict[str, list[Run]] = defaultdict(list)
    for run in readable:
        by_algo[run.config["algo"]["name"]].append(run)
    for algo in sorted(by_algo):
        lines += _table(algo, by_algo[algo], labels, reference)
    lines += ["## Learning curves", ""]
    for algo in sorted(by_algo):
        for task in sorted({r.config["task"]["name"] for r in by_algo[algo]}):
            task_runs = [r for r in by_algo[algo] if r.config["task"]["name"] == task]
            curves, *loss = _plot_task(task, task_runs, labels, reference, out)
            lines += [f"### {task} ({algo})", "", f"![eval return]({curves})", *(f"![critic loss]({n})" for n in loss), ""]
    left_out = [r for r in runs if r.final_return is None]
    lines += ["## Runs left out", ""]
    if not left_out:
        lines += ["None: every run finished with a final evaluation.", ""]
    else:
        lines += ["| run | outcome | reason |", "|---|---|---|"]
        for run in left_out:
            reason = run.reason.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{run.path.relative_to(root) if run.path != root else '.'}` | {run.outcome} | {reason} |")
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fasttd3_lora.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding run directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUNS/report)")
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="SimbaV2 reference CSV")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.runs, args.out or args.runs / "report", args.reference)
    except ValueError as err:
        print(f"fasttd3-report: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_PATH)
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
