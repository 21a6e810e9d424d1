"""Checkpoints: atomic writes, `weights_only` loads, RNG capture, and finding what to resume from.

A checkpoint is a plain nested dict of tensors, numbers, strings, lists and dicts, so `torch.load(...,
weights_only=True)` reads it (a file a user hands us is never unpickled with arbitrary globals). It is written to
a temporary file in the target's directory, fsynced, then `os.replace`d over the target: a crash or SIGKILL
leaves either the old checkpoint or the new one, never half of one. What the training loop puts inside is
described in docs/training.md ("Checkpoints").
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "atomic_write",
    "save_checkpoint",
    "copy_checkpoint",
    "load_checkpoint",
    "load_tagged",
    "resolve_checkpoint",
    "run_dir_of",
    "capture_rng",
    "restore_rng",
    "find_nonfinite",
]

FORMAT = "fasttd3-lora-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself lives in the directory: fsync it too, or a power cut may forget it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write `state` (plain containers and tensors) atomically, tagged with `FORMAT` and `VERSION`."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Atomic copy (a kept per-evaluation checkpoint is a copy of latest.pt, not a second serialisation)."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` onto the CPU.

    `mmap=True` maps tensors lazily (reading only the metadata of a checkpoint with a large replay buffer is
    cheap). A missing, corrupt or foreign file raises `CheckpointError` with one line."""
    return load_tagged(path, FORMAT, "checkpoint", "a checkpoint written by fasttd3_lora.train", mmap=mmap)


def load_tagged(path: str | Path, fmt: str, what: str, writer: str, *, mmap: bool = False) -> dict[str, Any]:
    """Load a file `torch.save`d as `{"format": fmt, "version": VERSION, ...}` with `weights_only=True` onto the
    CPU (checkpoints; a policy library's tensor files). A missing, corrupt or foreign file (one whose format is not
    `fmt`: `writer` says what writes them) raises `CheckpointError` with one line naming it as `what`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by what is wrong
        raise CheckpointError(f"{what} {path}: cannot be read ({_load_failure(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise CheckpointError(f"{what} {path}: not a {fmt} file ({writer})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{what} {path}: version {state.get('version')!r}, this code reads version {VERSION}")
    return state


def _load_failure(exc: Exception) -> str:
    """One phrase for torch.load's multi-paragraph errors."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if refused:
        return f"it holds a Python object, {refused.group(1)}, that a weights_only load refuses"
    return "corrupt, truncated or not a torch file"


def resolve_checkpoint(resume: str | Path, key: str = "resume") -> Path:
    """The checkpoint a run directory (its checkpoints/latest.pt) or a checkpoint file names; `key` is the option
    that named it (`resume`, `grpo.from`, `policy.from`, ...), for the error."""
    path = Path(resume).expanduser()
    if path.is_dir():
        latest = path / CHECKPOINT_DIR / LATEST
        if not latest.is_file():
            raise CheckpointError(f"{key}={resume}: the directory has no {CHECKPOINT_DIR}/{LATEST}")
        return latest
    if not path.is_file():
        raise CheckpointError(f"{key}={resume}: no such run directory or checkpoint file")
    return path


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/x.pt`), or None for a loose file."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == CHECKPOINT_DIR else None


# ----------------------------------------------------------------------------------------------------- RNG


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) and `generator` states as plain tensors and lists."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], generator: torch.Generator) -> None:
    """Inverse of `capture_rng`."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- guards


def find_nonfinite(tree: Any, prefix: str = "") -> str | None:
    """The dotted path of the first floating tensor holding a NaN or an infinity in a nested state, or None."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return prefix or "<tensor>"
        return None
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = find_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None
