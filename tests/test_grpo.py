"""Group-relative fine-tuning (fasttd3_lora/grpo.py, fasttd3_lora/loops/grpo.py): the advantage, the policy views of
the three actors this stack trains, and tiny runs through the app from a PPO, a SAC and a FastTD3 run (drift
metrics, the KL penalty, export, exact resume, one-line errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora.adapters import LoRALinear
from fasttd3_lora.checkpoint import load_checkpoint
from fasttd3_lora.config import ConfigError, compose_config, expand_shorthands
from fasttd3_lora.export import export_checkpoint
from fasttd3_lora.grpo import GaussianView, adapt, drift_metrics, group_advantages
from fasttd3_lora.mlp_policy import GaussianPolicy
from fasttd3_lora.networks import DeterministicActor, TanhGaussianActor
from fasttd3_lora.tasks.dmc import DMCEnv

from tiny_runs import SMALL_NETS, assert_same_agent, crash_and_resume, train_one_thread

TASK = ["task=dmc/cartpole-balance", "task.max_episode_steps=20", "precision=fp32"]
SOURCES = {
    "ppo": ["algo=ppo", "algo.action_repeat=1", "algo.num_envs=4", "algo.num_steps=10", "algo.num_minibatches=2",
            "algo.actor_hidden_dims=[16,16]", "algo.critic_hidden_dims=[16]", "total_env_steps=80"],
    "sac": ["algo.action_repeat=1", "algo.learning_starts=10", "algo.batch_size=16", "total_env_steps=40",
            *SMALL_NETS],
    "fasttd3": ["algo=fasttd3", "algo.action_repeat=1", "algo.num_envs=2", "algo.batch_size=16", "algo.buffer_size=32",
                "algo.n_step=1", "total_env_steps=40", *SMALL_NETS],
}  # fmt: skip
CADENCE = ["eval_every=1000", "checkpoint_every=1000", "eval_episodes=2"]
# 8 envs in groups of 4, 20-step episodes: 160 env steps per iteration, 3 iterations
GRPO = ["algo=grpo", "algo.num_envs=8", "grpo.group_size=4", "grpo.num_minibatches=2", "grpo.num_epochs=2",
        "grpo.drift_states=64", "grpo.lr=3e-3", "total_env_steps=480", "eval_every=320", "checkpoint_every=320",
        "eval_episodes=2", *TASK]  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    for name, overrides in SOURCES.items():
        train_one_thread([*overrides, *TASK, *CADENCE], root / name)
    return {name: root / name for name in SOURCES}


# --- pieces ----------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), groups=st.integers(1, 6), size=st.integers(2, 8), a=st.floats(0.1, 10.0),
       b=st.floats(-100.0, 100.0))  # fmt: skip
def test_group_advantages_are_standardised_within_each_group_and_affine_invariant(seed, groups, size, a, b):
    returns = torch.randn(groups * size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    adv = group_advantages(returns, size).view(groups, size)
    assert torch.allclose(adv.mean(-1), torch.zeros(groups, dtype=torch.float64), atol=1e-9)
    spread = returns.view(groups, size).std(-1, correction=0)
    assert torch.allclose(adv.std(-1, correction=0), spread / (spread + 1e-8), atol=1e-6)  # 1 unless all but equal
    # affine invariance is exact without the eps (with it, a group whose spread is near eps / a moves by ~eps / std)
    exact = group_advantages(returns, size, eps=0.0)
    assert torch.allclose(group_advantages(a * returns + b, size, eps=0.0), exact, atol=1e-6)
    assert torch.equal(group_advantages(torch.full((size,), 3.0), size), torch.zeros(size))  # no signal, no push


ACTORS = {"ppo": lambda: GaussianPolicy(5, 2, [16]), "sac": lambda: TanhGaussianActor(5, 2, 16, 1),
          "fasttd3": lambda: DeterministicActor(5, 2, 16, 1)}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(ACTORS))
@pytest.mark.parametrize("rank", [2, None])
def test_every_actor_becomes_a_gaussian_that_starts_at_its_reference(kind, rank):
    view = GaussianView(ACTORS[kind](), init_std=0.2)
    reference = GaussianView(ACTORS[kind](), init_std=0.2)
    reference.load_state_dict(view.state_dict())
    adapt(view, rank, None)
    obs = torch.randn(32, 5)
    drift = drift_metrics(view, reference, obs)
    assert drift["kl_ref"] == 0 and drift["dW"] == 0  # B = 0 (LoRA) or no step yet (full): the reference exactly
    actions = view.deterministic_action(obs)
    assert actions.shape == (32, 2) and actions.abs().max() <= 1
    trained = [p for p in view.parameters() if p.requires_grad]
    if rank is None:
        assert kind != "ppo" or not view.actor.log_std.requires_grad  # the std stays the reference's
        assert len(trained) > 0
    else:
        adapted = [m for m in view.modules() if isinstance(m, LoRALinear)]
        assert adapted and {id(p) for p in trained} == {id(p) for m in adapted for p in (m.lora_A, m.lora_B)}
    _, log_std = view(obs)
    assert torch.isfinite(log_std).all()


def test_a_group_of_envs_starts_from_one_state_and_groups_differ():
    with DMCEnv("dmc/walker-walk", 6, seed=3, group_size=3, num_workers=0) as env:
        obs = env.reset()["observation"]
    assert torch.equal(obs[0], obs[1]) and torch.equal(obs[0], obs[2]) and torch.equal(obs[3], obs[5])
    assert not torch.equal(obs[0], obs[3])


# --- through the app -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["ppo", "sac", "fasttd3"])
def test_grpo_fine_tunes_each_kind_of_actor_and_measures_its_drift(sources, source, tmp_path):
    run_dir = tmp_path / "run"
    counters = train_one_thread([*GRPO, f"grpo.from={sources[source]}", "grpo.rank=2"], run_dir)
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"kl_ref", "kl_ref_max", "dW", "update_s", "surrogate_loss", "episode_return"} <= set(columns)
    assert "kl_penalty" not in columns  # KL-free: the reference is never evaluated in an update
    assert counters.env_step == 480
    drift = [float(r.split(",")[columns.index("kl_ref")]) for r in rows if r.split(",")[columns.index("kl_ref")]]
    assert len(drift) == 3 and drift[-1] > 0
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert state["meta"]["source"]["config"]["algo"]["name"] == source
    result = export_checkpoint(run_dir, tmp_path / "export", num_obs=64)
    assert result.metadata["algo"] == "grpo" and result.max_abs_diff < 1e-4


def test_the_kl_penalty_is_logged_and_holds_the_policy_closer(sources, tmp_path):
    free = train_one_thread([*GRPO, f"grpo.from={sources['ppo']}", "grpo.rank=full"], tmp_path / "free")
    held = train_one_thread([*GRPO, f"grpo.from={sources['ppo']}", "grpo.rank=full", "grpo.kl_coef=100"], tmp_path / "held")
    assert free.env_step == held.env_step

    def last(run: Path, key: str) -> float:
        header, *rows = (run / "metrics.csv").read_text().splitlines()
        column = header.split(",").index(key)
        return [float(r.split(",")[column]) for r in rows if r.split(",")[column]][-1]

    assert last(tmp_path / "held", "kl_penalty") >= 0
    assert last(tmp_path / "held", "kl_ref") < last(tmp_path / "free", "kl_ref")


def test_resumed_grpo_run_matches_an_uninterrupted_one_bit_for_bit(sources, tmp_path, monkeypatch):
    overrides = [*GRPO, f"grpo.from={sources['ppo']}", "grpo.rank=2"]
    whole = train_one_thread(overrides, tmp_path / "whole")
    resumed = crash_and_resume(monkeypatch, overrides, tmp_path / "broken", 480)  # after the checkpoint at 320
    assert resumed.last_eval_return == whole.last_eval_return
    assert_same_agent(tmp_path / "whole", tmp_path / "broken", ("actor",))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "grpo.from=None: allowed a run directory"),
        (["grpo.from=/no/such/run"], "^grpo.from=/no/such/run: no such run directory or checkpoint file$"),
        (["algo.num_envs=6"], "algo.num_envs=6: allowed a multiple of algo.group_size"),
        (["grpo.group_size=1"], "algo.group_size=1: allowed an integer >= 2"),
        (["grpo.rank=0"], "algo.rank=0: allowed an integer >= 1 or full"),
        (["task=Isaac-Velocity-Flat-H1-v0"], "grpo runs dmc and metaworld tasks only"),
        (["task.spread_starts=true"], "^task.spread_starts=true: a group-relative run starts each group's episodes"),
    ],
)  # fmt: skip
def test_bad_grpo_input_is_one_line(sources, overrides, message):
    base = [o for o in GRPO if not o.startswith("task")] + ["task=dmc/cartpole-balance", "precision=fp32"]
    if overrides[:1] != [] and not any(o.startswith("grpo.from") for o in overrides):
        base.append(f"grpo.from={sources['ppo']}")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose_config(expand_shorthands([*base, *overrides]))


def test_an_actor_of_another_embodiment_is_refused_in_one_line(sources, tmp_path):
    with pytest.raises(ConfigError, match=r"its actor takes 5 observations and 1 actions \(dmc/cartpole-balance\); "
                                          r"this task has 24 and 6"):  # fmt: skip
        train_one_thread([*GRPO, f"grpo.from={sources['ppo']}", "task=dmc/walker-walk"], tmp_path / "run")
