"""The recurrent actor (fasttd3_lora/recurrent.py) and MAPPO's `algo.recurrent=true`: the GRU cell against
PyTorch's, LoRASA's adapters on the GRU's maps (a zero adapter is the shared actor, adapters merge per agent),
separate recurrent policies, state dicts, the chunked recompute of truncated BPTT against the rollout's own
log-probabilities, whole runs (exact resume, LoRASA from a recurrent run, export with hidden-state I/O checked in
onnxruntime) and the one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("vmas")
os.environ.setdefault("MUJOCO_GL", "disabled")  # VMAS imports dm_control through torchrl

from fasttd3_lora import gaussian
from fasttd3_lora.adapters import LoRALinear
from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.config import ConfigError, compose_config
from fasttd3_lora.export import export_checkpoint
from fasttd3_lora.loops.mappo import build, team_returns
from fasttd3_lora.mappo import MAPPOConfig, SeparatePolicies, adapt_lorasa, make_actor, policy_from_state_dict
from fasttd3_lora.recurrent import GRUCell, RecurrentGaussianPolicy, reset_hidden, unroll
from fasttd3_lora.tasks.vmas import VMASEnv

from test_mappo import TINY
from tiny_runs import assert_same_agent, crash_and_resume, train_one_thread

RECURRENT = [*TINY, "algo.recurrent=true", "algo.rnn_hidden_dim=8", "algo.rnn_after_dims=[6]", "algo.chunk_length=5"]


# ---------------------------------------------------------------------------------------------- the actor


@settings(max_examples=30, deadline=None)
@given(in_dim=st.integers(1, 7), hidden=st.integers(1, 7), batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_the_gru_cell_computes_pytorchs_gru_cell(in_dim, hidden, batch, seed) -> None:
    torch.manual_seed(seed)
    ours, theirs = GRUCell(in_dim, hidden), nn.GRUCell(in_dim, hidden)
    with torch.no_grad():
        theirs.weight_ih.copy_(ours.input_map.weight)
        theirs.bias_ih.copy_(ours.input_map.bias)
        theirs.weight_hh.copy_(ours.hidden_map.weight)
        theirs.bias_hh.copy_(ours.hidden_map.bias)
    x, h = torch.randn(batch, in_dim), torch.randn(batch, hidden)
    assert (ours(x, h) - theirs(x, h)).abs().max() <= 1e-6


def test_an_episode_start_zeroes_exactly_its_rows_state() -> None:
    hidden = torch.randn(4, 3, 5)  # (envs, agents, H)
    first = torch.tensor([True, False, True, False])
    out = reset_hidden(hidden, first)
    assert bool((out[first] == 0).all()) and torch.equal(out[~first], hidden[~first])


def _sequence(actor: nn.Module, obs: torch.Tensor, agent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and final hidden states of `actor` over (L, B, D) observations from zero states."""
    hidden, means = None, []
    for t in range(obs.shape[0]):
        mean, _, hidden = actor(obs[t], agent, hidden)
        means.append(mean)
    return torch.stack(means), hidden


def test_lorasa_adapts_every_map_of_a_recurrent_actor_and_a_zero_adapter_is_the_shared_actor() -> None:
    torch.manual_seed(0)
    actor = make_actor("shared", 6, 3, [8, 8], num_agents=3, init_std=0.5, rnn_dim=5, after_dims=[7])
    obs, agent = torch.randn(4, 12, 6), torch.arange(12) % 3
    before = _sequence(actor, obs, agent)
    adapt_lorasa(actor, rank=2, alpha=2.0)
    after = _sequence(actor, obs, agent)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])  # A = 0: the same maps, exactly
    maps = [*actor.trunk.layers, actor.gru.input_map, actor.gru.hidden_map, *actor.head.layers]
    assert all(isinstance(m, LoRALinear) for m in maps) and len(maps) == 6  # the layer after the GRU too
    trainable = {p for p in actor.parameters() if p.requires_grad}
    assert trainable == {actor.log_std, *(p for m in maps for p in (m.lora_A, m.lora_B))}


