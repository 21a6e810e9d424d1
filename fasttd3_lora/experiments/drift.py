"""How the LoRA rank bounds policy drift in KL-free group-relative fine-tuning (DESIGN §10; docs/drift.md).

    python -m fasttd3_lora.experiments.drift single-layer --out DIR
        the single-layer setting (`fasttd3_lora.drift`): measured KL and ||Delta W|| against the bound, for every
        rank and full fine-tuning, Gaussian and softmax policies, alpha = rank and alpha fixed; seconds on a CPU
    python -m fasttd3_lora.experiments.drift control --out DIR --from RUN --task dmc/walker-run [--ranks ...]
        GRPO runs of the training app (`algo=grpo`, preset `experiment=drift`): every rank x seed KL-free, and the
        penalised runs (`--kl-coef`, at `--penalised-ranks`), `--jobs` at a time, into DIR/runs/<task>/, then report
    python -m fasttd3_lora.experiments.drift report --out DIR
        the table and plots of every GRPO run under DIR/runs (also what a Hydra sweep of `experiment=drift` wrote,
        copied or linked there)

Outputs in DIR: single_layer.csv / .png; drift_runs.csv (one row per run: task, rank, KL coefficient, seed, final
KL(pi_ref || pi) on the reference's states, ||Delta W||, return, update seconds), drift_table.md (mean +- std over
seeds, Spearman rho of KL against rank per task and KL coefficient) and drift_kl_vs_rank.png. Errors: one line,
exit 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from fasttd3_lora.drift import single_layer_run
from fasttd3_lora.experiments.grid import command_line, fail, run_commands

FULL = "full"
SINGLE_LAYER_RANKS = (1, 2, 4, 8, 16)
SINGLE_LAYER = {"steps": 100, "eta": 0.05, "g": 0.2, "m": 6, "n": 16}  # docs/drift.md explains the choice


# ------------------------------------------------------------------------------------------ single layer


def single_layer(out: Path, seeds: int = 3) -> list[dict[str, Any]]:
    """Every (policy, alpha convention, rank or full, seed) run of `single_layer_run`: single_layer.csv (the last
    step of each), single_layer_curves.csv (every step: what the figure is drawn from) and single_layer.png."""
    rows, curves = [], []
    for policy in ("gaussian", "softmax"):
        for convention, alpha in (("alpha=rank", None), ("alpha=4", 4.0)):
            for rank in (*SINGLE_LAYER_RANKS, None):
                if rank is None and convention != "alpha=rank":
                    continue  # full fine-tuning has no alpha
                for seed in range(seeds):
                    run = single_layer_run(policy, rank, alpha=alpha, seed=seed, **SINGLE_LAYER)
                    key = {"policy": policy, "alpha": convention if rank else "-", "rank": rank or FULL, "seed": seed}
                    curves += [{**key, "step": t, "kl_max": float(run["kl_max"][t]), "kl_bound": float(run["kl_bound"][t])}
                               for t in range(len(run["kl_max"]))]  # fmt: skip
                    rows.append({**key, "steps": SINGLE_LAYER["steps"], "kl_max": float(run["kl_max"][-1]),
                                 "kl_bound": float(run["kl_bound"][-1]), "drift": float(run["drift"][-1]),
                                 "drift_bound": float(run["drift_bound"][-1]),
                                 "bound_holds": bool((run["kl_max"] <= run["kl_bound"] * (1 + 1e-9)).all()
                                                     and (run["drift"] <= run["drift_bound"] * (1 + 1e-9)).all())})  # fmt: skip
    _write_csv(out / "single_layer.csv", rows)
    _write_csv(out / "single_layer_curves.csv", curves)
    plot_single_layer(out / "single_layer_curves.csv", out / "single_layer.png")
    return rows


def plot_single_layer(curves_csv: Path, path: Path) -> None:
    """The single-layer figure from single_layer_curves.csv: measured vs bound over updates (Gaussian, alpha = rank),
    and the final KL against the rank for both conventions and both policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, str, str, int], list[tuple[float, float]]] = defaultdict(list)
    for r in _rows(curves_csv):
        curves[(r["policy"], r["alpha"], r["rank"], int(r["seed"]))].append((float(r["kl_max"]), float(r["kl_bound"])))
    seeds = sorted({k[3] for k in curves})
    ranks = [str(r) for r in SINGLE_LAYER_RANKS]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.cm.viridis([i / len(ranks) for i in range(len(ranks))])
    ax = axes[0]
    for rank, colour in zip((*ranks, FULL), (*colours, "black")):
        kl, bound = zip(*curves[("gaussian", "alpha=rank" if rank != FULL else "-", rank, seeds[0])])
        ax.plot(kl, color=colour, label=f"{'rank ' + rank if rank != FULL else 'full'}: measured")
        ax.plot(bound, color=colour, linestyle="--")
    ax.set(yscale="log", xlabel="update", ylabel="max KL(pi_ref || pi) over states",
           title="Gaussian, alpha = rank: measured (solid) vs bound (dashed)")  # fmt: skip
    ax.legend(fontsize=7)
    for ax, policy in zip(axes[1:], ("gaussian", "softmax")):
        for convention, marker in (("alpha=rank", "o"), ("alpha=4", "s")):
            means = [statistics.mean(curves[(policy, convention, r, s)][-1][0] for s in seeds) for r in ranks]
            ax.plot(SINGLE_LAYER_RANKS, means, marker=marker, label=f"measured, {convention}")
        full = statistics.mean(curves[(policy, "-", FULL, s)][-1][0] for s in seeds)
        ax.axhline(full, color="black", linestyle=":", label="full fine-tuning")
        ax.set(xscale="log", yscale="log", xlabel="rank", ylabel=f"KL after {SINGLE_LAYER['steps']} updates",
               title=f"{policy}: KL vs rank")  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ control tasks


