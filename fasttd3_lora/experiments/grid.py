"""What the experiment modules share: running their training runs (each a command line of the app writing one run
directory, those already finished skipped, `jobs` at a time, each logging beside its directory as `<run dir>.log`)
and their command lines' one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

__all__ = ["EXIT_ERROR", "finished", "run_commands", "fail", "command_line"]

EXIT_ERROR = 2


def finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return status.is_file() and '"finished"' in status.read_text()


def run_commands(commands: list[tuple[Path, list[str]]], jobs: int) -> list[Path]:
    """Run the (run directory, command line) pairs not finished yet; returns the directories whose run failed."""
    todo = [(d, c) for d, c in commands if not finished(d)]
    print(f"{len(commands) - len(todo)} of {len(commands)} runs already finished; running {len(todo)}", flush=True)

    def one(item: tuple[Path, list[str]]) -> tuple[Path, int]:
        run_dir, command = item
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{run_dir.name}.log"
        with open(log, "w") as f:  # one torch thread per run: `jobs` runs share the cores
            code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT,
                                   env={**os.environ, "MUJOCO_GL": "disabled", "OMP_NUM_THREADS": "1"})  # fmt: skip
        print(f"{'done' if code == 0 else f'FAILED ({code})'}: {run_dir} (log {log})", flush=True)
        return run_dir, code

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [d for d, code in pool.map(one, todo) if code != 0]


def fail(name: str, message: str) -> NoReturn:
    """One line on stderr, `<name>: <message>`, then exit 2."""
    print(f"{name}: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_ERROR)


def command_line(module: str, name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser for `python -m <module>` (its subcommands' parsers alike) whose usage errors are one line
    naming --help, reported as `name`, exit 2."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            fail(name, f"{message} (python -m {module} --help)")

    return Parser(prog=f"python -m {module}", description=description)
