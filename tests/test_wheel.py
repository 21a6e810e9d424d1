"""The wheel users get (`pip install .`; the Docker image builds it from its wheel stage's COPY list) holds every module and config of the source tree, and
trains from a non-editable install: a tiny SAC and a tiny FastTD3 run with nothing of the repository on the
path (the editable install's import hook is not loaded: `python -S`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import dockerfile
import pytest

from tiny_runs import SMALL_NETS

ROOT = Path(__file__).resolve().parents[1]
# where each source folder lands inside the installed package
SOURCES = {"fasttd3_lora": "fasttd3_lora", "kernels": "fasttd3_lora/kernels", "tasks": "fasttd3_lora/tasks",
           "configs": "fasttd3_lora/configs"}  # fmt: skip

pytestmark = pytest.mark.slow


def _wheel_stage_copies() -> list[tuple[str, str]]:
    """(source, destination in the build folder) of every COPY of the Dockerfile's wheel stage."""
    copies, stage = [], None
    for c in dockerfile.parse_file(str(ROOT / "docker" / "Dockerfile")):
        if c.cmd.upper() == "FROM":
            stage = c.value[-1]
        elif c.cmd.upper() == "COPY" and stage == "wheel":
            *sources, dest = c.value
            copies += [(src, f"{dest.rstrip('/')}/{Path(src).name}" if dest.endswith("/") else dest) for src in sources]
    return copies


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the built wheel, the folder it is installed into, non-editable)."""
    out = tmp_path_factory.mktemp("wheel")
    # Built from exactly what the image's wheel stage copies (docker/Dockerfile), into a clean folder: setuptools
    # would reuse a stale build/ of the working tree and hide a missing package.
    source = out / "source"
    for src, dest in _wheel_stage_copies():
        target = source / dest
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / src, target)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(out / "dist"), str(source)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (out / "dist").glob("fasttd3_lora-*.whl")
    site = out / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return wheel, site


def test_the_wheel_holds_every_module_and_config_of_the_source_tree(installed) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, target in SOURCES.items()
        for pattern in ("*.py", "*.yaml")
        for path in (ROOT / folder).rglob(pattern)
        if "__pycache__" not in path.parts and not (folder == "fasttd3_lora" and path.is_relative_to(ROOT / folder / "kernels"))
    }
    assert "fasttd3_lora/loops/kit.py" in expected and "fasttd3_lora/configs/algo/sac.yaml" in expected
    assert sorted(expected - names) == []


@pytest.mark.parametrize(
    "overrides",
    [
        ["task=dmc/cartpole-balance", "task.max_episode_steps=50", "algo.batch_size=32", "algo.buffer_size=400",
         "algo.learning_starts=25", "total_env_steps=200"],
        ["algo=fasttd3", "task=dmc/cartpole-swingup", "task.max_episode_steps=25", "algo.num_envs=4",
         "algo.batch_size=32", "algo.buffer_size=64", "algo.n_step=3", "algo.updates_per_step=2",
         "total_env_steps=200"],
    ],
    ids=["sac", "fasttd3"],
)
def test_a_non_editable_install_trains(installed, tmp_path: Path, overrides: list[str]) -> None:
    _, site = installed
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}  # torch & co., not this package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sorted(deps)]), "OMP_NUM_THREADS": "1",
           "MUJOCO_GL": "disabled"}  # fmt: skip
    where = subprocess.run([sys.executable, "-S", "-c", "import fasttd3_lora.loops.kit as k; print(k.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(site)  # the installed copy, not the source tree
    run = subprocess.run(
        [sys.executable, "-S", "-m", "fasttd3_lora.train", *overrides, *SMALL_NETS, "eval_every=100",
         "checkpoint_every=100", "eval_episodes=2", "threads=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: env_step 200" in run.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").is_file()
