"""PPO and the policy library through the training app (fasttd3_lora/loops/ppo.py, fasttd3_lora/library.py): a
tiny DMC run end to end (metrics, checkpoints, export, exact resume), a library built from it (adapters trained on
one task and on two tasks in one run, listed, exported, removed), Isaac Lab through the stand-in, and the one-line
errors of bad library input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.config import ConfigError, compose_config
from fasttd3_lora.export import export_checkpoint
from fasttd3_lora.library import export_library, main as library_main, size_rows
from fasttd3_lora.library_store import Library, LibraryError, create_library, library_policy
from fasttd3_lora.tasks import isaaclab
from fasttd3_lora.tasks.isaaclab import IsaacLabEnv

import isaaclab_standin as standin
from tiny_runs import assert_same_agent, crash_and_resume, train_one_thread

ort = pytest.importorskip("onnxruntime")

# 4 envs, 15-step episodes, rollouts of 10 steps: 40 env steps per iteration, 4 iterations (checkpoints every 2
# fall inside episodes).
TINY = [
    "algo=ppo", "task=dmc/cartpole-balance", "task.max_episode_steps=15", "algo.action_repeat=1",
    "algo.num_envs=4", "algo.num_steps=10", "algo.num_epochs=2", "algo.num_minibatches=2",
    "algo.actor_hidden_dims=[16,16]", "algo.critic_hidden_dims=[16]", "total_env_steps=160", "eval_every=80",
    "checkpoint_every=80", "eval_episodes=2", "precision=fp32",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "disabled"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, object]:
    run_dir = tmp_path_factory.mktemp("ppo") / "base"
    return run_dir, train_one_thread(TINY, run_dir)


def _columns(run_dir: Path) -> tuple[list[str], list[list[str]]]:
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    return header.split(","), [r.split(",") for r in rows]


def test_ppo_run_trains_evaluates_checkpoints_and_exports(base_run, tmp_path) -> None:
    run_dir, counters = base_run
    columns, rows = _columns(run_dir)
    assert {"surrogate_loss", "value_loss", "entropy", "kl", "lr", "episode_return", "eval_return"} <= set(columns)
    evals = [r[0] for r in rows if r[columns.index("eval_return")]]
    assert evals == ["80", "160"]
    episodes = [r[0] for r in rows if r[columns.index("episode_return")]]
    # 15-step episodes of 4 envs end at env steps 60 and 120 (the rollouts ending at 80 and 120); the checkpoint
    # at 80 cut none (restarted there, they would end at 140: the row of 160)
    assert episodes == ["80", "120"]
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert counters.env_step == 160 and state["meta"]["counters"]["agent_step"] == 4  # one agent step per iteration
    assert state["agent"]["num_updates"] == 4 * 2 * 2  # iterations x epochs x minibatches
    assert "critic" not in state["meta"]["config"]  # PPO has no critic group: config.yaml does not pretend
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["algo"]["name"] == "ppo"

    result = export_checkpoint(run_dir, tmp_path / "export", num_obs=64)
    assert result.metadata["actor"] == "GaussianPolicy" and result.metadata["critic"] == "none"
    assert result.max_abs_diff < 1e-5


def test_resumed_ppo_run_matches_an_uninterrupted_one_bit_for_bit(base_run, tmp_path, monkeypatch) -> None:
    whole_dir, whole = base_run
    # dies after the checkpoint at 80, one iteration into the second half
    resumed = crash_and_resume(monkeypatch, TINY, tmp_path / "broken", 120)
    assert (resumed.env_step, resumed.last_eval_return) == (whole.env_step, whole.last_eval_return)
    assert_same_agent(whole_dir, tmp_path / "broken", ("actor", "value", "obs_rms"))


# ---------------------------------------------------------------------------------------------- library


@pytest.fixture(scope="module")
def library(base_run, tmp_path_factory) -> Library:
    run_dir, _ = base_run
    path = tmp_path_factory.mktemp("lib") / "lib"
    library_main(["create", str(path), "--base", str(run_dir)])
    # one task's adapter, then two tasks of the same embodiment in one run (2 envs each)
    train_one_thread([*TINY, f"library={path}", "library.rank=2"], tmp_path_factory.mktemp("ft") / "one")
    train_one_thread([*TINY, f"library={path}", "library.rank=3", "library.tasks=[dmc/cartpole-swingup,dmc/cartpole-balance_sparse]"],
           tmp_path_factory.mktemp("ft") / "two")  # fmt: skip
    return Library(path)


def test_library_holds_the_base_and_each_tasks_adapter(base_run, library) -> None:
    base_state = load_checkpoint(base_run[0] / "checkpoints" / "latest.pt")["agent"]
    assert set(library.entries) == {"dmc/cartpole-balance", "dmc/cartpole-swingup", "dmc/cartpole-balance_sparse"}
    assert library.entries["dmc/cartpole-balance"]["rank"] == 2 and library.entries["dmc/cartpole-swingup"]["rank"] == 3
    stored = library.base_state()
    for name, tensor in base_state["actor"].items():  # the base is the run's policy, bit for bit
        assert torch.equal(stored["policy"][name], tensor)
    # an adapter trains r (in + out) numbers per layer (the 1-wide head: rank 1) and the task's log-std:
    # 2 (5+16) + 2 (16+16) + 1 (16+1) + 1; its file also holds one scale per layer
    assert library.entries["dmc/cartpole-balance"]["trainable"] == 2 * 21 + 2 * 32 + 17 + 1
    for task, entry in library.entries.items():
        assert entry["eval_return"] is not None, task
        assert entry["bytes_on_disk"] == (library.path / entry["file"]).stat().st_size


def test_training_an_adapter_leaves_the_base_untouched(library) -> None:
    """The fine-tuned run's policy keeps the base weights bit for bit: only adapters and log-std moved."""
    run = Path(library.entries["dmc/cartpole-balance"]["run"]) / "checkpoints" / "latest.pt"
    actor = load_checkpoint(run)["agent"]["actor"]
    base = library.base_state()["policy"]
    for i in range(3):
        assert torch.equal(actor[f"mean_net.layers.{i}.base"], base[f"mean_net.layers.{i}.weight"])
        assert torch.equal(actor[f"mean_net.layers.{i}.base_bias"], base[f"mean_net.layers.{i}.bias"])
    assert any(actor[f"mean_net.layers.{i}.lora_B"].abs().max() > 0 for i in range(3))  # the adapter did learn