def test_moved_recurrent_adapters_send_each_agent_its_own_way_and_merge_into_plain_policies() -> None:
    torch.manual_seed(1)
    actor = make_actor("shared", 6, 3, [8], num_agents=3, init_std=0.5, rnn_dim=5)
    adapt_lorasa(actor, rank=2, alpha=2.0)
    with torch.no_grad():
        for layer in [m for m in actor.modules() if isinstance(m, LoRALinear)]:
            layer.lora_A.normal_()
    obs, agent = torch.randn(4, 12, 6), torch.arange(12) % 3
    means, hidden = _sequence(actor, obs, agent)
    assert not torch.allclose(_sequence(actor, obs, 0)[0], _sequence(actor, obs, 1)[0])
    for k in range(3):
        merged = actor.merged(k)
        assert isinstance(merged, RecurrentGaussianPolicy) and merged.num_tasks == 1
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        own_means, own_hidden = _sequence(merged, obs[:, agent == k], None)
        assert (own_means - means[:, agent == k]).abs().max() <= 1e-5
        assert (own_hidden - hidden[agent == k]).abs().max() <= 1e-5


def test_separate_recurrent_policies_carry_each_rows_state_through_its_agents_network() -> None:
    torch.manual_seed(2)
    actor = make_actor("separate", 6, 3, [8], num_agents=3, init_std=0.5, rnn_dim=4)
    assert isinstance(actor, SeparatePolicies) and actor.rnn_dim == 4
    obs, agent = torch.randn(3, 12, 6), torch.arange(12) % 3
    means, hidden = _sequence(actor, obs, agent)
    for k in range(3):
        own_means, own_hidden = _sequence(actor.policies[k], obs[:, agent == k], None)
        assert (own_means - means[:, agent == k]).abs().max() <= 1e-6
        assert (own_hidden - hidden[agent == k]).abs().max() <= 1e-6
    action, next_hidden = actor.deterministic_action(obs[0], agent)
    assert bool((action.abs() <= 1).all()) and next_hidden.shape == (12, 4)
    restored = SeparatePolicies.from_state_dict(actor.state_dict())
    assert torch.equal(_sequence(restored, obs, agent)[0], means)


@pytest.mark.parametrize("adapted", [False, True])
def test_a_recurrent_state_dict_rebuilds_the_same_policy(adapted) -> None:
    torch.manual_seed(3)
    actor = make_actor("shared", 5, 2, [7, 6], num_agents=2, init_std=0.3, rnn_dim=4, after_dims=[3, 5])
    if adapted:
        adapt_lorasa(actor, rank=3, alpha=3.0)
        with torch.no_grad():
            actor.gru.hidden_map.lora_A.normal_()
    restored = policy_from_state_dict(actor.state_dict(), alpha=3.0 if adapted else None)
    assert isinstance(restored, RecurrentGaussianPolicy) and (restored.rnn_dim, restored.after_dims) == (4, (3, 5))
    obs, agent = torch.randn(3, 6, 5), torch.arange(6) % 2
    assert torch.equal(_sequence(restored, obs, agent)[0], _sequence(actor, obs, agent)[0])


# ---------------------------------------------------------------------------------------------- the update


def test_the_chunked_recompute_reproduces_the_rollouts_log_probabilities_across_episode_starts() -> None:
    """Episodes of 7 steps in chunks of 5: chunks start mid-episode (their stored state) and hold episode
    starts (the state zeroed there); recomputing from the stored states gives the rollout's log-probabilities."""
    cfg = MAPPOConfig.from_hydra(compose_config(RECURRENT))
    env = VMASEnv("vmas/het_mass", 3, max_episode_steps=7)
    agent = build(cfg, env, torch.device("cpu"), torch.Generator().manual_seed(0))
    env.set_seed(0)
    obs, state = env.reset()
    hidden, first, steps = agent.initial_hidden(3), torch.ones(3, dtype=torch.bool), []
    for _ in range(20):
        out = agent.explore(obs, state, hidden, first)
        result = env.step(out["action"].clamp(-1.0, 1.0))
        hidden, first = out.pop("next_hidden"), result.terminated | result.truncated
        steps.append(out)
        obs, state = result.obs, result.state
    chunks = agent.chunks(torch.stack(steps))
    assert chunks.batch_size == (12, 5) and bool(chunks["first"][:, 1:].any())  # starts inside chunks
    assert bool(chunks["hidden"][:, 0].abs().sum(-1).gt(0).any())  # chunks that start mid-episode
    with torch.no_grad():
        mean, log_std = agent.recompute(chunks)
        log_prob = gaussian.log_prob(chunks["action"].flatten(0, -2), mean, log_std)
        assert (log_prob - chunks["log_prob"].flatten()).abs().max() <= 1e-5
        ignored = chunks.clone()
        ignored["first"].zero_()  # what a recompute that forgets the episode starts would give
        wrong = gaussian.log_prob(chunks["action"].flatten(0, -2), *agent.recompute(ignored))
        assert (wrong - chunks["log_prob"].flatten()).abs().max() > 1e-3


