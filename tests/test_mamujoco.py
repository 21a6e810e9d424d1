"""MaMuJoCo through our multi-agent wrapper (fasttd3_lora/tasks/mamujoco.py) on the real Gymnasium-Robotics 1.4.2:
the factorisations' spaces, the global state against the single-agent robot's observation, the shared reward,
episode ends (final observations kept, the next episode started), seeding, and a MAPPO run and export through the
app."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium_robotics")
os.environ.setdefault("MUJOCO_GL", "disabled")

from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.export import export_checkpoint
from fasttd3_lora.tasks.mamujoco import MaMuJoCoEnv

from tiny_runs import train_one_thread


@pytest.mark.parametrize(
    ("task", "agents", "obs_dims", "act_dims", "state_dim"),
    [("mamujoco/HalfCheetah-2x3", 2, [12, 12], [3, 3], 17), ("mamujoco/Walker2d-2x3", 2, [12, 12], [3, 3], 17),
     ("mamujoco/Ant-4x2", 4, [42] * 4, [2] * 4, 105)],
)  # fmt: skip
def test_factorisations_have_their_documented_spaces(task, agents, obs_dims, act_dims, state_dim) -> None:
    env = MaMuJoCoEnv(task, 2)
    assert (env.num_agents, env.obs_dims, env.act_dims, env.state_dim) == (agents, obs_dims, act_dims, state_dim)
    obs, state = env.reset()
    assert obs.shape == (2, agents, max(obs_dims)) and state.shape == (2, state_dim)
    out = env.step(torch.zeros(2, agents, max(act_dims)))
    assert out.reward.shape == (2, agents) and bool((out.reward == out.reward[:, :1]).all())  # the robot's, shared


def test_the_state_is_the_single_agent_robots_observation() -> None:
    env = MaMuJoCoEnv("mamujoco/HalfCheetah-2x3", 1)
    _, state = env.reset()
    robot = env._envs[0].single_agent_env.unwrapped
    assert np.allclose(state[0].numpy(), robot._get_obs(), atol=1e-6)


def test_episodes_end_at_the_time_limit_and_the_next_one_starts() -> None:
    env = MaMuJoCoEnv("mamujoco/HalfCheetah-2x3", 3, max_episode_steps=4)
    env.set_seed(0)
    first, _ = env.reset()
    for step in range(1, 5):
        out = env.step(torch.full((3, 2, 3), 0.7))
        assert bool(out.truncated.all()) == (step == 4) and not bool(out.terminated.any())
        assert torch.equal(out.obs, out.final_obs) == (step < 4)
    # the robot ran for 4 steps; the next episode starts near the initial pose (noise 0.1), not where it stopped
    assert (out.final_obs - first).abs().max() > 0.5 and (out.obs - first).abs().max() < 0.5


def test_the_same_seed_replays_the_same_episodes_and_another_differs() -> None:
    def rewards(seed: int) -> torch.Tensor:
        env = MaMuJoCoEnv("mamujoco/HalfCheetah-2x3", 2, max_episode_steps=5)
        env.set_seed(seed)
        env.reset()
        generator = torch.Generator().manual_seed(0)
        return torch.stack([env.step(torch.rand(2, 2, 3, generator=generator) * 2 - 1).final_state for _ in range(12)])

    assert torch.equal(rewards(3), rewards(3)) and not torch.equal(rewards(3), rewards(4))


@pytest.mark.parametrize(
    ("task", "message"),
    [("mamujoco/Ant-2x3", r"mamujoco/Ant-2x3: MaMuJoCo cannot make it \(UNKNOWN partitioning config: 2x3\)"),
     ("mamujoco/CoupledHalfCheetah-1p1", r"task must be mamujoco/<scenario>-<agents>x<segments>"),
     ("mamujoco/halfcheetah", r"task must be mamujoco/<scenario>-<agents>x<segments>")],
)  # fmt: skip
def test_bad_tasks_are_one_line(task, message) -> None:
    with pytest.raises(ValueError, match=message):
        MaMuJoCoEnv(task, 1)


def test_mappo_and_lorasa_run_on_mamujoco_and_export_with_agent_ids(tmp_path) -> None:
    tiny = ["algo=mappo", "task=mamujoco/HalfCheetah-2x3", "task.max_episode_steps=20", "algo.num_envs=2",
            "algo.num_steps=20", "algo.actor_hidden_dims=[16]", "algo.critic_hidden_dims=[16]", "total_env_steps=80",
            "eval_every=80", "checkpoint_every=80", "eval_episodes=1", "precision=fp32"]  # fmt: skip
    train_one_thread(tiny, tmp_path / "shared")
    train_one_thread([*tiny, "policy=lorasa", f"policy.from={tmp_path / 'shared'}"], tmp_path / "lorasa")
    state = load_checkpoint(tmp_path / "lorasa" / "checkpoints" / "latest.pt")
    assert state["agent"]["state_rms"]["mean"].shape == (17,)  # the critic read the robot's state
    result = export_checkpoint(tmp_path / "lorasa", tmp_path / "export", num_obs=32)
    assert result.metadata["index"]["values"] == ["agent_0", "agent_1"] and result.max_abs_diff < 1e-5
    assert sorted(p.name for p in (tmp_path / "export").glob("*.onnx")) == [
        "policy.onnx", "policy_agent_0.onnx", "policy_agent_1.onnx"]  # fmt: skip