def test_a_rank_above_a_layers_width_gives_that_layer_its_full_rank_at_the_same_scale(library) -> None:
    """cartpole has one action: the head (16 -> 1) takes rank 1, the others the asked 3, all at scale alpha/r."""
    run = Path(library.entries["dmc/cartpole-swingup"]["run"]) / "checkpoints" / "latest.pt"
    actor = load_checkpoint(run)["agent"]["actor"]
    assert [actor[f"mean_net.layers.{i}.lora_A"].shape[-2] for i in range(3)] == [3, 3, 1]
    scales = [float(layer["scale"]) for layer in library.adapter("dmc/cartpole-swingup")["layers"].values()]
    assert scales == [1.0, 1.0, 1.0]


def test_mixed_batch_equals_each_tasks_merged_policy(library) -> None:
    tasks = sorted(library.entries)
    policy, _ = library_policy(library, tasks)
    obs = torch.randn(300, 5)
    task = torch.arange(300) % len(tasks)
    with torch.no_grad():
        mixed = policy.deterministic_action(obs, task)
        for k in range(len(tasks)):
            alone = policy.merged(k).deterministic_action(obs[task == k])
            assert (mixed[task == k] - alone).abs().max() <= 1e-6
        assert not torch.allclose(mixed[task == 0], policy.deterministic_action(obs[task == 0], 1))