def control_commands(source: str, task: str, out: Path, ranks: Sequence[str], seeds: Sequence[int], kl_coef: float,
                     penalised_ranks: Sequence[str], extra: Sequence[str]) -> list[tuple[Path, list[str]]]:  # fmt: skip
    """(run directory, command line) of every GRPO run of the grid."""
    runs = [(rank, 0.0, seed) for rank in ranks for seed in seeds]
    runs += [(rank, kl_coef, seed) for rank in penalised_ranks for seed in seeds]
    commands = []
    for rank, coef, seed in runs:
        run_dir = out / "runs" / task.replace("/", "-") / f"r{rank}_kl{coef:g}_s{seed}"
        commands.append((run_dir, [sys.executable, "-m", "fasttd3_lora.train", "experiment=drift", f"task={task}",
                                   f"grpo.from={source}", f"grpo.rank={rank}", f"grpo.kl_coef={coef}", f"seed={seed}",
                                   "threads=1", *extra, f"hydra.run.dir={run_dir}"]))  # fmt: skip
    return commands


def control(out: Path, commands: list[tuple[Path, list[str]]], jobs: int) -> None:
    """Run the commands not finished yet, `jobs` at a time (`fasttd3_lora.experiments.grid`)."""
    failed = run_commands(commands, jobs)
    if failed:
        _fail(f"{len(failed)} run(s) failed, first {failed[0]} (its log beside it)")


# ------------------------------------------------------------------------------------------------ report


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _last(rows: list[dict[str, str]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key)]
    return values[-1] if values else None


def _mean_of(rows: list[dict[str, str]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key)]
    return statistics.mean(values) if values else None


def run_rows(root: Path) -> list[dict[str, Any]]:
    """One row per finished GRPO run below `root`."""
    rows = []
    for config_path in sorted(root.rglob("config.yaml")):
        run_dir = config_path.parent
        config = yaml.safe_load(config_path.read_text())
        if config.get("algo", {}).get("name") != "grpo" or not (run_dir / "metrics.csv").is_file():
            continue
        metrics = _rows(run_dir / "metrics.csv")
        algo = config["algo"]
        rows.append({
            "task": config["task"]["name"], "rank": str(algo["rank"]), "kl_coef": float(algo["kl_coef"]),
            "seed": int(config["seed"]), "env_step": int(metrics[-1]["env_step"]) if metrics else 0,
            "kl_ref": _last(metrics, "kl_ref"), "kl_ref_max": _last(metrics, "kl_ref_max"), "dW": _last(metrics, "dW"),
            "episode_return": _last(metrics, "episode_return"), "eval_return": _last(metrics, "eval_return"),
            "update_s": _mean_of(metrics, "update_s"), "run": str(run_dir),
        })  # fmt: skip
    return rows


