"""`make plots` (scripts/make_plots.py): every figure the README shows is either redrawn from committed data or
listed with the reason it cannot be, and the redrawing works from the committed files alone."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_plots", ROOT / "scripts" / "make_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_readme_figure_is_redrawn_or_explained():
    plots = _script()
    shown = set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (ROOT / "README.md").read_text()))
    assert shown, "the README shows no figure?"
    unaccounted = shown - set(plots.FIGURES) - set(plots.WITHOUT_DATA)
    assert not unaccounted, f"README figures with neither data nor a reason: {sorted(unaccounted)}"
    assert not set(plots.FIGURES) & set(plots.WITHOUT_DATA)
    for figure, (data, _) in plots.FIGURES.items():
        assert (ROOT / data).is_file(), f"{figure}: its data {data} is not committed"


def test_make_plots_redraws_every_figure_from_its_data(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_plots.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    plots = _script()
    for figure in plots.FIGURES:
        drawn = tmp_path / figure
        assert drawn.is_file() and drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert proc.stdout.count("redrew ") == len(plots.FIGURES)