def test_library_list_reports_sizes_against_a_full_copy(library, capsys) -> None:
    rows, summary = size_rows(library)
    assert [r["task"] for r in rows] == sorted(library.entries)
    for r in rows:
        assert r["full_trainable"] == library.base["policy_numel"] == 5 * 16 + 16 + 16 * 16 + 16 + 16 + 1 + 1
        assert r["x_fewer_numbers"] == pytest.approx(r["full_trainable"] / r["trainable"])
    assert summary["library_bytes_on_disk"] == library.base["bytes_on_disk"] + sum(r["bytes_on_disk"] for r in rows)
    library_main(["list", str(library.path)])
    out = capsys.readouterr().out
    assert "dmc/cartpole-balance_sparse" in out and "x smaller" in out and "3 task(s)" in out


def test_library_exports_one_model_with_task_ids_and_one_merged_model_per_task(library, tmp_path) -> None:
    model, deploy, diff = export_library(library, tmp_path / "all")
    meta = yaml.safe_load(deploy.read_text())
    assert meta["tasks"] == sorted(library.entries) and diff <= 1e-5
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["obs", "task_id"]
    obs = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    task_id = np.arange(9) % 3
    (actions,) = session.run(["actions"], {"obs": obs, "task_id": task_id})
    for k, task in enumerate(meta["tasks"]):
        one, _, _ = export_library(library, tmp_path / task.replace("/", "-"), task=task)
        one_session = ort.InferenceSession(str(one), providers=["CPUExecutionProvider"])
        (alone,) = one_session.run(["actions"], {"obs": obs[task_id == k]})
        assert np.abs(actions[task_id == k] - alone).max() <= 1e-5


