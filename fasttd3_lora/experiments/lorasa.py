"""Shared, separate and LoRASA policies at equal total env steps (docs/mappo.md).

    python -m fasttd3_lora.experiments.lorasa run --out DIR --task vmas/het_mass --steps 307200 [--seeds 0 1 2]
        for every seed: MAPPO with policy=shared (PS) and policy=separate (NPS) for --steps env steps, then LoRASA
        (policy=lorasa) from the PS run's checkpoint at --steps / 2 for the other half; runs in
        DIR/runs/<task>/<mode>_s<seed>, `--jobs` at a time; then the report
    python -m fasttd3_lora.experiments.lorasa report --out DIR
        lorasa_table.md (per task and mode: trainable actor numbers, the eval return at the end, mean +- std over
        seeds, and PS's at the half where LoRASA starts), lorasa_curves.csv and lorasa_<task>.png (mean eval
        return over seeds against total env steps, LoRASA's shifted by its phase 1)

The half must be an evaluation and checkpoint step of the task's preset (`eval_every`, `checkpoint_every`):
refused in one line otherwise. Errors: one line, exit 2.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.config import ConfigError, compose_config
from fasttd3_lora.experiments.grid import command_line, fail, run_commands
from fasttd3_lora.report import load_run, plot_curves, write_curves

MODES = ("shared", "separate", "lorasa")
LABELS = {"shared": "PS (shared)", "separate": "NPS (separate)", "lorasa": "LoRASA (from PS at the half)"}


def _run_dir(out: Path, task: str, mode: str, seed: int) -> Path:
    return out / "runs" / task.replace("/", "-") / f"{mode}_s{seed}"


def commands(out: Path, task: str, steps: int, seeds: Sequence[int],
             overrides: Sequence[str]) -> tuple[list[tuple[Path, list[str]]], list[tuple[Path, list[str]]]]:  # fmt: skip
    """(phase 1: PS and NPS runs, phase 2: LoRASA runs) as (run directory, command line)."""
    cfg = compose_config(["algo=mappo", f"task={task}", *overrides])
    half = steps // 2
    if steps % 2 or half % cfg.eval_every or half % cfg.checkpoint_every:
        raise ConfigError(f"--steps {steps}: its half must be a multiple of eval_every ({cfg.eval_every}) and "
                          f"checkpoint_every ({cfg.checkpoint_every}) for {task}, where LoRASA starts")  # fmt: skip
    app = [sys.executable, "-m", "fasttd3_lora.train", "algo=mappo", f"task={task}", "threads=1", *overrides]
    first, second = [], []
    for seed in seeds:
        for mode in ("shared", "separate"):
            run = _run_dir(out, task, mode, seed)
            first.append((run, [*app, f"policy={mode}", f"seed={seed}", f"total_env_steps={steps}",
                                "keep_eval_checkpoints=true", f"hydra.run.dir={run}"]))  # fmt: skip
        source = _run_dir(out, task, "shared", seed) / "checkpoints" / f"step_{half}.pt"
        run = _run_dir(out, task, "lorasa", seed)
        second.append((run, [*app, "policy=lorasa", f"policy.from={source}", f"seed={seed}", f"total_env_steps={half}",
                             f"hydra.run.dir={run}"]))  # fmt: skip
    return first, second


def _trainable(checkpoint: Path) -> int:
    """Trainable actor numbers of a run: LoRASA's adapters and log-std, else the whole actor."""
    actor = load_checkpoint(checkpoint)["agent"]["actor"]
    adapted = [k for k in actor if ".lora_" in k]
    return sum(actor[k].numel() for k in (adapted + ["log_std"] if adapted else list(actor)))


def _pm(values: Sequence[float]) -> str:
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f} (n={len(values)})"


def report(out: Path) -> str:
    """Write the table, curves and figures of every run under OUT/runs (module docstring); returns the table."""
    runs = defaultdict(list)  # (task, mode) -> runs
    for path in sorted((out / "runs").glob("*/*_s*")):
        if path.is_dir() and (path / "metrics.csv").is_file():
            run = load_run(path)
            runs[(run.config["task"]["name"], run.config["policy"]["mode"])].append(run)
    if not runs:
        raise ConfigError(f"--out {out}: no MAPPO runs under {out / 'runs'}")
    lines = ["| task | policy | trainable actor numbers | eval return at the end | at the half |", "|---|---|---:|---:|---:|"]
    curves: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(dict)
    for task in sorted({t for t, _ in runs}):
        ps_total = max((r.total for r in runs.get((task, "shared"), []) if r.total), default=None)
        for mode in MODES:
            members = [r for r in runs.get((task, mode), []) if r.final_return is not None]
            if not members:
                continue
            offset = ps_total - members[0].total if mode == "lorasa" and ps_total else 0
            half = [v for r in members for s, v in r.evals if s + offset == (ps_total or 0) // 2]
            numbers = _trainable(members[0].path / "checkpoints" / "latest.pt")
            lines.append(f"| {task} | {LABELS[mode]} | {numbers:,} | {_pm([r.final_return for r in members])} | "
                         f"{_pm(half) if half and mode != 'lorasa' else ''} |")  # fmt: skip
            by_step = defaultdict(list)
            for r in members:
                for step, value in r.evals:
                    by_step[step + offset].append(value)
            curves[task][LABELS[mode]] = [(s, statistics.fmean(v)) for s, v in sorted(by_step.items())]
    table = "\n".join(lines) + ("\n\nEval return: deterministic episodes, the team return (the agents' mean); mean ± "
                                "std (population) over seeds; LoRASA's runs count their phase 1 (PS to the half).\n")  # fmt: skip
    (out / "lorasa_table.md").write_text(table)
    for task, by_label in curves.items():
        name = task.replace("/", "-")
        write_curves(out / f"lorasa_curves_{name}.csv", by_label)
        plot_curves(out / f"lorasa_curves_{name}.csv", out / f"lorasa_{name}.png", f"MAPPO on {task}: PS, NPS, LoRASA")
    return table


def _fail(message: str) -> NoReturn:
    fail("fasttd3-lorasa", message)


def main(argv: Sequence[str] | None = None) -> None:
    parser = command_line("fasttd3_lora.experiments.lorasa", "fasttd3-lorasa", __doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=type(parser))
    run = sub.add_parser("run", help="PS, NPS and LoRASA runs of every seed, then the report")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--task", required=True)
    run.add_argument("--steps", type=int, required=True, help="total env steps of every method")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("overrides", nargs="*", help="more overrides for every run (e.g. policy.rank=4)")
    rep = sub.add_parser("report", help="the table and curves of the runs under OUT/runs")
    rep.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "run":
            for phase in commands(args.out, args.task, args.steps, args.seeds, args.overrides):
                failed = run_commands(phase, args.jobs)
                if failed:
                    _fail(f"{len(failed)} run(s) failed, first {failed[0]} (its log beside it)")
        print(report(args.out))
    except ConfigError as err:
        _fail(str(err))


if __name__ == "__main__":
    main()
