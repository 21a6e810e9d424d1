"""MAPPO and LoRASA (fasttd3_lora/mappo.py, fasttd3_lora/loops/mappo.py, fasttd3_lora/tasks/vmas.py): the VMAS
env's contract (padding, episode ends, the action map), the actors of the three policy modes (per-row agents,
LoRASA's adapters starting as the shared actor, merged per-agent copies), whole runs of the app (metrics,
checkpoints, exact resume, LoRASA from a shared run, export with agent ids), that MAPPO learns, and the one-line
errors of bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("vmas")
os.environ.setdefault("MUJOCO_GL", "disabled")  # VMAS imports dm_control through torchrl

from fasttd3_lora.adapters import LoRALinear
from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.config import ConfigError, compose_config
from fasttd3_lora.export import export_checkpoint
from fasttd3_lora.loops.mappo import build, team_returns
from fasttd3_lora.mappo import MAPPOConfig, SeparatePolicies, adapt_lorasa, make_actor
from fasttd3_lora.mlp_policy import GaussianPolicy
from fasttd3_lora.tasks.vmas import VMASEnv

from tiny_runs import assert_same_agent, crash_and_resume, train_one_thread

# 4 envs, 20-step episodes, rollouts of 10 steps: 40 env steps per iteration, 4 iterations.
TINY = [
    "algo=mappo", "task=vmas/simple_speaker_listener", "task.max_episode_steps=20", "algo.num_envs=4",
    "algo.num_steps=10", "algo.num_epochs=2", "algo.num_minibatches=2", "algo.actor_hidden_dims=[16,16]",
    "algo.critic_hidden_dims=[16]", "total_env_steps=160", "eval_every=80", "checkpoint_every=80",
    "eval_episodes=2", "precision=fp32",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the env


def test_agents_of_different_spaces_are_padded_and_their_actions_mapped_onto_their_own_ranges() -> None:
    env = VMASEnv("vmas/simple_speaker_listener", 3, max_episode_steps=5)
    assert env.agent_names == ["speaker_0", "listener_0"]
    assert (env.obs_dims, env.act_dims, env.obs_dim, env.act_dim) == ([3, 11], [5, 2], 11, 5)
    obs, state = env.reset()
    assert obs.shape == (3, 2, 11) and bool((obs[:, 0, 3:] == 0).all())  # the speaker's 3 values, then zeros
    assert torch.equal(state, obs.flatten(-2))  # VMAS's global state: every agent's observation
    # the speaker's last 3 actions are communication in [0, 1]: -1 maps to 0, 1 to 1 (VMAS asserts the range)
    assert env.action_low[0].tolist() == [-1, -1, 0, 0, 0] and env.action_high[0].tolist() == [1] * 5
    out = env.step(-torch.ones(3, 2, 5))
    assert out.reward.shape == (3, 2) and out.obs.shape == (3, 2, 11)
    assert torch.equal(out.state, out.obs.flatten(-2)) and torch.equal(out.final_state, out.final_obs.flatten(-2))


def test_an_ended_episode_answers_its_final_and_the_next_first_observation() -> None:
    env = VMASEnv("vmas/het_mass", 4, max_episode_steps=3)
    env.set_seed(0)
    env.reset()
    actions = torch.full((4, 2, 2), 0.5)
    for step in range(1, 4):
        out = env.step(actions)
        assert bool(out.truncated.all()) == (step == 3) and not bool(out.terminated.any())
        assert torch.equal(out.obs, out.final_obs) == (step < 3)
    # het_mass observes each agent's position and velocity: the final one moving, the next episode's at rest
    assert bool((out.final_obs[..., 2] > 0).all()) and bool((out.obs[..., 2:] == 0).all())


def test_only_the_envs_whose_episode_ended_restart() -> None:
    env = VMASEnv("vmas/balance", 16, max_episode_steps=100)
    env.set_seed(0)
    env.reset()
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        out = env.step(torch.rand(16, 3, 2, generator=generator) * 2 - 1)
        if bool(out.terminated.any()) and not bool(out.terminated.all()):
            break
    ended = out.terminated  # the package fell in some envs: their episodes end (terminations), the rest go on
    assert torch.equal(out.obs[~ended], out.final_obs[~ended])
    assert not torch.equal(out.obs[ended], out.final_obs[ended])


def test_the_same_seed_replays_the_same_episode() -> None:
    def episode() -> torch.Tensor:
        env = VMASEnv("vmas/balance", 2, max_episode_steps=10)
        env.set_seed(7)
        env.reset()
        generator = torch.Generator().manual_seed(1)
        return torch.stack([env.step(torch.rand(2, 3, 2, generator=generator) * 2 - 1).reward for _ in range(10)])

    assert torch.equal(episode(), episode())


@pytest.mark.parametrize(
    ("actions", "message"),
    [(torch.zeros(2, 2, 3), r"actions must have shape \(2, 2, 2\), got \(2, 2, 3\)"),
     (torch.full((2, 2, 2), 1.5), r"actions must lie in \[-1, 1\], got min 1.5, max 1.5")],
)  # fmt: skip
def test_bad_actions_are_refused_in_one_line(actions, message) -> None:
    env = VMASEnv("vmas/het_mass", 2)
    env.reset()
    with pytest.raises(ValueError, match=message):
        env.step(actions)


def test_an_unknown_scenario_is_one_line() -> None:
    with pytest.raises(ValueError, match="vmas/no_such_scenario: not a VMAS scenario; allowed vmas/<one of .*het_mass"):
        VMASEnv("vmas/no_such_scenario", 2)


# ---------------------------------------------------------------------------------------------- actors


def test_separate_policies_send_each_row_through_its_agents_network() -> None:
    torch.manual_seed(0)
    actor = make_actor("separate", 6, 3, [8], num_agents=3, init_std=0.5)
    assert isinstance(actor, SeparatePolicies)
    obs, agent = torch.randn(20, 6), torch.arange(20) % 3
    mean, log_std = actor(obs, agent)
    for k in range(3):
        alone_mean, alone_log_std = actor.policies[k](obs[agent == k])
        # the same network on other rows: equal up to the matmul's batch-dependent rounding
        assert (mean[agent == k] - alone_mean).abs().max() <= 1e-6 and torch.equal(log_std[agent == k], alone_log_std)
        assert torch.equal(actor.merged(k).deterministic_action(obs), actor.deterministic_action(obs, k))
    restored = SeparatePolicies.from_state_dict(actor.state_dict())
    assert torch.equal(restored(obs, agent)[0], mean)


def test_lorasa_starts_as_the_shared_actor_and_trains_only_adapters_and_log_std() -> None:
    torch.manual_seed(0)
    shared = make_actor("shared", 6, 3, [8, 8], num_agents=4, init_std=0.5)
    obs, agent = torch.randn(32, 6), torch.arange(32) % 4
    before = shared(obs, agent)
    adapt_lorasa(shared, rank=2, alpha=2.0)
    after = shared(obs, agent)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])  # A = 0: the same map, exactly
    layers = [m for m in shared.mean_net.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 3 and all(layer.lora_B.abs().sum() > 0 for layer in layers)  # B Kaiming, A zero
    trainable = {name for name, p in shared.named_parameters() if p.requires_grad}
    assert trainable == {"log_std", *(f"mean_net.layers.{i}.lora_{m}" for i in range(3) for m in "AB")}


def test_lorasa_agents_diverge_once_their_adapters_move_and_each_merges_into_a_plain_network() -> None:
    torch.manual_seed(0)
    actor = make_actor("shared", 6, 3, [8, 8], num_agents=3, init_std=0.5)
    adapt_lorasa(actor, rank=2, alpha=2.0)
    with torch.no_grad():
        for layer in actor.mean_net.layers:
            layer.lora_A.normal_()
    obs, agent = torch.randn(30, 6), torch.arange(30) % 3
    mixed = actor.deterministic_action(obs, agent)
    assert not torch.allclose(actor.deterministic_action(obs, 0), actor.deterministic_action(obs, 1))
    for k in range(3):
        merged = actor.merged(k)
        assert isinstance(merged, GaussianPolicy) and merged.num_tasks == 1
        assert (merged.deterministic_action(obs[agent == k]) - mixed[agent == k]).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------------- the app


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> tuple[Path, object]:
    run_dir = tmp_path_factory.mktemp("mappo") / "shared"
    return run_dir, train_one_thread(TINY, run_dir)


def test_a_mappo_run_logs_team_returns_and_checkpoints_every_agents_state(shared_run) -> None:
    run_dir, counters = shared_run
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"surrogate_loss", "value_loss", "entropy", "kl", "episode_return", "eval_return"} <= set(columns)
    assert [r.split(",")[0] for r in rows if r.split(",")[columns.index("eval_return")]] == ["80", "160"]
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert counters.env_step == 160 and state["agent"]["num_updates"] == 4 * 2 * 2
    assert state["agent"]["actor"]["log_std"].shape == (2, 5)  # one row per agent, padded to the widest action
    assert state["meta"]["env"]["agents"][0] == {"name": "speaker_0", "obs_dim": 3, "act_dim": 5,
                                                 "low": [-1.0, -1.0, 0.0, 0.0, 0.0], "high": [1.0] * 5}  # fmt: skip
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["policy"]["mode"] == "shared" and "critic" not in saved and "library" not in saved


def test_a_resumed_mappo_run_matches_an_uninterrupted_one_bit_for_bit(shared_run, tmp_path, monkeypatch) -> None:
    whole_dir, whole = shared_run
    resumed = crash_and_resume(monkeypatch, TINY, tmp_path / "broken", 120)
    assert (resumed.env_step, resumed.last_eval_return) == (whole.env_step, whole.last_eval_return)
    assert_same_agent(whole_dir, tmp_path / "broken", ("actor", "critic", "obs_rms", "state_rms", "value_rms"))


@pytest.fixture(scope="module")
def lorasa_run(shared_run, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("mappo") / "lorasa"
    train_one_thread([*TINY, "policy=lorasa", f"policy.from={shared_run[0]}", "policy.rank=2"], run_dir)
    return run_dir


def test_lorasa_fine_tunes_a_shared_run_with_its_base_frozen(shared_run, lorasa_run) -> None:
    base_dir, _ = shared_run
    base = load_checkpoint(base_dir / "checkpoints" / "latest.pt")["agent"]
    tuned = load_checkpoint(lorasa_run / "checkpoints" / "latest.pt")["agent"]
    for i in range(3):
        assert torch.equal(tuned["actor"][f"mean_net.layers.{i}.base"], base["actor"][f"mean_net.layers.{i}.weight"])
        assert torch.equal(tuned["actor"][f"mean_net.layers.{i}.base_bias"], base["actor"][f"mean_net.layers.{i}.bias"])
        assert tuned["actor"][f"mean_net.layers.{i}.lora_A"].shape == (2, min(2, [16, 16, 5][i]), [11, 16, 16][i])
    assert bool(tuned["actor"]["mean_net.layers.0.lora_A"].abs().sum() > 0)  # the adapters moved off A = 0
    assert not torch.equal(tuned["critic"]["net.layers.0.weight"], base["critic"]["net.layers.0.weight"])


def test_a_mappo_policy_exports_with_agent_ids_and_one_model_per_agent(shared_run, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    result = export_checkpoint(shared_run[0], tmp_path / "export", num_obs=64)
    index = result.metadata["index"]
    assert index["input"] == "agent_id" and index["values"] == ["speaker_0", "listener_0"]
    assert [a["obs_dim"] for a in index["agents"]] == [3, 11] and result.max_abs_diff < 1e-5
    session = ort.InferenceSession(str(result.policy_path), providers=["CPUExecutionProvider"])
    obs = np.random.default_rng(0).normal(size=(6, 11)).astype(np.float32)
    agent = np.arange(6) % 2
    (both,) = session.run(["actions"], {"obs": obs, "agent_id": agent})
    for k, name in enumerate(index["values"]):
        alone = ort.InferenceSession(str(result.policy_path.parent / index["per_value_models"][name]),
                                     providers=["CPUExecutionProvider"])  # fmt: skip
        (own,) = alone.run(["actions"], {"obs": obs[agent == k]})
        assert np.abs(own - both[agent == k]).max() <= 1e-5


def test_the_report_names_each_policy_mode(shared_run, lorasa_run, tmp_path) -> None:
    from fasttd3_lora.report import write_report

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(shared_run[0], runs / "shared")
    shutil.copytree(lorasa_run, runs / "lorasa")
    text = write_report(runs, tmp_path / "report").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| task |"))
    assert header == "| task | mappo-lorasa | mappo-shared |"
    row = next(line for line in text.splitlines() if line.startswith("| vmas/simple_speaker_listener |"))
    shared_eval = load_checkpoint(shared_run[0] / "checkpoints" / "latest.pt")["meta"]["counters"]
    assert "(n=1)" in row and shared_eval["env_step"] == 160


@pytest.mark.parametrize("mode", ["shared", "separate", "shared-recurrent", "lorasa"])
def test_mappo_learns_to_balance_from_scratch(mode, tmp_path) -> None:
    """balance: 3 agents carry a package to a goal without dropping it; doing nothing scores about -1.5, uniform
    random actions about -13. 51,200 steps (under a minute) lift the team return far above a fresh policy's (the
    recurrent actor too, its rollouts of 25 steps cut into chunks of 5; LoRASA as phase 2 of a PS run, half the
    steps each, at equal total steps)."""
    policy, _, recurrent = mode.partition("-")
    base = ["algo=mappo", "task=vmas/balance", "precision=fp32",
            *(["algo.recurrent=true", "algo.chunk_length=5"] if recurrent else [])]  # fmt: skip
    fresh_overrides = [*base, f"policy={'shared' if policy == 'lorasa' else policy}"]
    if policy == "lorasa":
        train_one_thread([*fresh_overrides, "total_env_steps=25600"], tmp_path / "phase1")
        overrides = [*base, "policy=lorasa", f"policy.from={tmp_path / 'phase1'}", "total_env_steps=25600"]
    else:
        overrides = [*fresh_overrides, "total_env_steps=51200"]
    train_one_thread(overrides, tmp_path / mode)
    env = VMASEnv("vmas/balance", 32)
    torch.manual_seed(0)
    fresh = build(MAPPOConfig.from_hydra(compose_config(fresh_overrides)), env, torch.device("cpu"), torch.Generator().manual_seed(0))
    trained = build(MAPPOConfig.from_hydra(compose_config(overrides)), env, torch.device("cpu"), torch.Generator().manual_seed(0))
    trained.load_state_dict(load_checkpoint(tmp_path / mode / "checkpoints" / "latest.pt")["agent"])
    returns = {name: team_returns(agent, env, seed=123).mean().item()
               for name, agent in (("start", fresh), ("end", trained))}  # fmt: skip
    assert returns["end"] > returns["start"] + 15.0, returns


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["policy=lorasa"], r"policy.from=\?\?\?: policy=lorasa fine-tunes a phase-1 run of policy=shared; give its run directory"),
        (["policy.from=/somewhere"], "policy.from=/somewhere: only policy=lorasa starts from a run"),
        (["policy.mode=mixed"], "policy.mode='mixed': allowed one of shared, separate, lorasa"),
        (["policy=lorasa", "policy.from=/x", "policy.rank=0"], "policy.rank=0: allowed an integer >= 1"),
        (["algo.value_loss=l1"], "algo.value_loss='l1': allowed one of mse, huber"),
        (["task=dmc/cartpole-balance"], "task.family=.dmc.: mappo runs vmas, mamujoco and isaaclab_marl tasks only"),
    ],
)  # fmt: skip
def test_bad_mappo_values_are_one_line_config_errors(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config([*TINY, *overrides])


def test_lorasa_from_a_run_that_is_not_a_shared_mappo_run_is_refused(tmp_path) -> None:
    separate = tmp_path / "separate"
    train_one_thread([*TINY, "policy=separate", "total_env_steps=40"], separate)
    with pytest.raises(ConfigError, match=f"policy.from={separate}: LoRASA's phase 2 starts from a policy=shared"):
        train_one_thread([*TINY, "policy=lorasa", f"policy.from={separate}"], tmp_path / "lorasa")
    with pytest.raises(ConfigError, match=f"^policy.from={tmp_path / 'nowhere'}: no such run directory or checkpoint file$"):
        train_one_thread([*TINY, "policy=lorasa", f"policy.from={tmp_path / 'nowhere'}"], tmp_path / "lorasa2")


# ---------------------------------------------------------------------------------------------- the experiment


def test_the_lorasa_experiment_starts_lorasa_from_ps_at_the_half_and_reports_equal_total_steps(tmp_path) -> None:
    from fasttd3_lora.experiments.lorasa import commands, report

    tiny = [o for o in TINY if not o.startswith(("algo=", "task=", "total_env_steps"))]
    first, second = commands(tmp_path, "vmas/simple_speaker_listener", 160, [0], tiny)
    assert [run.name for run, _ in first] == ["shared_s0", "separate_s0"] and [run.name for run, _ in second] == ["lorasa_s0"]
    shared_dir = first[0][0]
    assert f"policy.from={shared_dir / 'checkpoints' / 'step_80.pt'}" in second[0][1] and "total_env_steps=80" in second[0][1]
    with pytest.raises(ConfigError, match=r"--steps 120: its half must be a multiple of eval_every \(80\)"):
        commands(tmp_path, "vmas/simple_speaker_listener", 120, [0], tiny)
    # the grid's runs, made in this process (the command lines above, less the interpreter)
    for run_dir, command in (*first, *second):
        overrides = [o for o in command[3:] if not o.startswith(("hydra.", "threads="))]
        train_one_thread(overrides, run_dir)
    table = report(tmp_path)
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| vmas/")}
    assert set(rows) == {"PS (shared)", "NPS (separate)", "LoRASA (from PS at the half)"}
    lorasa_actor = load_checkpoint(second[0][0] / "checkpoints" / "latest.pt")["agent"]["actor"]
    adapter_numbers = sum(v.numel() for k, v in lorasa_actor.items() if ".lora_" in k) + lorasa_actor["log_std"].numel()
    assert f"| {adapter_numbers:,} |" in rows["LoRASA (from PS at the half)"]
    curve = (tmp_path / "lorasa_curves_vmas-simple_speaker_listener.csv").read_text().splitlines()
    assert "LoRASA (from PS at the half),160," in "\n".join(curve)  # its 80 steps after PS's 80
    assert (tmp_path / "lorasa_vmas-simple_speaker_listener.png").stat().st_size > 0
