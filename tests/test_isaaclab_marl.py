"""Isaac Lab's multi-agent direct envs (`fasttd3_lora.tasks.isaaclab_marl`) against a stand-in of
``DirectMARLEnv``'s 3.0 API (tests/isaaclab_marl_standin.py), its launcher against the fake Isaac Lab 3.0 of
tests/test_isaaclab.py, and MAPPO through the app on the stand-in."""

from __future__ import annotations

import pytest
import torch
from isaaclab_marl_standin import make_marl_standin
from test_isaaclab import FakeIsaacLab30
from tiny_runs import Crash, assert_same_agent, crash_at, train_one_thread

from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.config import ConfigError, compose_config
from fasttd3_lora.tasks import isaaclab_marl
from fasttd3_lora.tasks.isaaclab import IsaacLabUnavailable
from fasttd3_lora.tasks.isaaclab_marl import IsaacLabMARLEnv, lookup_marl_task, make_isaaclab_marl_env

HANDS = {"right_hand": (9, 3), "left_hand": (9, 3)}


def _rollout(env: IsaacLabMARLEnv, steps: int, seed: int = 0):
    """(step result, the stand-in's ground truth, the [-1, 1] actions) of `steps` random steps."""
    raw = env._raw
    gen = torch.Generator().manual_seed(seed)
    env.set_seed(seed)
    env.reset()
    for _ in range(steps):
        actions = 2 * torch.rand(env.num_envs, env.num_agents, env.act_dim, generator=gen) - 1
        out = env.step(actions)
        yield out, raw, actions


def test_agents_of_different_sizes_are_padded_and_the_state_is_their_observations() -> None:
    env = IsaacLabMARLEnv(make_marl_standin(6), task="pendulum")
    assert env.agent_names == ["cart", "pendulum"] and env.obs_dims == [4, 3] and env.act_dims == [1, 1]
    assert (env.obs_dim, env.act_dim, env.state_dim) == (4, 1, 7)
    assert env.max_episode_steps == 12 and env.has_final_obs
    obs, state = env.reset()
    raw = env._raw._compute_observations()
    torch.testing.assert_close(obs[:, 0], raw["cart"])
    torch.testing.assert_close(obs[:, 1, :3], raw["pendulum"])
    assert bool((obs[:, 1, 3] == 0).all())  # padding
    torch.testing.assert_close(state, torch.cat([raw["cart"], raw["pendulum"]], dim=-1))


@pytest.mark.parametrize("state_space", [-1, 12])
def test_episode_ends_hand_out_the_true_final_observations_and_states(state_space: int) -> None:
    env = IsaacLabMARLEnv(make_marl_standin(16, agents=HANDS, state_space=state_space), task="hands")
    ended = timed_out = 0
    rewards = []
    for out, raw, actions in _rollout(env, 60):
        for name, (lo, hi) in raw._slices.items():  # actions go through unchanged (Isaac Lab maps [-1, 1] itself)
            torch.testing.assert_close(raw.last_actions[name], actions[:, env.agent_names.index(name), : hi - lo])
        done = out.terminated | out.truncated
        assert torch.equal(done, raw.last_reset_mask) and not bool((out.terminated & out.truncated).any())
        assert torch.equal(out.terminated, raw.terminated_buf["right_hand"])
        assert torch.equal(out.reward, torch.stack([raw.reward_buf[a] for a in env.agent_names], dim=1))
        rewards.append((out.reward, out.reward.clone()))
        finals = raw.extras  # the observations before the reset (of this step where done)
        for i, name in enumerate(env.agent_names):
            torch.testing.assert_close(out.final_obs[done, i], finals[name]["final_obs"][done])
        truth = raw.last_pre_reset_state if state_space > 0 else torch.cat(
            [finals[a]["final_obs"] for a in env.agent_names], dim=-1)  # fmt: skip
        torch.testing.assert_close(out.final_state[done], truth[done])
        torch.testing.assert_close(out.final_obs[~done], out.obs[~done])
        torch.testing.assert_close(out.final_state[~done], out.state[~done])
        assert not torch.equal(out.final_state[done], out.state[done]) or not bool(done.any())
        ended += int(out.terminated.sum())
        timed_out += int(out.truncated.sum())
    assert ended > 0 and timed_out > 0  # both paths were hit
    assert all(torch.equal(kept, copy) for kept, copy in rewards)  # no aliasing of Isaac Lab's in-place buffers


def test_without_final_observations_the_reset_ones_stand_in() -> None:
    """Isaac Lab 2.x has no final observation: as the single-agent wrapper, the reset one is used."""
    env = IsaacLabMARLEnv(make_marl_standin(16, final_obs=False), task="pendulum")
    assert not env.has_final_obs
    seen = 0
    for out, _, _ in _rollout(env, 30):
        torch.testing.assert_close(out.final_obs, out.obs)
        seen += int((out.terminated | out.truncated).sum())
    assert seen > 0


def test_tasks_without_a_state_or_with_shaped_spaces_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"^pendulum: the env has no global state \(state_space 0\)"):
        gym_env = make_marl_standin(4)
        gym_env.unwrapped.state_space = None
        IsaacLabMARLEnv(gym_env, task="pendulum")
    gym_env = make_marl_standin(4)
    gym_env.unwrapped.observation_spaces["cart"].shape = (2, 2)
    with pytest.raises(ValueError, match=r"^pendulum agent cart observation: only flat box spaces"):
        IsaacLabMARLEnv(gym_env, task="pendulum")