def test_unroll_starts_from_the_stored_state() -> None:
    torch.manual_seed(4)
    policy = RecurrentGaussianPolicy(3, 2, [4], 5)
    obs, hidden = torch.randn(3, 2, 3), torch.randn(2, 5)
    mean, _ = unroll(policy, obs, torch.zeros(3, 2, dtype=torch.bool), hidden)
    fresh, _ = unroll(policy, obs, torch.zeros(3, 2, dtype=torch.bool), torch.zeros(2, 5))
    assert torch.equal(mean[0], policy(obs[0], None, hidden)[0]) and not torch.allclose(mean, fresh)


# ---------------------------------------------------------------------------------------------- the app


@pytest.fixture(scope="module")
def recurrent_run(tmp_path_factory) -> tuple[Path, object]:
    run_dir = tmp_path_factory.mktemp("mappo_gru") / "shared"
    return run_dir, train_one_thread(RECURRENT, run_dir)


def test_a_recurrent_mappo_run_saves_a_gru_actor_and_resumes_bit_for_bit(recurrent_run, tmp_path, monkeypatch) -> None:
    whole_dir, whole = recurrent_run
    actor = load_checkpoint(whole_dir / "checkpoints" / "latest.pt")["agent"]["actor"]
    assert actor["gru.hidden_map.weight"].shape == (24, 8)
    assert actor["head.layers.0.weight"].shape == (6, 8) and actor["head.layers.1.weight"].shape == (5, 6)
    resumed = crash_and_resume(monkeypatch, RECURRENT, tmp_path / "broken", 120)
    assert (resumed.env_step, resumed.last_eval_return) == (whole.env_step, whole.last_eval_return)
    assert_same_agent(whole_dir, tmp_path / "broken", ("actor", "critic", "obs_rms", "state_rms", "value_rms"))


def test_lorasa_fine_tunes_a_recurrent_shared_run_through_the_grus_maps(recurrent_run, tmp_path) -> None:
    base = load_checkpoint(recurrent_run[0] / "checkpoints" / "latest.pt")["agent"]["actor"]
    run_dir = tmp_path / "lorasa"
    train_one_thread([*RECURRENT, "policy=lorasa", f"policy.from={recurrent_run[0]}", "policy.rank=2"], run_dir)
    tuned = load_checkpoint(run_dir / "checkpoints" / "latest.pt")["agent"]["actor"]
    for name in ("trunk.layers.0", "gru.input_map", "gru.hidden_map", "head.layers.0", "head.layers.1"):
        assert torch.equal(tuned[f"{name}.base"], base[f"{name}.weight"])
        assert tuned[f"{name}.lora_A"].shape[0] == 2 and bool(tuned[f"{name}.lora_A"].abs().sum() > 0)