def _rank_order(rank: str) -> float:
    return math.inf if rank == FULL else float(rank)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (no ties expected: average ranks if any)."""

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


def _pm(values: Sequence[float | None], fmt: str = ".3g") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    return f"{mean:{fmt}} ± {statistics.pstdev(values):{fmt}}" if len(values) > 1 else f"{mean:{fmt}}"


def report(out: Path) -> str:
    """drift_runs.csv, drift_table.md and drift_kl_vs_rank.png from the runs under `out/runs`; returns the table."""
    rows = run_rows(out / "runs")
    if not rows:
        _fail(f"no GRPO runs under {out / 'runs'} (run the control subcommand first)")
    _write_csv(out / "drift_runs.csv", rows)
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["kl_coef"], row["rank"])].append(row)
    lines = ["| task | KL coef | rank | seeds | env steps | KL(π_ref ‖ π) | ‖ΔW‖_F | return (last iteration) | "
             "eval return | s / update phase |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    rho_lines = []
    for task in sorted({r["task"] for r in rows}):
        for coef in sorted({r["kl_coef"] for r in rows if r["task"] == task}):
            ranks = sorted({r["rank"] for r in rows if r["task"] == task and r["kl_coef"] == coef}, key=_rank_order)
            for rank in ranks:
                g = groups[(task, coef, rank)]
                lines.append(f"| {task} | {coef:g} | {rank} | {len(g)} | {g[0]['env_step']:,} | "
                             f"{_pm([r['kl_ref'] for r in g])} | {_pm([r['dW'] for r in g])} | "
                             f"{_pm([r['episode_return'] for r in g], '.1f')} | {_pm([r['eval_return'] for r in g], '.1f')} | "
                             f"{_pm([r['update_s'] for r in g], '.2f')} |")  # fmt: skip
            if len(ranks) >= 3:
                means = [statistics.mean(r["kl_ref"] for r in groups[(task, coef, rank)]) for rank in ranks]
                rho = spearman([_rank_order(r) for r in ranks], means)
                largest = ranks[means.index(max(means))]
                rho_lines.append(f"* {task}, KL coefficient {coef:g}: Spearman ρ(rank, mean KL) = {rho:.2f} over ranks "
                                 f"{', '.join(ranks)}; largest KL at rank {largest}")  # fmt: skip
    table = "\n".join(lines + [""] + rho_lines) + "\n"
    (out / "drift_table.md").write_text(table)
    plot_control(out / "drift_runs.csv", out / "drift_kl_vs_rank.png")
    return table


def kl_points(rows: Sequence[dict[str, Any]],
              task: str) -> tuple[list[str], dict[float, list[tuple[int, float, float]]]]:  # fmt: skip
    """The task's ranks in order (one x position each) and, per KL coefficient, its points (x, mean KL, std KL over
    seeds): a coefficient run at some ranks only sits at those ranks' positions."""
    every = sorted({r["rank"] for r in rows if r["task"] == task}, key=_rank_order)
    points = {}
    for coef in sorted({r["kl_coef"] for r in rows if r["task"] == task}):
        ranks = sorted({r["rank"] for r in rows if r["task"] == task and r["kl_coef"] == coef}, key=_rank_order)
        values = [[r["kl_ref"] for r in rows if (r["task"], r["kl_coef"], r["rank"]) == (task, coef, k)] for k in ranks]
        points[coef] = [(every.index(k), statistics.mean(v), statistics.pstdev(v)) for k, v in zip(ranks, values)]
    return every, points


def plot_control(runs_csv: Path, path: Path) -> None:
    """KL(pi_ref || pi) against the rank per task and KL coefficient (mean +- std over seeds), from drift_runs.csv."""
    rows = [{**r, "kl_coef": float(r["kl_coef"]), "kl_ref": float(r["kl_ref"])} for r in _rows(runs_csv)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        every, points = kl_points(rows, task)
        for coef, series in points.items():
            xs, means, stds = zip(*series)
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"KL coefficient {coef:g}")
        ax.set_xticks(range(len(every)), every)
        ax.set(yscale="log", xlabel="rank", ylabel="KL(π_ref ‖ π) on reference states", title=task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- command line


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fail(message: str) -> NoReturn:
    fail("fasttd3-drift", message)


def _rank(text: str) -> str:
    if text == FULL or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"must be an integer >= 1 or {FULL}, got {text!r}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = command_line("fasttd3_lora.experiments.drift", "fasttd3-drift", __doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=type(parser))
    single = commands.add_parser("single-layer", help="the single-layer bound against measured drift")
    single.add_argument("--out", type=Path, required=True)
    single.add_argument("--seeds", type=int, default=3)
    grid = commands.add_parser("control", help="GRPO runs of every rank x seed, then the report")
    grid.add_argument("--out", type=Path, required=True)
    grid.add_argument("--from", dest="source", required=True, help="the run whose actor is fine-tuned")
    grid.add_argument("--task", required=True)
    grid.add_argument("--ranks", type=_rank, nargs="+", default=["1", "2", "4", "8", "16", FULL])
    grid.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    grid.add_argument("--kl-coef", type=float, default=0.1, help="the penalised runs' coefficient")
    grid.add_argument("--penalised-ranks", type=_rank, nargs="*", default=["4"])
    grid.add_argument("--jobs", type=int, default=1)
    grid.add_argument("overrides", nargs="*", help="more overrides for every run (e.g. total_env_steps=...)")
    rep = commands.add_parser("report", help="table and plots of the runs under OUT/runs")
    rep.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "single-layer":
        args.out.mkdir(parents=True, exist_ok=True)
        rows = single_layer(args.out, args.seeds)
        held = sum(r["bound_holds"] for r in rows)
        print(f"wrote {args.out / 'single_layer.csv'} and .png: the bound held at every step in {held} of {len(rows)} runs")
    elif args.command == "control":
        if not Path(args.source).exists():
            _fail(f"--from {args.source}: no such run directory or checkpoint")
        commands = control_commands(args.source, args.task, args.out, args.ranks, args.seeds, args.kl_coef,
                                    args.penalised_ranks, args.overrides)  # fmt: skip
        control(args.out, commands, args.jobs)
        print(report(args.out))
    else:
        print(report(args.out))


if __name__ == "__main__":
    main()
