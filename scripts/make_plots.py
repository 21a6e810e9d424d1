"""Redraw every README figure whose data is committed (`make plots`; README, "Results").

    python scripts/make_plots.py [--out DIR]     (default: in place, docs/...)

Each figure below is drawn from a CSV committed beside it (written by the experiment that measured it), so a plot
can be restyled or checked without rerunning anything. README figures made before their data was committed are
listed in `WITHOUT_DATA` with the reason and left as they are; tests/test_plots.py fails when a README figure is in
neither list.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from fasttd3_lora.experiments.drift import plot_control, plot_single_layer
from fasttd3_lora.experiments.library import plot_returns
from fasttd3_lora.report import plot_curves

ROOT = Path(__file__).resolve().parents[1]

# figure (relative to the repository) -> (its data, how it is drawn from it)
FIGURES: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    "docs/drift/single_layer.png": ("docs/drift/single_layer_curves.csv", plot_single_layer),
    "docs/drift/drift_kl_vs_rank.png": ("docs/drift/drift_runs.csv", plot_control),
    "docs/library/library_returns.png": ("docs/library/library_returns.csv", plot_returns),
    "docs/learning/ppo-walker-walk.png": ("docs/learning/ppo-walker-walk.csv",
                                          functools.partial(plot_curves, title="PPO on dmc/walker-walk (the library's base)")),
    "docs/learning/cpu-demo.png": ("docs/learning/cpu-demo.csv",
                                   functools.partial(plot_curves, title="make train: FastTD3 + LoRA on dmc/cartpole-swingup")),
    "docs/mappo/lorasa_vmas-het_mass.png": ("docs/mappo/lorasa_curves_vmas-het_mass.csv",
                                            functools.partial(plot_curves, title="MAPPO on vmas/het_mass: PS, NPS, LoRASA")),
    "docs/mappo/lorasa_mamujoco-HalfCheetah-2x3.png": (
        "docs/mappo/lorasa_curves_mamujoco-HalfCheetah-2x3.csv",
        functools.partial(plot_curves, title="MAPPO on mamujoco/HalfCheetah-2x3: PS, NPS, LoRASA")),
    "docs/mappo/lorasa_mamujoco-HalfCheetah-2x3-gru.png": (
        "docs/mappo/lorasa_curves_mamujoco-HalfCheetah-2x3-gru.csv",
        functools.partial(plot_curves, title="MAPPO with GRU actors on mamujoco/HalfCheetah-2x3: PS, NPS, LoRASA")),
}  # fmt: skip
# README figures drawn before this script existed, from runs whose metrics were not committed
WITHOUT_DATA = {
    "docs/chain/chain_results.png": "drawn from chain_results.csv, which was not committed (only the summary); "
                                    "python -m fasttd3_lora.experiments.chain --out DIR redraws it in ~4 min",
    "docs/learning/cheetah-run.png": "SAC runs of 2026-11-22 whose metrics.csv were not committed",
    "docs/learning/walker-walk.png": "SAC runs of 2026-11-22 whose metrics.csv were not committed",
    "docs/results/dmc_cpu_small/curves_dmc-cartpole-balance.png": "the sweep's run directories were not committed",
    "docs/learning/fasttd3-cartpole-swingup.png": "FastTD3 runs of 2026-12-03 whose metrics.csv were not committed",
    "docs/learning/fasttd3-walker-stand.png": "FastTD3 runs of 2026-12-03 whose metrics.csv were not committed",
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the figures here instead of in place")
    args = parser.parse_args()
    missing = [data for data, _ in FIGURES.values() if not (ROOT / data).is_file()]
    if missing:
        print(f"make_plots: no data file {missing[0]} (commit it with its figure)", file=sys.stderr)
        sys.exit(2)
    for figure, (data, draw) in FIGURES.items():
        target = (args.out or ROOT) / figure
        target.parent.mkdir(parents=True, exist_ok=True)
        draw(ROOT / data, target)
        print(f"redrew {figure} from {data}")
    for figure, why in WITHOUT_DATA.items():
        if args.out is not None and (ROOT / figure).is_file():
            (args.out / figure).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / figure, args.out / figure)
        print(f"kept {figure}: {why}")


if __name__ == "__main__":
    main()