def test_corrupt_or_foreign_library_files_are_refused_in_one_line(library, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(library.path, copy)
    lib = Library(copy)
    adapter = copy / lib.entries["dmc/cartpole-balance"]["file"]
    adapter.write_bytes(adapter.read_bytes()[:-10])
    with pytest.raises(LibraryError, match="does not match its sha256"):
        lib.adapter("dmc/cartpole-balance")
    (copy / "library.json").write_text('{"format": "something-else"}')
    with pytest.raises(LibraryError, match="not a fasttd3-lora-library/1 index"):
        Library(copy)
    with pytest.raises(LibraryError, match="no library.json"):
        Library(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "fasttd3_lora.library", "list", str(copy)], env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(LibraryError, match="a library's base is a PPO run"):
        create_library(tmp_path / "bad", {"meta": {"config": {"algo": {"name": "sac"}}}}, "somewhere")


def test_removing_a_task_drops_its_entry_and_file(library, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(library.path, copy)
    file = copy / Library(copy).entries["dmc/cartpole-swingup"]["file"]
    library_main(["remove", str(copy), "dmc/cartpole-swingup"])
    assert "dmc/cartpole-swingup" not in Library(copy).entries and not file.exists()
    with pytest.raises(SystemExit) as exit_info:
        library_main(["remove", str(copy), "dmc/cartpole-swingup"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["library.rank=0"], "library.rank=0: allowed an integer >= 1 or full"),
        (["library.tasks=[dmc/cartpole-swingup]"], "library.tasks=['dmc/cartpole-swingup']: needs library.path"),
        (["algo.num_minibatches=0"], "algo.num_minibatches=0: allowed an integer >= 1"),
        (["algo.actor_hidden_dims=[]"], "algo.actor_hidden_dims=[]: allowed a non-empty list"),
    ],
)  # fmt: skip
def test_bad_library_and_ppo_values_are_one_line_config_errors(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compose_config([*TINY, *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["library.rank=full", "library.tasks=[dmc/cartpole-balance,dmc/cartpole-swingup]"],
         "library.rank=full: full fine-tuning trains one copy"),
        (["algo.num_envs=3", "library.tasks=[dmc/cartpole-balance,dmc/cartpole-swingup]"],
         "algo.num_envs=3: allowed a multiple of the 2 library.tasks"),
    ],
)  # fmt: skip
def test_bad_library_runs_are_one_line_config_errors(library, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config([*TINY, f"library={library.path}", *overrides])


def test_library_with_sac_or_a_missing_library_is_refused_at_the_command_line(tmp_path) -> None:
    for args, expected in (
        (["task=dmc/cartpole-balance", f"library={tmp_path}"], "a policy library trains with ppo; algo.name=sac has none"),
        ([*TINY, f"library={tmp_path / 'none'}"], "no library.json"),
    ):
        proc = subprocess.run([sys.executable, "-m", "fasttd3_lora.train", *args, "total_env_steps=1"], env=ENV,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-500:]
        assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-500:]
        assert not (tmp_path / "runs").exists()  # refused before any run directory


# ------------------------------------------------------------------------------------------- Isaac Lab


def test_ppo_on_isaaclab_runs_through_the_app_with_the_stand_in(tmp_path, monkeypatch) -> None:
    made = []

    def factory(name, num_envs, seed, device, physics, headless, render=False) -> IsaacLabEnv:
        made.append((name, num_envs))
        return IsaacLabEnv(standin.make_standin(num_envs, 3, seed=seed, final_obs=True), task="standin")

    monkeypatch.setattr(isaaclab, "make_isaaclab_env", factory)
    overrides = ["algo=ppo", "task=Isaac-Velocity-Flat-H1-v0", "algo.num_envs=32", "algo.num_steps=8",
                 "algo.actor_hidden_dims=[16]", "algo.critic_hidden_dims=[16]", "total_env_steps=768",
                 "eval_every=512", "checkpoint_every=100000", "precision=fp32"]  # fmt: skip
    counters = train_one_thread(overrides, tmp_path / "run")
    assert made == [("Isaac-Velocity-Flat-H1-v0", 32)]  # one env: evaluation runs on it
    assert counters.env_step == 768 and counters.last_eval_return is not None
    columns, rows = _columns(tmp_path / "run")
    assert any(r[columns.index("episode_return")] for r in rows)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["meta"]["env"]["action"]["dim"] == 3


def test_the_report_splits_a_multi_task_library_run_into_its_tasks(library, tmp_path) -> None:
    from fasttd3_lora.report import write_report

    runs = tmp_path / "runs"
    runs.mkdir()
    for task in ("dmc/cartpole-balance", "dmc/cartpole-swingup"):  # the one-task run and the two-task run
        shutil.copytree(library.entries[task]["run"], runs / task.replace("/", "-"))
    text = write_report(runs, tmp_path / "report").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| dmc/")}
    assert set(rows) == {"dmc/cartpole-balance", "dmc/cartpole-swingup", "dmc/cartpole-balance_sparse"}
    header = next(line for line in text.splitlines() if line.startswith("| task |"))
    assert header == "| task | ppo-lora-r2 | ppo-lora-r3 |"
    two = library.entries["dmc/cartpole-swingup"]["eval_return"]
    assert f"{two:.1f} ± 0.0 (n=1)" in rows["dmc/cartpole-swingup"]  # the task's own evaluation, not the mean


def test_the_library_experiment_report_names_each_method_and_compares_with_full_fine_tuning(library, tmp_path) -> None:
    from fasttd3_lora.experiments.library import collect, returns_table

    runs = tmp_path / "runs"
    for task in ("dmc/cartpole-balance", "dmc/cartpole-swingup"):
        shutil.copytree(library.entries[task]["run"], runs / task.replace("/", "-"))
    rows = collect(runs)
    # the two-task run gives each task 80 env steps, the one-task run 160: only the common budget is compared
    assert {(r["task"], r["method"], r["budget"]) for r in rows} == {
        ("dmc/cartpole-swingup", "ppo-lora-r3 (one run of all tasks)", 80),
        ("dmc/cartpole-balance_sparse", "ppo-lora-r3 (one run of all tasks)", 80)}  # fmt: skip
    table = returns_table(rows)
    assert table.splitlines()[0] == "| task | ppo-lora-r3 (one run of all tasks) | ppo-lora-r3 − full (± s.e.) | Welch p |"
    swingup = library.entries["dmc/cartpole-swingup"]["eval_return"]
    assert f"| dmc/cartpole-swingup | {swingup:.1f} ± 0.0 (n=1) | — | — |" in table
