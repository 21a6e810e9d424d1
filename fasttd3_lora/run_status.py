"""The durable outcome of a training run: `<run dir>/status.json`, written atomically when `train` returns or
raises, removed when a run (or a resume of it) starts (docs/training.md, "The run directory").

    {"outcome": "finished", "message": "", "env_step": 1000000}

Outcomes: `finished` (the loop reached total_env_steps), `stopped` (the non-finite guard; the message names
the quantity and step), `interrupted` (Ctrl-C / SIGINT), `error` (a bad config or checkpoint), `crashed` (any
other exception; the message is its type and text). No file means the run is in progress, or died without a
word (SIGKILL, out of memory, a node lost): the report tells those apart by how stale metrics.csv is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fasttd3_lora.checkpoint import atomic_write

__all__ = ["STATUS_FILE", "OUTCOMES", "write_status", "read_status", "recording_outcome"]

STATUS_FILE = "status.json"
OUTCOMES = ("finished", "stopped", "interrupted", "error", "crashed")


def write_status(run_dir: str | Path, outcome: str, message: str = "", env_step: int | None = None) -> None:
    """Write `status.json` atomically (a reader sees the old file or the new one, never a torn one)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome={outcome!r}: allowed one of {', '.join(OUTCOMES)}")
    record = {"outcome": outcome, "message": message, "env_step": env_step}
    atomic_write(Path(run_dir) / STATUS_FILE, lambda f: f.write(json.dumps(record).encode()))


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's status record, or None when it has none; a file that is not a status record raises ValueError."""
    path = Path(run_dir) / STATUS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a status record ({err})") from None
    if not isinstance(record, dict) or record.get("outcome") not in OUTCOMES:
        raise ValueError(f"{path}: not a status record (outcome must be one of {', '.join(OUTCOMES)})")
    return record


@contextmanager
def recording_outcome(run_dir: str | Path, stopped: type[BaseException], error: tuple[type[BaseException], ...]) -> Iterator[dict[str, Any]]:
    """Around a run: clear the old status, then record how the body ended. The body puts the final env_step in
    the yielded dict; exceptions of type `stopped` / `error` are recorded as such, then re-raised."""
    path = Path(run_dir) / STATUS_FILE
    path.unlink(missing_ok=True)  # a resumed run is in progress again until it ends
    result: dict[str, Any] = {}
    try:
        yield result
    except stopped as err:
        write_status(run_dir, "stopped", str(err))
        raise
    except KeyboardInterrupt as err:
        write_status(run_dir, "interrupted", str(err))
        raise
    except error as err:
        write_status(run_dir, "error", str(err))
        raise
    except Exception as err:
        write_status(run_dir, "crashed", f"{type(err).__name__}: {err}")
        raise
    write_status(run_dir, "finished", env_step=result.get("env_step"))
