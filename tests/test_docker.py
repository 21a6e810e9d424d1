"""Static checks of the Docker workstation files (no Docker daemon here).

compose.yaml is validated against the Compose Specification's JSON schema as vendored by the
``check-jsonschema`` package (dev extra); the Dockerfile is parsed with BuildKit's own parser (the
``dockerfile`` package); docker/python.sh is run for real against stub interpreters.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

dockerfile = pytest.importorskip("dockerfile", reason="dev extra: dockerfile (BuildKit's parser)")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SHIM = ROOT / "docker" / "python.sh"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    pytest.importorskip("check_jsonschema", reason="dev extra: check-jsonschema ships compose-spec.json")
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    assert schema["title"] == "Compose Specification"
    return schema


@pytest.fixture(scope="module")
def commands() -> tuple:
    return dockerfile.parse_file(str(DOCKERFILE))


def _stages(commands) -> dict[str, list]:
    """Stage name -> its instructions (FROM included)."""
    stages: dict[str, list] = {}
    current = None
    for c in commands:
        if c.cmd.upper() == "FROM":
            assert len(c.value) == 3 and c.value[1].upper() == "AS", f"unnamed stage: {c.original}"
            current = c.value[2]
            stages[current] = []
        if current is not None:
            stages[current].append(c)
    return stages


def _global_args(commands) -> dict[str, str | None]:
    """ARGs declared before the first FROM (the ones a FROM line may use), with their defaults."""
    out: dict[str, str | None] = {}
    for c in commands:
        if c.cmd.upper() == "FROM":
            break
        if c.cmd.upper() == "ARG":
            name, _, default = c.value[0].partition("=")
            out[name] = default or None
    return out


def _all_args(commands) -> set[str]:
    return {c.value[0].partition("=")[0] for c in commands if c.cmd.upper() == "ARG"}


# --- compose.yaml -------------------------------------------------------------------------------


def test_compose_validates_against_compose_spec_schema(compose, compose_schema):
    validator = jsonschema.Draft202012Validator(compose_schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_schema_rejects_a_broken_compose_file(compose, compose_schema):
    # Negative control: the schema really constrains services (a typo'd key and a bad GPU count fail).
    validator = jsonschema.Draft202012Validator(compose_schema)
    typo = copy.deepcopy(compose)
    typo["services"]["train"]["entrypiont"] = typo["services"]["train"].pop("entrypoint")
    assert list(validator.iter_errors(typo))
    bad_gpu = copy.deepcopy(compose)
    bad_gpu["services"]["train"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = [1]
    assert list(validator.iter_errors(bad_gpu))


def test_compose_has_train_and_export_built_from_a_dockerfile_stage(compose, commands):
    services = compose["services"]
    assert {"train", "export"} <= set(services)
    stages = _stages(commands)
    declared_args = _all_args(commands)
    for name in ("train", "export"):
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages
        assert set(build["args"]) <= declared_args, f"{name}: build args the Dockerfile does not declare"
    assert services["train"]["image"] == services["export"]["image"]


def test_train_entrypoint_is_the_hydra_app_so_overrides_pass_through(compose, commands):
    train = compose["services"]["train"]
    assert train["entrypoint"] == ["fasttd3-python", "-m", "fasttd3_lora.train"]
    # `docker compose run --rm train task=X` replaces `command`; with an empty default the container's
    # argv is exactly entrypoint + overrides (a shell-form entrypoint would swallow them).
    assert train["command"] == []
    runtime_entry = [c for c in _stages(commands)["runtime"] if c.cmd.upper() == "ENTRYPOINT"]
    assert runtime_entry and runtime_entry[-1].json and list(runtime_entry[-1].value) == train["entrypoint"]
    export = compose["services"]["export"]
    assert export["entrypoint"] == ["fasttd3-python", "-m", "fasttd3_lora.export"]


def test_train_reserves_gpus_and_sets_isaac_sim_environment(compose):
    train = compose["services"]["train"]
    (device,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == "all"
    env = train["environment"]
    assert env["ACCEPT_EULA"].endswith("Y}") and env["PRIVACY_CONSENT"].endswith("Y}")
    assert env["HEADLESS"] == "1"
    wandb = {k: v for k, v in env.items() if k.startswith("WANDB_")}
    # A key without a value is passed through from the host (and stays unset when the host has none).
    assert {"WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY"} <= set(wandb)
    assert all(v is None for v in wandb.values())


def test_isaac_sim_caches_are_named_volumes_and_runs_are_bound_to_the_host(compose, commands):
    train = compose["services"]["train"]
    named = [v for v in train["volumes"] if v["type"] == "volume"]
    targets = {v["target"] for v in named}
    for cache in ("/kit/cache", "/.cache/ov", "/.cache/nvidia/GLCache", "/.nv/ComputeCache"):
        assert any(t.endswith(cache) for t in targets), cache
    assert {v["source"] for v in named} <= set(compose["volumes"])
    workdirs = [c.value[0] for c in _stages(commands)["runtime"] if c.cmd.upper() == "WORKDIR"]
    for name in ("train", "export"):
        service = compose["services"][name]
        (runs,) = [v for v in service["volumes"] if v["type"] == "bind"]
        assert runs["target"] == f"{workdirs[-1]}/runs" and service["working_dir"] == workdirs[-1]
        assert "./runs" in runs["source"]


# --- docker/Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_parses_and_names_its_stages(commands):
    known = set(dockerfile.all_cmds())
    assert all(c.cmd.lower() in known for c in commands), [c.original for c in commands]
    assert list(_stages(commands)) == ["wheel", "isaaclab", "runtime"]


def test_isaaclab_stage_is_the_isaac_lab_image_with_a_2x_default(commands):
    stages = _stages(commands)
    assert stages["isaaclab"][0].value[0] == "${ISAACLAB_IMAGE}:${ISAACLAB_TAG}"
    assert stages["runtime"][0].value[0] == "isaaclab"
    defaults = _global_args(commands)
    assert defaults["ISAACLAB_IMAGE"] == "nvcr.io/nvidia/isaac-lab"
    assert defaults["ISAACLAB_TAG"].split(".")[0] == "2"


def test_runtime_installs_under_the_images_own_torch(commands):
    runs = " ".join(c.value[0] for c in commands if c.cmd.upper() == "RUN")
    assert "--format=freeze" in runs and "torch|" in runs
    install = [c.value[0] for c in _stages(commands)["runtime"] if c.cmd.upper() == "RUN" and "pip install" in c.value[0]]
    assert install and all("--constraint /etc/fasttd3-constraints.txt" in r for r in install)


def test_copied_sources_exist_and_are_not_dockerignored(commands):
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for pattern in (".venv", "runs", ".git"):
        assert pattern in ignored
    for c in commands:
        if c.cmd.upper() != "COPY" or any(f.startswith("--from") for f in c.flags):
            continue
        for src in c.value[:-1]:
            assert (ROOT / src).exists(), src
            assert not any(fnmatch.fnmatch(src, p) for p in ignored), f"{src} is excluded by .dockerignore"


# --- docker/python.sh -----------------------------------------------------------------------------


def _stub(path: Path, name: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    exe = path / name
    exe.write_text('#!/usr/bin/env bash\necho "' + name + '"\nfor a in "$@"; do echo "$a"; done\n')
    exe.chmod(0o755)
    return exe


def _run_shim(args: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"]}
    return subprocess.run([str(SHIM), *args], env={**base, **env}, capture_output=True, text=True, timeout=30)


def test_shim_prefers_isaaclab_sh_and_forwards_arguments_verbatim(tmp_path):
    lab = tmp_path / "isaaclab"
    _stub(lab, "isaaclab.sh")
    _stub(tmp_path / "isaac-sim", "python.sh")
    args = ["-m", "fasttd3_lora.train", "task=Isaac-Velocity-Rough-G1-v0", "run.name=a b"]
    out = _run_shim(args, ISAACLAB_PATH=str(lab), ISAACSIM_ROOT_PATH=str(tmp_path / "isaac-sim"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["isaaclab.sh", "-p", *args]


def test_shim_falls_back_to_isaac_sim_python_then_fails_clearly(tmp_path):
    _stub(tmp_path / "isaac-sim", "python.sh")
    out = _run_shim(["-c", "pass"], ISAACSIM_ROOT_PATH=str(tmp_path / "isaac-sim"))
    assert out.stdout.splitlines() == ["python.sh", "-c", "pass"]
    out = _run_shim(["-c", "pass"], ISAACSIM_ROOT_PATH=str(tmp_path / "missing"))
    assert out.returncode == 127
    assert len(out.stderr.strip().splitlines()) == 1 and "FASTTD3_PYTHON" in out.stderr


def test_shim_override_runs_the_given_interpreter(tmp_path):
    exe = _stub(tmp_path / "bin", "mypython")
    out = _run_shim(["x"], FASTTD3_PYTHON=str(exe), ISAACLAB_PATH=str(tmp_path / "nothing"))
    assert out.stdout.splitlines() == ["mypython", "x"]


def test_compose_run_train_hands_overrides_to_the_hydra_app(compose):
    # What `docker compose run --rm train task=dmc/walker-walk seed=5` executes: entrypoint + the overrides,
    # here with this interpreter behind the shim. Hydra's `--cfg job` prints the composed config and exits.
    train = compose["services"]["train"]
    argv = [*train["entrypoint"], *train["command"], "task=dmc/walker-walk", "seed=5", "--cfg", "job"]
    assert argv[0] == "fasttd3-python"
    out = subprocess.run([str(SHIM), *argv[1:]], env={**os.environ, "FASTTD3_PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["task"]["name"] == "dmc/walker-walk" and cfg["seed"] == 5


def _constraints_step(commands) -> str:
    (step,) = [c.value[0] for c in _stages(commands)["isaaclab"] if c.cmd.upper() == "RUN" and "--format=freeze" in c.value[0]]
    return step


@pytest.mark.parametrize("has_torch", [True, False])
def test_constraints_step_pins_the_images_torch_and_numpy_only(tmp_path, commands, has_torch):
    # The build step run for real against a stub interpreter whose `pip list` is an Isaac Lab image's.
    freeze = ["numpy==1.26.4", "torchrl==0.6.0", "torchvision==0.22.0+cu128", "triton==3.3.0", "tensordict==0.6.2"]
    if has_torch:
        freeze.append("torch==2.7.0+cu128")
    stub = tmp_path / "bin" / "fasttd3-python"
    stub.parent.mkdir()
    stub.write_text("#!/usr/bin/env bash\nprintf '%s\\n' " + " ".join(freeze) + "\n")
    stub.chmod(0o755)
    target = tmp_path / "constraints.txt"
    script = _constraints_step(commands).replace("/etc/fasttd3-constraints.txt", str(target))
    env = {"PATH": f"{stub.parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-o", "pipefail", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    pinned = sorted(target.read_text().split())
    assert pinned == sorted(p for p in freeze if p.split("==")[0] in {"torch", "torchvision", "numpy", "triton"})
    if has_torch:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode == 1 and "no torch in the base image's Python" in out.stderr
