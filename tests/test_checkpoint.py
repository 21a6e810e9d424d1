"""Checkpoints: atomic writes, weights_only loads with one-line errors, exact RNG round trips, non-finite search."""

from __future__ import annotations

import pickle
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora.checkpoint import (
    FORMAT,
    CheckpointError,
    atomic_write,
    capture_rng,
    copy_checkpoint,
    find_nonfinite,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng,
    run_dir_of,
    save_checkpoint,
)


def _draws(generator: torch.Generator) -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        float(np.random.randn()),
        torch.rand(3),
        torch.randint(0, 1000, (4,), generator=generator),
    )


def test_rng_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's legacy state: it must survive too
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng(generator)})
    expected = _draws(generator)
    _draws(generator)  # move every stream on
    restore_rng(load_checkpoint(tmp_path / "c.pt")["rng"], generator)
    again = _draws(generator)
    assert again[:3] == expected[:3]
    assert torch.equal(again[3], expected[3]) and torch.equal(again[4], expected[4])


def test_save_load_keeps_nested_state_and_tags_the_format(tmp_path: Path) -> None:
    state = {"agent": {"w": torch.randn(3, 4), "opt": {"state": {0: {"step": torch.tensor(5.0)}}}}, "meta": {"env_step": 12}}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["format"] == FORMAT and loaded["meta"] == {"env_step": 12}
    assert torch.equal(loaded["agent"]["w"], state["agent"]["w"])
    assert torch.equal(loaded["agent"]["opt"]["state"][0]["step"], torch.tensor(5.0))
    lazy = load_checkpoint(tmp_path / "c.pt", mmap=True)
    assert torch.equal(lazy["agent"]["w"], state["agent"]["w"])


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "latest.pt"
    save_checkpoint(target, {"meta": {"env_step": 1}})

    def crash(f) -> None:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert load_checkpoint(target)["meta"] == {"env_step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_copy_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "a.pt", {"meta": {"env_step": 3}})
    copy_checkpoint(tmp_path / "a.pt", tmp_path / "sub" / "b.pt")
    assert load_checkpoint(tmp_path / "sub" / "b.pt")["meta"] == {"env_step": 3}


def _write_bad(path: Path, kind: str) -> None:
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        save_checkpoint(path, {"w": torch.randn(1000)})
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "pickled_object":  # arbitrary Python objects must not load
        torch.save({"format": FORMAT, "version": 1, "x": Fraction(1, 2)}, path)
    elif kind == "foreign":  # a valid torch file that is not ours
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"a": 1}))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("garbage", "cannot be read (corrupt, truncated or not a torch file)"),
        ("empty", "cannot be read"),
        ("truncated", "cannot be read (corrupt, truncated or not a torch file)"),
        ("pickled_object", "fractions.Fraction, that a weights_only load refuses"),
        ("foreign", "not a fasttd3-lora-checkpoint file"),
        ("plain_pickle", "cannot be read"),
    ],
)
def test_bad_files_give_one_line_naming_the_file(tmp_path: Path, kind: str, reason: str) -> None:
    path = tmp_path / f"{kind}.pt"
    _write_bad(path, kind)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and reason in message


def test_resolve_checkpoint_accepts_a_run_dir_or_a_file(tmp_path: Path) -> None:
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    save_checkpoint(latest, {})
    assert resolve_checkpoint(tmp_path / "run") == latest
    assert resolve_checkpoint(latest) == latest
    assert run_dir_of(latest) == (tmp_path / "run").resolve()
    assert run_dir_of(tmp_path / "loose.pt") is None
    with pytest.raises(CheckpointError, match="has no checkpoints/latest.pt"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such run directory or checkpoint file"):
        resolve_checkpoint(tmp_path / "nope")


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    where=st.integers(0, 3),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf"), None]),
)
def test_find_nonfinite_names_the_first_bad_tensor(sizes: list[int], where: int, bad: float | None) -> None:
    tensors = [torch.randn(n) for n in sizes]
    where = where % len(sizes)
    if bad is not None:
        tensors[where][-1] = bad
    tree = {"agent": {"nets": tensors, "steps": torch.arange(3)}, "meta": {"note": "x"}}
    assert find_nonfinite(tree) == (None if bad is None else f"agent.nets.{where}")