def test_a_recurrent_policy_exports_with_its_hidden_state_as_input_and_output(recurrent_run, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    run_dir = recurrent_run[0]
    result = export_checkpoint(run_dir, tmp_path / "export", num_obs=64)
    state = result.metadata["model"]["recurrent_state"]
    assert (state["input"], state["output"], state["shape"]) == ("hidden", "next_hidden", ["batch", 8])
    assert result.max_abs_diff < 1e-5
    # the exported model stepped through an episode is the training agent's deterministic evaluation
    cfg = MAPPOConfig.from_hydra(compose_config(RECURRENT))
    env = VMASEnv("vmas/simple_speaker_listener", 3, max_episode_steps=20)
    agent = build(cfg, env, torch.device("cpu"), torch.Generator().manual_seed(0))
    agent.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "latest.pt")["agent"])
    session = ort.InferenceSession(str(result.policy_path), providers=["CPUExecutionProvider"])
    env.set_seed(5)
    obs, _ = env.reset()
    hidden, onnx_hidden = None, np.zeros((6, 8), np.float32)
    agent_id = np.tile(np.arange(2), 3)
    for _ in range(6):
        actions, hidden = agent.act(obs, hidden, deterministic=True)
        onnx_actions, onnx_hidden = session.run(["actions", "next_hidden"], {
            "obs": obs.flatten(0, 1).numpy(), "agent_id": agent_id, "hidden": onnx_hidden})  # fmt: skip
        mask = agent.action_mask[torch.as_tensor(agent_id)].numpy()  # an agent's padded actions are not its own
        assert np.abs(onnx_actions * mask - actions.flatten(0, 1).numpy()).max() <= 1e-5
        assert np.abs(onnx_hidden - hidden.flatten(0, 1).numpy()).max() <= 1e-5
        obs = env.step(actions).obs
    per_agent = result.metadata["index"]["per_value_models"]["listener_0"]
    alone = ort.InferenceSession(str(result.policy_path.parent / per_agent), providers=["CPUExecutionProvider"])
    assert [i.name for i in alone.get_inputs()] == ["obs", "hidden"]


def test_separate_recurrent_policies_export_with_their_state(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    run_dir = tmp_path / "separate"
    train_one_thread([*RECURRENT, "policy=separate", "total_env_steps=40"], run_dir)
    result = export_checkpoint(run_dir, tmp_path / "export", num_obs=32)  # checked over 3 steps in onnxruntime
    assert result.metadata["actor"] == "SeparatePolicies" and result.max_abs_diff < 1e-5
    session = ort.InferenceSession(str(result.policy_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["obs", "agent_id", "hidden"]
    assert [o.name for o in session.get_outputs()] == ["actions", "next_hidden"]


def test_team_returns_carry_the_hidden_state_and_differ_from_a_stateless_evaluation(recurrent_run) -> None:
    """An evaluation that forgets the state (a fresh zero state every step) is another policy: the team returns
    of the same trained actor differ, so `team_returns` is carrying the state along."""
    cfg = MAPPOConfig.from_hydra(compose_config(RECURRENT))
    env = VMASEnv("vmas/simple_speaker_listener", 4, max_episode_steps=20)
    agent = build(cfg, env, torch.device("cpu"), torch.Generator().manual_seed(0))
    agent.load_state_dict(load_checkpoint(recurrent_run[0] / "checkpoints" / "latest.pt")["agent"])
    carried = team_returns(agent, env, seed=3)
    forgetful = agent.act
    agent.act = lambda obs, hidden, deterministic: forgetful(obs, None, deterministic)  # type: ignore[method-assign]
    assert not torch.allclose(carried, team_returns(agent, env, seed=3))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.chunk_length=3"], r"algo.chunk_length=3: a recurrent actor's rollout of algo.num_steps=10 steps must cut into whole chunks"),
        (["algo.chunk_length=0"], "algo.chunk_length=0: allowed an integer >= 1"),
        (["algo.recurrent=maybe"], "algo.recurrent='maybe'"),
        (["algo.num_minibatches=9"], r"algo.num_minibatches=9: a rollout holds 8 chunks"),
        (["algo.rnn_after_dims=[0]"], r"algo.rnn_after_dims=\[0\]: allowed a list of integers >= 1"),
    ],
)  # fmt: skip
def test_bad_recurrent_values_are_one_line_config_errors(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config([*RECURRENT, *overrides])


def test_lorasa_refuses_a_phase_one_run_of_the_other_actor_kind(recurrent_run, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"its actor has algo.recurrent=True, this run asks for False"):
        train_one_thread([*TINY, "policy=lorasa", f"policy.from={recurrent_run[0]}"], tmp_path / "lorasa")
