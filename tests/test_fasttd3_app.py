"""FastTD3 through the training app (fasttd3_lora/loops/fasttd3.py): DMC on CPU end to end (metrics, checkpoint,
export, exact resume), and Isaac Lab through the app's env builder with the GPU-free stand-in env
(tests/isaaclab_standin.py) swapped in for `make_isaaclab_env`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.config import compose_config
from fasttd3_lora.export import export_checkpoint
from fasttd3_lora.loops import fasttd3 as loop
from fasttd3_lora.tasks import isaaclab
from fasttd3_lora.tasks.isaaclab import IsaacLabEnv
from fasttd3_lora.runner import train

import isaaclab_standin as standin
from tiny_runs import SMALL_NETS, Crash, crash_at


# 4 DMC envs, 30-step episodes (checkpoints every 100 env steps fall inside them): 4 env steps per agent step,
# 50 agent steps, updates after the first 10.
DMC_TINY = [
    "algo=fasttd3",
    "task=dmc/cartpole-swingup",
    "task.max_episode_steps=30",
    "algo.action_repeat=1",
    "algo.num_envs=4",
    "algo.batch_size=32",
    "algo.buffer_size=64",
    "algo.n_step=3",
    "algo.updates_per_step=2",
    "total_env_steps=200",
    "eval_every=100",
    "checkpoint_every=100",
    "eval_episodes=2",
    *SMALL_NETS,
]
ISAAC_TINY = [
    "algo=fasttd3",
    "task=Isaac-Velocity-Flat-H1-v0",
    "device=cpu",
    "algo.num_envs=64",
    "algo.batch_size=128",
    "total_env_steps=3200",  # 50 agent steps of 64 envs
    "eval_every=1600",
    "checkpoint_every=100000",
    *SMALL_NETS,
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "disabled"}


# --------------------------------------------------------------------------------------------------- DMC


@pytest.fixture(scope="module")
def dmc_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """One uninterrupted tiny DMC run (one torch thread, as the autouse fixture sets for the tests)."""
    run_dir = tmp_path_factory.mktemp("dmc") / "whole"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counters = train(compose_config(DMC_TINY), run_dir, DMC_TINY)
    finally:
        torch.set_num_threads(threads)
    return run_dir, counters


def test_dmc_run_trains_evaluates_checkpoints_and_exports(dmc_run, tmp_path: Path) -> None:
    run_dir, _ = dmc_run
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"episode_return", "eval_return", "critic_loss", "actor_loss", "q_mean", "sps"} <= set(columns)
    evals = [r.split(",")[0] for r in rows if r.split(",")[columns.index("eval_return")]]
    assert evals == ["100", "200"]
    episodes = [r.split(",")[0] for r in rows if r.split(",")[columns.index("episode_return")]]
    # 30-step episodes in lockstep end at 30 agent steps x 4 envs; the checkpoint at 100 cut none of them
    assert episodes == ["120"]

    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert state["meta"]["config"]["algo"]["name"] == "fasttd3"
    assert state["meta"]["counters"]["env_step"] == 200 and state["meta"]["counters"]["agent_step"] == 50
    assert state["meta"]["env"]["observation"]["dim"] == 5 and state["meta"]["env"]["action"]["dim"] == 1
    assert state["agent"]["num_updates"] == (50 - 10) * 2  # updates after learning_starts (10) agent steps
    assert state["replay"]["size"] == 50

    result = export_checkpoint(run_dir, tmp_path / "export", num_obs=64)
    assert result.policy_path.exists() and result.metadata["algo"] == "fasttd3"
    assert result.max_abs_diff < 1e-4


def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(dmc_run, tmp_path: Path, monkeypatch) -> None:
    whole_dir, whole = dmc_run
    cfg = compose_config(DMC_TINY)
    # The same run dies at env_step 140, after updates past its checkpoint at 100; then it is resumed.
    crash_at(monkeypatch, 140)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "broken", DMC_TINY)
    monkeypatch.undo()
    resumed = train(compose_config([*DMC_TINY, f"resume={tmp_path / 'broken'}"]), tmp_path / "broken", DMC_TINY)

    assert (resumed.env_step, resumed.agent_step, resumed.last_eval_return) == (
        whole.env_step, whole.agent_step, whole.last_eval_return,
    )  # fmt: skip
    a = load_checkpoint(whole_dir / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "broken" / "checkpoints" / "latest.pt")
    for part in ("agent", "replay"):
        flat_a, flat_b = _flatten(a[part]), _flatten(b[part])
        assert flat_a.keys() == flat_b.keys() and len(flat_a) >= 10
        for key, value in flat_a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, flat_b[key]), f"{part}.{key}"
            else:
                assert value == flat_b[key], f"{part}.{key}"


def _metric_rows(run_dir: Path) -> list[dict[str, str]]:
    header, *lines = (run_dir / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    return [{k: v for k, v in zip(columns, line.split(","), strict=True) if k not in ("wall_time", "sps")}
            for line in lines]  # fmt: skip


def test_spread_starts_report_whole_episodes_only_and_resume_bit_for_bit(tmp_path: Path, monkeypatch) -> None:
    """task.spread_starts: each env's first episode is cut at a random step in [1, 30] agent steps and not
    reported, so the first reported episode ends at agent step 31 or later (4 envs: env step 124); a run killed
    past its checkpoint at 100 (inside episodes, some envs still in their first) resumes to the same agent,
    buffer and metrics rows."""
    spread = [*DMC_TINY, "task.spread_starts=true", "total_env_steps=400", "seed=5"]  # env 0 cut at step 29
    train(compose_config(spread), tmp_path / "whole", spread)
    rows = _metric_rows(tmp_path / "whole")
    reported = [int(r["env_step"]) for r in rows if r["episode_return"]]
    unreported = [int(r["env_step"]) for r in rows if not r["episode_return"] and not r["eval_return"]]
    assert len(reported) >= 2 and min(reported) >= 124 and unreported and min(unreported) <= 120
    crash_at(monkeypatch, 140)
    with pytest.raises(Crash):
        train(compose_config(spread), tmp_path / "broken", spread)
    monkeypatch.undo()
    train(compose_config([*spread, f"resume={tmp_path / 'broken'}"]), tmp_path / "broken", spread)
    assert _metric_rows(tmp_path / "broken") == rows
    a = _flatten(load_checkpoint(tmp_path / "whole" / "checkpoints" / "latest.pt")["agent"])
    b = _flatten(load_checkpoint(tmp_path / "broken" / "checkpoints" / "latest.pt")["agent"])
    assert all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, (list, tuple)):
        return _flatten(dict(enumerate(tree)), prefix)
    return {prefix: tree}


# --------------------------------------------------------------------------------------------- Isaac Lab


class StandInFactory:
    """`make_isaaclab_env` for the tests: a stand-in env (3.0-style true final observations, asymmetric critic),
    recording what the app asked for and the ground truth of every training step (not the evaluation's)."""

    def __init__(self, **standin_kwargs) -> None:
        self.kwargs = standin_kwargs
        self.calls: list[tuple] = []
        self.evaluating = False
        self.pre_reset_obs: list[torch.Tensor] = []
        self.reset_masks: list[torch.Tensor] = []

    def __call__(self, name, num_envs, seed, device, physics, headless, render=False) -> IsaacLabEnv:
        self.calls.append((name, num_envs, seed, device, physics, headless))
        gym_env = standin.make_standin(num_envs, 3, seed=seed, **self.kwargs)
        inner_step = gym_env.step

        def step(action):
            out = inner_step(action)
            if not self.evaluating:
                self.pre_reset_obs.append(gym_env.unwrapped.last_pre_reset_obs["policy"].clone())
                self.reset_masks.append(gym_env.unwrapped.last_reset_mask.clone())
            return out

        gym_env.step = step
        return IsaacLabEnv(gym_env, task="standin")


def _spy_loop(monkeypatch: pytest.MonkeyPatch, factory: StandInFactory) -> dict:
    """Capture the agent, the masks handed to on_episode_end and every step written to the buffer; tell the
    factory when the app evaluates."""
    seen: dict = {"masks": [], "added": []}
    build, evaluate = loop.build, loop.RunRecord.evaluate

    def spying_build(*args, **kwargs):
        agent, replay = build(*args, **kwargs)
        seen["agent"], seen["replay"] = agent, replay
        end, add = agent.on_episode_end, replay.add
        agent.on_episode_end = lambda mask: (seen["masks"].append(mask.clone()), end(mask))[1]
        replay.add = lambda td: (seen["added"].append(td.clone()), add(td))[1]
        return agent, replay

    def flagged_evaluate(*args, **kwargs):
        factory.evaluating = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            factory.evaluating = False

    monkeypatch.setattr(loop, "build", spying_build)
    monkeypatch.setattr(loop.RunRecord, "evaluate", flagged_evaluate)
    return seen


def test_isaaclab_task_runs_through_the_app_with_its_family_numbers(tmp_path, monkeypatch) -> None:
    factory = StandInFactory(final_obs=True, critic=True)
    monkeypatch.setattr(isaaclab, "make_isaaclab_env", factory)
    seen = _spy_loop(monkeypatch, factory)
    counters = train(compose_config(ISAAC_TINY), tmp_path / "run")

    assert factory.calls == [("Isaac-Velocity-Flat-H1-v0", 64, 0, "cpu", None, True)]  # one env: eval reuses it
    agent = seen["agent"]
    assert (agent.cfg.updates_per_step, agent.cfg.n_step) == (4, 8)  # task.fasttd3 of the locomotion family
    assert agent.critic_obs_dim is not None and "critic_observation" in seen["replay"].storage.keys()
    assert counters.env_step == 3200 and agent.num_updates == (50 - 10) * 4
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["meta"]["env"]["action"]["dim"] == 3  # export needs no Isaac Lab: the facts are stored

    # Noise scales are re-drawn exactly for the envs whose episode ended in that step (the env's own resets),
    # and for all envs at the steps after which the app restarts the episodes (evaluation at 1600, the end).
    restarts = {1600 // 64 - 1, 3200 // 64 - 1}
    assert len(seen["masks"]) == len(factory.reset_masks) == 50
    assert sum(bool(m.any()) for m in factory.reset_masks) > 5
    for i, (mask, truth) in enumerate(zip(seen["masks"], factory.reset_masks, strict=True)):
        assert torch.equal(mask, torch.ones_like(mask) if i in restarts else truth), i
    # The buffer's next observation at an episode end is the true final one, not the reset observation.
    for td, truth, pre_reset in zip(seen["added"], factory.reset_masks, factory.pre_reset_obs, strict=True):
        assert torch.equal(td["next_observation"][truth], pre_reset[truth])
        assert torch.equal(td["terminated"] | td["truncated"], td["terminated"] | td["truncated"] | truth)


def test_isaaclab_without_isaac_lab_is_one_line_and_exit_2(tmp_path) -> None:
    assert isaaclab.detect_isaaclab() is None  # this machine has no Isaac Lab
    proc = subprocess.run([sys.executable, "-m", "fasttd3_lora.train", "algo=fasttd3", "task=Isaac-Velocity-Flat-H1-v0",
                           f"hydra.run.dir={tmp_path / 'run'}"], env=ENV, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fasttd3-train: Isaac-Velocity-Flat-H1-v0 needs Isaac Lab"), lines


def test_sac_on_isaaclab_is_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^task.family='isaaclab': sac runs dmc tasks only; algorithms for isaaclab: fasttd3"):
        train(compose_config(["task=Isaac-Velocity-Flat-H1-v0", "algo=sac"]), tmp_path)


def test_an_isaaclab_task_selects_fasttd3_unless_told_otherwise() -> None:
    # `docker compose run --rm train task=Isaac-...` names only the task (configs/task/_isaaclab.yaml).
    assert compose_config(["task=Isaac-Velocity-Rough-G1-v0"]).algo.name == "fasttd3"
    assert compose_config(["task=Isaac-Velocity-Rough-G1"]).algo.name == "fasttd3"
    assert compose_config(["task=dmc/cheetah-run"]).algo.name == "sac"


def test_bad_fasttd3_value_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"policy_frequency must be a positive int, got 0"):
        compose_config(["algo=fasttd3", "algo.policy_frequency=0"])