def test_either_id_names_a_task_and_an_unknown_one_lists_the_supported() -> None:
    assert lookup_marl_task("Isaac-Pendulum-MARL-Direct") == lookup_marl_task("Isaac-Cart-Double-Pendulum-Direct-v0")
    supported = r"Isaac-Cart-Double-Pendulum-Direct-v0, Isaac-Shadow-Hand-Over-Direct-v0 \(close"
    with pytest.raises(ValueError, match=rf"^unknown Isaac Lab multi-agent task 'Isaac-Shadow-Handover'; supported: {supported}"):
        lookup_marl_task("Isaac-Shadow-Handover")


def test_the_launcher_makes_the_3_0_id_with_final_observations_and_closes_everything(monkeypatch) -> None:
    fake = FakeIsaacLab30(monkeypatch, env_factory=lambda: make_marl_standin(8))
    env = make_isaaclab_marl_env("Isaac-Cart-Double-Pendulum-Direct-v0", 8, 3, "cpu", physics="newton_mjwarp")
    assert fake.calls["parse"] == ("Isaac-Pendulum-MARL-Direct", "cpu", 8, ["physics=newton_mjwarp"])
    assert fake.calls["make"][1].compute_final_obs is True and fake.calls["make"][1].seed == 3
    env.close()
    assert fake.env_closed and fake.launch_closed
    bad_env = make_marl_standin(8)
    bad_env.unwrapped.state_space = None
    bad = FakeIsaacLab30(monkeypatch, env_factory=lambda: bad_env)
    with pytest.raises(ValueError, match="no global state"):
        make_isaaclab_marl_env("Isaac-Shadow-Handover-Direct", 8, 3, "cpu")
    assert bad.env_closed and bad.launch_closed  # a wrapper that cannot be built leaves nothing open
    FakeIsaacLab30(monkeypatch, launch_exits=True)
    with pytest.raises(IsaacLabUnavailable, match=r"^Isaac-Shadow-Hand-Over-Direct-v0: Isaac Lab 3.0 could not start"):
        make_isaaclab_marl_env("Isaac-Shadow-Hand-Over-Direct-v0", 8, 3, "cpu")


# ------------------------------------------------------------------------------------------- through the app

TINY = [
    "task=Isaac-Cart-Double-Pendulum-Direct-v0", "algo.num_envs=8", "algo.num_steps=6", "algo.num_epochs=2",
    "algo.actor_hidden_dims=[16]", "algo.critic_hidden_dims=[16]", "total_env_steps=192", "eval_every=96",
    "checkpoint_every=96", "precision=fp32",
]  # fmt: skip


def _stand_in_factory(monkeypatch, made: list) -> None:
    def factory(name, num_envs, seed, device, physics, headless) -> IsaacLabMARLEnv:
        made.append((name, num_envs, physics))
        return IsaacLabMARLEnv(make_marl_standin(num_envs, seed=seed), task=name)

    monkeypatch.setattr(isaaclab_marl, "make_isaaclab_marl_env", factory)


def test_the_task_selects_mappo_with_isaac_labs_own_recipe() -> None:
    cfg = compose_config(["task=Isaac-Pendulum-MARL-Direct"])
    assert cfg.algo.name == "mappo" and cfg.task.name == "Isaac-Cart-Double-Pendulum-Direct-v0"
    assert (cfg.algo.num_envs, cfg.algo.num_steps, cfg.algo.num_epochs, cfg.algo.gae_lambda) == (4096, 16, 8, 0.95)
    hands = compose_config(["task=Isaac-Shadow-Handover-Direct"])
    hand_recipe = (hands.algo.num_envs, hands.algo.num_minibatches, list(hands.algo.actor_hidden_dims))
    assert hand_recipe == (2048, 4, [512, 512, 256, 128])
    with pytest.raises(ConfigError, match=r"task.family='isaaclab_marl': sac runs dmc tasks only"):
        compose_config(["task=Isaac-Pendulum-MARL-Direct", "algo=sac"])


@pytest.mark.parametrize("actor", ["mlp", "gru"])
def test_mappo_trains_on_the_stand_in_evaluating_on_its_one_env_and_resumes_exactly(actor, tmp_path, monkeypatch) -> None:
    tiny = [*TINY, *(["algo.recurrent=true", "algo.rnn_hidden_dim=8", "algo.chunk_length=3"] if actor == "gru" else [])]
    made: list = []
    _stand_in_factory(monkeypatch, made)
    whole = train_one_thread(tiny, tmp_path / "whole")
    assert made == [("Isaac-Cart-Double-Pendulum-Direct-v0", 8, None)]  # one env: evaluation runs on it
    assert whole.env_step == 192 and whole.last_eval_return is not None
    state = load_checkpoint(tmp_path / "whole" / "checkpoints" / "latest.pt")
    assert state["meta"]["env"]["observation"]["dim"] == 4
    crash_at(monkeypatch, 144)
    with pytest.raises(Crash):
        train_one_thread(tiny, tmp_path / "broken")
    monkeypatch.undo()
    _stand_in_factory(monkeypatch, made)
    resumed = train_one_thread([*tiny, f"resume={tmp_path / 'broken'}"], tmp_path / "broken")
    assert (resumed.env_step, resumed.last_eval_return) == (whole.env_step, whole.last_eval_return)
    assert_same_agent(tmp_path / "whole", tmp_path / "broken", ("actor", "critic", "obs_rms", "state_rms", "value_rms"))
