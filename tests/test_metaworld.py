"""Meta-World through EnvPool (fasttd3_lora/tasks/metaworld.py): the env's contract (specs, layout, episode length,
the success flag, several tasks, seeding), and a PPO run of the app on it with its success rate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fasttd3_lora.config import ConfigError, compose_config
from fasttd3_lora.runner import train

pytest.importorskip("envpool")
from fasttd3_lora.tasks.metaworld import MT10, MetaWorldEnv, metaworld_id  # noqa: E402


def test_names_map_to_envpools_and_mt10_has_ten_tasks_with_configs():
    from fasttd3_lora.config import group_options

    assert metaworld_id("metaworld/pick-place") == "MetaWorld/PickPlace-v3"
    assert metaworld_id("button-press-topdown") == "MetaWorld/ButtonPressTopdown-v3"
    assert len(MT10) == 10 and sorted(f"metaworld/{t}" for t in MT10) == [
        o for o in group_options("task") if o.startswith("metaworld/")]  # fmt: skip


def _roll(env: MetaWorldEnv, steps: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    td, observations, flags = env.reset(), [], []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        td.set("action", torch.rand(env.num_envs, 4, generator=gen) * 2 - 1)
        td, next_td = env.step_and_maybe_reset(td)
        observations.append(td["next", "observation"].clone())
        flags.append(td["next", "done"].clone())
        td = next_td
    return observations, flags


def test_the_env_keeps_the_contract_episodes_end_at_the_horizon_and_report_success():
    with MetaWorldEnv(["metaworld/reach", "metaworld/push"], 4, seed=3, max_episode_steps=12, num_threads=1) as env:
        assert env.observation_spec["observation"].shape == (4, 39) and env.action_spec.shape == (4, 4)
        assert sum(int(torch.tensor(s).prod()) for _, s in env.observation_layout()) == 39
        assert env.joint_names == ["hand_dx", "hand_dy", "hand_dz", "gripper"] and env.control_period == 0.0125
        assert env.task_ids.tolist() == [0, 0, 1, 1]
        td = env.reset()
        assert td["success"].dtype == torch.bool and td["success"].shape == (4, 1)
        observations, flags = _roll(env, 25)
        ends = [i for i, f in enumerate(flags) if f.any()]
        assert ends == [11, 23] and all(flags[i].all() for i in ends)  # every env times out at 12 steps
        assert not torch.allclose(observations[0][0], observations[0][2])  # another task, another object
    with MetaWorldEnv("metaworld/reach", 2, seed=3, max_episode_steps=12) as again:
        repeat, _ = _roll(again, 5)
    with MetaWorldEnv("metaworld/reach", 2, seed=3, max_episode_steps=12) as same:
        assert all(torch.equal(a, b) for a, b in zip(repeat, _roll(same, 5)[0]))  # a seed repeats exactly


def test_an_unknown_task_is_one_line():
    with pytest.raises(ValueError, match=r"^metaworld/fly: EnvPool has no Meta-World task MetaWorld/Fly-v3$"):
        MetaWorldEnv("metaworld/fly", 2)


def test_ppo_on_metaworld_through_the_app_logs_the_success_rate(tmp_path: Path):
    overrides = ["algo=ppo", "task=metaworld/reach", "task.max_episode_steps=20", "algo.num_envs=4",
                 "algo.num_steps=10", "algo.num_minibatches=2", "algo.actor_hidden_dims=[16]",
                 "algo.critic_hidden_dims=[16]", "total_env_steps=80", "eval_every=80", "checkpoint_every=80",
                 "eval_episodes=2", "precision=fp32"]  # fmt: skip
    torch.set_num_threads(1)
    counters = train(compose_config(overrides), tmp_path / "run", overrides)
    header, *rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    success = [r.split(",")[columns.index("eval_success")] for r in rows if r.split(",")[columns.index("eval_success")]]
    assert counters.env_step == 80 and len(success) == 1 and 0.0 <= float(success[0]) <= 1.0
    with pytest.raises(ConfigError, match="sac runs dmc tasks only; algorithms for metaworld: ppo, grpo"):
        compose_config(["task=metaworld/reach"])
