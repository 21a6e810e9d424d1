"""What a run reports: metrics.csv, TensorBoard events, optional wandb, and the progress display.

One `RunLogger.log(env_step, wall_time, metrics)` call writes a row to every sink; the keys are the CSV columns,
the TensorBoard tags and the wandb keys alike. A resumed run drops what the crashed run wrote after its
checkpoint (CSV rows and TensorBoard events past that step), so each step appears once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from fasttd3_lora.checkpoint import atomic_write

__all__ = ["MetricsCSV", "RunLogger", "Progress", "format_duration"]

METRICS_FILE = "metrics.csv"
FIRST_COLUMNS = ("env_step", "wall_time")


class MetricsCSV:
    """Append-only CSV whose header grows when a row brings a new key (the file is rewritten then, atomically).

    Rows are flushed as written, so a killed run keeps every row it logged. `keep_until` drops rows with
    `env_step` beyond it (the part of a crashed run that its resume repeats)."""

    def __init__(self, path: str | Path, *, keep_until: int | None = None) -> None:
        self.path = Path(path)
        self.columns: list[str] = list(FIRST_COLUMNS)
        rows: list[dict[str, str]] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or FIRST_COLUMNS)
                rows = list(reader)
        if keep_until is not None:
            kept = [r for r in rows if r.get("env_step") and int(r["env_step"]) <= keep_until]
            if len(kept) != len(rows) or not self.path.is_file():
                self._rewrite(kept)
        elif not self.path.is_file():
            self._rewrite([])
        self._file: IO[str] = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)

    def _rewrite(self, rows: list[Mapping[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, lambda f: f.write(buffer.getvalue().encode()))

    def write(self, row: Mapping[str, Any]) -> None:
        new = [key for key in row if key not in self.columns]
        if new:
            self._file.close()
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            self._rewrite(rows)
            self._file = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class RunLogger:
    """metrics.csv and TensorBoard events in `run_dir`, plus a wandb run when `wandb` settings are given.

    `wandb`: {"project", "entity", "mode"}; mode "offline" (the default config) writes `run_dir/wandb/offline-run-*`
    with no account and no network (`wandb sync` uploads it later). A `WANDB_MODE` environment variable, when
    set, wins over the config, as wandb's own convention. `resumed_at` is the env step of the checkpoint a resumed
    run continues from (0 included: a run killed before its first periodic checkpoint resumes from its first),
    None for a new run."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        config: Mapping[str, Any],
        wandb: Mapping[str, Any] | None = None,
        resumed_at: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.csv = MetricsCSV(self.run_dir / METRICS_FILE, keep_until=resumed_at)
        # purge_step hides the events the crashed run wrote after the checkpoint (TensorBoard's resume mechanism).
        self.tb = SummaryWriter(log_dir=str(self.run_dir), purge_step=None if resumed_at is None else resumed_at + 1)
        self.wandb_run = None if wandb is None else _start_wandb(self.run_dir, config, wandb)

    def log(self, env_step: int, wall_time: float, metrics: Mapping[str, float]) -> None:
        self.csv.write({"env_step": env_step, "wall_time": round(wall_time, 3), **metrics})
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, global_step=env_step)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=env_step)

    def log_video(self, env_step: int, tag: str, frames: Sequence[np.ndarray], fps: float, path: Path) -> None:
        """An episode's frames: `path` (mp4), TensorBoard (an animated GIF under `tag`) and wandb (the mp4)."""
        from fasttd3_lora.video import gif_summary, write_mp4

        write_mp4(path, frames, fps)
        self.tb._get_file_writer().add_summary(gif_summary(tag, frames, fps), global_step=env_step)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({tag: wandb.Video(str(path), fps=int(round(fps)), format="mp4")}, step=env_step)

    def close(self) -> None:
        self.csv.close()
        self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(run_dir: Path, config: Mapping[str, Any], settings: Mapping[str, Any]) -> Any:
    os.environ.setdefault("WANDB_SILENT", "true")  # no banners, no prompts in offline mode
    import wandb  # optional dependency (the `wandb` extra): imported only when asked for

    # One wandb id per run directory, so a resumed run continues the same wandb run.
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(
        project=settings["project"],
        entity=settings.get("entity"),
        mode=os.environ.get("WANDB_MODE", settings["mode"]),
        dir=str(run_dir),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        config=dict(config),
        settings=wandb.Settings(console="off"),  # leave stdout to the progress bar
    )


def format_duration(seconds: float) -> str:
    """`3725` -> `1:02:05` (the ETA in log lines)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A live tqdm bar (env steps, SPS, ETA, last eval return) on a terminal; periodic log lines otherwise
    (a log file, a CI job, `nohup`), every `interval_s` seconds and after each evaluation.

    SPS is measured here, over the last `interval_s` (2 s for the bar), so it includes evaluation and checkpoint
    time. The ETA of the log lines is the learning phase's own rate, measured from `learning_from` (the env step
    where updates start) over the whole phase so far: a random warm-up runs ~50x faster than learning, and a rate
    over the last interval swings with every evaluation. Before the phase it says "after warm-up". `clock` is for
    tests."""

    BAR_INTERVAL_S = 2.0

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        stream: IO[str] | None = None,
        interval_s: float = 30.0,
        learning_from: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.stream, self.clock = total, stream or sys.stdout, clock
        self.env_step, self.sps, self.eval_return = initial, math.nan, None
        self._mark_step, self._mark_time, self._line_step = initial, clock(), None
        self.learning_from = learning_from
        # (env step, time) where the learning phase's rate is measured from; None during the warm-up
        self._phase: tuple[int, float] | None = (initial, self._mark_time) if initial >= learning_from else None
        is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = min(interval_s, self.BAR_INTERVAL_S) if is_tty else interval_s
        self.bar = (
            tqdm(total=total, initial=initial, file=self.stream, unit="step", unit_scale=True, dynamic_ncols=True)
            if is_tty
            else None
        )

    def update(self, env_step: int, *, eval_return: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(env_step - self.env_step)
        self.env_step = env_step
        if eval_return is not None:
            self.eval_return = eval_return
        now = self.clock()
        if self._phase is None and env_step >= self.learning_from:
            self._phase = (env_step, now)
        if now - self._mark_time >= self.interval_s:
            self.sps = (env_step - self._mark_step) / (now - self._mark_time)
            self._mark_step, self._mark_time = env_step, now
        elif eval_return is None:
            return
        if self.bar is not None:
            postfix = {"SPS": f"{self.sps:.0f}"}
            if self.eval_return is not None:
                postfix["eval"] = f"{self.eval_return:.1f}"
            self.bar.set_postfix(postfix, refresh=False)
        else:
            self._line(env_step)

    def _line(self, env_step: int) -> None:
        self._line_step = env_step
        sps = "? SPS" if math.isnan(self.sps) else f"{self.sps:.0f} SPS"  # nothing measured yet (a resumed eval)
        text = f"env_step {env_step}/{self.total} ({100.0 * env_step / self.total:.1f}%) | {sps} | ETA {self._eta(env_step)}"
        if self.eval_return is not None:
            text += f" | eval return {self.eval_return:.1f}"
        print(text, file=self.stream, flush=True)

    def _eta(self, env_step: int) -> str:
        if self._phase is None:
            return "after warm-up"
        start_step, start_time = self._phase
        elapsed = self.clock() - start_time
        if env_step <= start_step or elapsed <= 0:
            return "?"
        return format_duration((self.total - env_step) * elapsed / (env_step - start_step))

    def write(self, message: str) -> None:
        """A message that does not tear the bar."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self._line_step != self.env_step:
            self._line(self.env_step)
