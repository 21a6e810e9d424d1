"""FastTD3 (DESIGN §2, §3, §6): no target actor, actor objective switch, projections, LoRA base and decay group,
cosine LR, per-env exploration scales, grad_sync placement, exact resume, compiled == eager without recompiles on
LR changes, config mapping with task-family overrides, and a learning smoke test."""

from __future__ import annotations

import io

import pytest
import torch
from hydra import compose, initialize_config_module
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import open_dict
from tensordict import TensorDict

from fasttd3_lora.distributional import categorical_projection, select_min_target
from fasttd3_lora.fasttd3 import FastTD3, FastTD3Config, actor_loss, cosine_lr, critic_loss, target_action
from fasttd3_lora.hypersphere import Projected
from fasttd3_lora.lora import SphericalLoRALinear
from fasttd3_lora.networks import DeterministicActor, lora_parameters, make_critic, non_lora_parameters

OBS, ACT, CRITIC_OBS, ENVS, N = 3, 2, 5, 4, 16
LORA_FIELDS = dict(
    lora_rank=4, lora_alpha=4.0, lora_base_init_scale=0.5, lora_project=True, lora_use_base=True,
    lora_base_rank=None, warmup_fraction=0.0,
)  # fmt: skip


def make_cfg(kind: str = "lora", **overrides) -> FastTD3Config:
    fields = dict(
        num_envs=ENVS, action_repeat=1, updates_per_step=2, batch_size=N, buffer_size=64, n_step=3,
        learning_starts=0, gamma=0.9, tau=0.1, lr_init=1e-3, lr_final=1e-4, num_atoms=11, v_min=-5.0, v_max=5.0,
        num_critics=2, policy_frequency=2, policy_noise=0.2, noise_clip=0.3, std_min=0.001, std_max=0.4,
        std_anneal=False, use_cdq=True, actor_q="mean", lora_weight_decay=1e-2, actor_hidden_dim=8, actor_num_blocks=1,
        amp_bf16=False, compile_mode=None, critic_kind=kind, critic_hidden_dim=8, critic_num_blocks=1, sparsity=0.5,
    )  # fmt: skip
    fields.update(LORA_FIELDS if kind == "lora" else {k: None for k in LORA_FIELDS})
    fields.update(overrides)
    return FastTD3Config(**fields)


def make_agent(cfg: FastTD3Config, total_updates: int = 100, seed: int = 0, asym: bool = True, **kw) -> FastTD3:
    torch.manual_seed(seed)
    return FastTD3(cfg, OBS, ACT, CRITIC_OBS if asym else None, cfg.num_envs, total_updates, "cpu",
                   torch.Generator().manual_seed(seed), **kw)  # fmt: skip


def random_batch(n: int = N, seed: int = 1, asym: bool = True) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    d = dict(
        observation=torch.randn(n, OBS, generator=g) * 2 + 1,
        action=torch.rand(n, ACT, generator=g) * 2 - 1,
        reward=torch.randn(n, generator=g),
        next_observation=torch.randn(n, OBS, generator=g) * 2 + 1,
        discount=torch.where(torch.rand(n, generator=g) < 0.3, 0.0, 0.81),
    )
    if asym:
        d["critic_observation"] = torch.randn(n, CRITIC_OBS, generator=g)
        d["next_critic_observation"] = torch.randn(n, CRITIC_OBS, generator=g)
    return TensorDict(d, batch_size=[n])


def warm_stats(agent: FastTD3) -> None:
    g = torch.Generator().manual_seed(7)
    critic_obs = torch.randn(64, CRITIC_OBS, generator=g) * 3 if agent.critic_obs_rms is not None else None
    agent.record(torch.randn(64, OBS, generator=g) * 2 + 1, critic_obs)


def row_norms(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([m.effective_weight().detach().norm(dim=-1).flatten() for m in net.modules() if isinstance(m, Projected)])


# ------------------------------------------------------------------------------------------------ losses


def test_target_actions_come_from_the_online_actor_plus_clipped_noise() -> None:
    torch.manual_seed(0)
    actor = DeterministicActor(OBS, ACT, 8, 1)
    next_obs, noise = torch.randn(N, OBS), torch.randn(N, ACT) * 3
    got = target_action(actor, next_obs, noise, policy_noise=0.2, noise_clip=0.3)
    want = (actor(next_obs) + (0.2 * noise).clamp(-0.3, 0.3)).clamp(-1, 1)
    torch.testing.assert_close(got, want)
    assert ((got - actor(next_obs)).abs() <= 0.3 + 1e-6).all()  # the clip bites: |0.2 * noise| reaches 0.6+


def test_critic_loss_target_uses_online_actor_min_target_and_per_sample_discount() -> None:
    torch.manual_seed(0)
    critic = make_critic("simbav2", CRITIC_OBS, ACT, 8, 1, 11, -5.0, 5.0, num_critics=2)
    target_critic = make_critic("simbav2", CRITIC_OBS, ACT, 8, 1, 11, -5.0, 5.0, num_critics=2)
    actors = [DeterministicActor(OBS, ACT, 8, 1) for _ in range(2)]
    b = random_batch()
    noise = torch.randn(N, ACT)
    args = (b["critic_observation"], b["action"], b["reward"], b["next_observation"], b["next_critic_observation"],
            b["discount"], noise, 0.2, 0.3)  # fmt: skip
    loss, q = critic_loss(critic, target_critic, actors[0], *args)
    a_next = target_action(actors[0], b["next_observation"], noise, 0.2, 0.3)
    probs = select_min_target(target_critic(b["next_critic_observation"], a_next), critic.atoms)
    target = categorical_projection(probs, b["reward"], b["discount"], critic.atoms)
    logits = critic(b["critic_observation"], b["action"])
    want = -(target * torch.log_softmax(logits, -1)).sum(-1).mean(-1).sum()
    torch.testing.assert_close(loss, want)
    assert q.shape == (2, N)
    # a different online actor gives a different target: the actor in the target is the online one, not a copy
    assert not torch.isclose(critic_loss(critic, target_critic, actors[1], *args)[0], loss)
    # terminated samples (discount 0) ignore s' entirely: their target is the reward's atoms alone
    zero = torch.zeros(N)
    t0 = categorical_projection(probs, b["reward"], zero, critic.atoms)
    t1 = categorical_projection(torch.softmax(torch.randn(N, 11), -1), b["reward"], zero, critic.atoms)
    torch.testing.assert_close(t0, t1)


def test_without_clipped_double_q_each_critic_learns_its_own_target() -> None:
    torch.manual_seed(0)
    critic = make_critic("simbav2", CRITIC_OBS, ACT, 8, 1, 11, -5.0, 5.0, num_critics=2)
    target_critic = make_critic("simbav2", CRITIC_OBS, ACT, 8, 1, 11, -5.0, 5.0, num_critics=2)
    actor = DeterministicActor(OBS, ACT, 8, 1)
    b = random_batch()
    noise = torch.randn(N, ACT)
    args = (b["critic_observation"], b["action"], b["reward"], b["next_observation"], b["next_critic_observation"],
            b["discount"], noise, 0.2, 0.3)  # fmt: skip
    loss, _ = critic_loss(critic, target_critic, actor, *args, use_cdq=False)
    next_logits = target_critic(b["next_critic_observation"], target_action(actor, b["next_observation"], noise, 0.2, 0.3))
    logits = critic(b["critic_observation"], b["action"])
    want = 0.0
    for e in range(2):  # critic e against the projection of target critic e's own distribution
        target = categorical_projection(torch.softmax(next_logits[e], -1), b["reward"], b["discount"], critic.atoms)
        want = want - (target * torch.log_softmax(logits[e], -1)).sum(-1).mean()
    torch.testing.assert_close(loss, want)
    assert not torch.isclose(loss, critic_loss(critic, target_critic, actor, *args, use_cdq=True)[0])


@pytest.mark.parametrize(("use_cdq", "actor_q", "expected"), [(True, None, "min"), (False, None, "mean"),
                                                                (True, "mean", "mean")])  # fmt: skip
def test_the_actor_objective_follows_the_target_mode_unless_set(use_cdq, actor_q, expected) -> None:
    assert make_agent(make_cfg(use_cdq=use_cdq, actor_q=actor_q)).actor_q == expected


@pytest.mark.parametrize("actor_q", ["mean", "min"])
def test_actor_objective_uses_mean_or_min_of_the_twin_critics(actor_q: str) -> None:
    torch.manual_seed(0)
    actor = DeterministicActor(OBS, ACT, 8, 1)
    critic = make_critic("simbav2", OBS, ACT, 8, 1, 11, -5.0, 5.0, num_critics=2)
    obs = torch.randn(N, OBS)
    q = critic.q_value(critic(obs, actor(obs)))
    assert (q[0] - q[1]).abs().max() > 1e-3  # the two critics disagree, so mean and min differ
    want = -(q.mean(0) if actor_q == "mean" else q.min(0).values).mean()
    torch.testing.assert_close(actor_loss(actor, critic, obs, obs, actor_q), want)


def test_cosine_lr_endpoints_and_midpoint() -> None:
    assert cosine_lr(0, 1000, 3e-4, 3e-5) == 3e-4
    assert cosine_lr(1000, 1000, 3e-4, 3e-5) == pytest.approx(3e-5, rel=1e-12)
    assert cosine_lr(5000, 1000, 3e-4, 3e-5) == pytest.approx(3e-5, rel=1e-12)  # flat after the end
    assert cosine_lr(500, 1000, 3e-4, 3e-5) == pytest.approx((3e-4 + 3e-5) / 2)
    values = [cosine_lr(s, 100, 3e-4, 3e-5) for s in range(101)]
    assert all(a > b for a, b in zip(values, values[1:]))


# ------------------------------------------------------------------------------------------------- agent


def test_agent_has_no_target_actor() -> None:
    agent = make_agent(make_cfg())
    modules = {name for name, value in vars(agent).items() if isinstance(value, torch.nn.Module)}
    assert modules == {"actor", "critic", "target_critic", "obs_rms", "critic_obs_rms"}
    actor_ids = {id(p) for p in agent.actor.parameters()}
    assert {id(p) for group in agent.actor_optimizer.param_groups for p in group["params"]} == actor_ids


@pytest.mark.parametrize("kind", ["simbav2", "sparse", "lora"])
def test_rows_unit_norm_after_critic_and_actor_steps_and_lora_base_frozen(kind: str) -> None:
    agent = make_agent(make_cfg(kind))
    warm_stats(agent)
    bases = [m.base.clone() for m in agent.critic.modules() if isinstance(m, SphericalLoRALinear)]
    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    for i in range(4):
        agent.update(random_batch(seed=i), update_actor=True)
    assert any(not torch.equal(a, p) for a, p in zip(actor_before, agent.actor.parameters()))
    torch.testing.assert_close(row_norms(agent.critic), torch.ones_like(row_norms(agent.critic)), atol=2e-6, rtol=0)
    torch.testing.assert_close(row_norms(agent.actor), torch.ones_like(row_norms(agent.actor)), atol=2e-6, rtol=0)
    new_bases = [m.base for m in agent.critic.modules() if isinstance(m, SphericalLoRALinear)]
    assert len(new_bases) == (2 if kind == "lora" else 0)  # W1, W2 of the one block
    assert all(torch.equal(a, b) for a, b in zip(bases, new_bases))


def test_only_the_lora_group_decays() -> None:
    agent = make_agent(make_cfg("lora", lora_weight_decay=0.5))
    groups = agent.critic_optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.5]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in lora_parameters(agent.critic)]
    assert all(g["weight_decay"] == 0.0 for g in agent.actor_optimizer.param_groups)
    # With zero gradients AdamW moves a parameter only by its decoupled decay: p <- p (1 - lr wd).
    params = list(agent.critic.parameters()) + list(agent.actor.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    agent.critic_optimizer.step()
    agent.actor_optimizer.step()
    adapters = {id(p) for p in lora_parameters(agent.critic)}
    for p, old in zip(params, before):
        if id(p) in adapters:
            torch.testing.assert_close(p.detach(), old * (1 - 1e-3 * 0.5))
        else:
            assert torch.equal(p.detach(), old)


def test_update_sets_the_cosine_lr_and_steps_the_actor_only_when_asked() -> None:
    agent = make_agent(make_cfg(), total_updates=4)
    warm_stats(agent)
    actor = [p.detach().clone() for p in agent.actor.parameters()]
    for i in range(6):
        due = agent.actor_update_due()
        assert due == (i % 2 == 1)  # policy_frequency 2: after every 2nd critic update
        metrics = agent.update(random_batch(seed=i), update_actor=due)
        assert metrics["lr"].item() == pytest.approx(cosine_lr(i, 4, 1e-3, 1e-4), rel=1e-6)
        assert ("actor_loss" in metrics) == due
        moved = any(not torch.equal(a, p) for a, p in zip(actor, agent.actor.parameters()))
        assert moved == due
        actor = [p.detach().clone() for p in agent.actor.parameters()]
    assert metrics["lr"].item() == pytest.approx(1e-4)
    groups = agent.critic_optimizer.param_groups + agent.actor_optimizer.param_groups
    assert all(isinstance(g["lr"], torch.Tensor) for g in groups)


def test_exploration_std_per_env_in_range_and_redrawn_only_for_done_envs() -> None:
    agent = make_agent(make_cfg(num_envs=256))
    std = agent.noise_std
    assert std.shape == (256,) and (std >= 0.001).all() and (std <= 0.4).all()
    assert std.max() - std.min() > 0.3  # spread over U(0.001, 0.4)
    done = torch.rand(256, generator=torch.Generator().manual_seed(3)) < 0.5
    agent.on_episode_end(done)
    new = agent.noise_std
    assert torch.equal(new[~done], std[~done])
    assert (new[done] != std[done]).all()
    assert (new >= 0.001).all() and (new <= 0.4).all()
    with pytest.raises(ValueError, match=r"done_mask must have shape \(256,\)"):
        agent.on_episode_end(torch.zeros(3, dtype=torch.bool))


@settings(max_examples=25, deadline=None)
@given(progress=st.integers(0, 150), seed=st.integers(0, 1000))
def test_annealed_std_stays_in_range_and_shrinks_linearly(progress: int, seed: int) -> None:
    agent = make_agent(make_cfg(std_anneal=True, num_envs=64), total_updates=100, seed=seed)
    agent.num_updates = progress
    upper = 0.4 + min(progress, 100) / 100 * (0.001 - 0.4)
    assert agent.std_max_now == pytest.approx(upper)
    std = agent.noise_std
    assert (std >= 0.001 - 1e-7).all() and (std <= upper + 1e-7).all()


def test_act_adds_per_env_noise_and_clips_deterministic_without() -> None:
    agent = make_agent(make_cfg(std_min=0.0, std_max=2.0))
    warm_stats(agent)
    agent.noise_draws = torch.tensor([0.0, 0.0, 1.0, 1.0])  # envs 0, 1 noiseless, envs 2, 3 std 2
    obs = torch.randn(ENVS, OBS)
    det = agent.act(obs, explore=False)
    torch.testing.assert_close(det, agent.actor(agent.obs_rms.normalize(obs)).detach())
    noisy = agent.act(obs)
    torch.testing.assert_close(noisy[:2], det[:2])
    assert (noisy[2:] != det[2:]).any() and noisy.abs().max() <= 1.0
    with pytest.raises(ValueError, match="one row per env"):
        agent.act(torch.randn(3, OBS))


def test_record_updates_both_normalisers_and_refuses_mismatched_critic_obs() -> None:
    agent = make_agent(make_cfg())
    obs, critic_obs = torch.randn(50, OBS) + 3, torch.randn(50, CRITIC_OBS) - 2
    agent.record(obs, critic_obs)
    torch.testing.assert_close(agent.obs_rms.mean, obs.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(agent.critic_obs_rms.mean, critic_obs.mean(0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="critic_obs must be given exactly when"):
        agent.record(obs)
    with pytest.raises(ValueError, match="critic_obs must be given exactly when"):
        make_agent(make_cfg(), asym=False).record(obs, critic_obs)


def test_grad_sync_runs_between_backward_and_step() -> None:
    calls = []
    agent = None

    def sync(params):
        assert all(p.grad is not None for p in params)
        current = [p.detach() for p in params]
        calls.append((len(params), all(torch.equal(a, b) for a, b in zip(current, snapshot[len(calls)]))))
        for p in params:
            p.grad.mul_(2.0)  # what an all-reduce of 2 identical ranks without averaging would do

    agent = make_agent(make_cfg(), grad_sync=sync)
    warm_stats(agent)
    snapshot = [[p.detach().clone() for p in agent.critic.parameters()],
                [p.detach().clone() for p in agent.actor.parameters()]]  # fmt: skip
    agent.update(random_batch(), update_actor=True)
    n_critic = len(non_lora_parameters(agent.critic)) + len(lora_parameters(agent.critic))
    assert calls == [(n_critic, True), (len(list(agent.actor.parameters())), True)]


def test_state_dict_round_trip_gives_bit_identical_updates() -> None:
    cfg = make_cfg(std_anneal=True)
    a = make_agent(cfg, seed=0)
    warm_stats(a)
    for i in range(3):
        a.update(random_batch(seed=i), a.actor_update_due())
    a.on_episode_end(torch.tensor([True, False, True, False]))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_agent(cfg, seed=123)  # different weights and generator until the load
    b.load_state_dict(torch.load(buf, weights_only=True))
    for i in range(3, 7):
        ma, mb = a.update(random_batch(seed=i), a.actor_update_due()), b.update(random_batch(seed=i), b.actor_update_due())
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    obs = torch.randn(ENVS, OBS)
    assert torch.equal(a.act(obs), b.act(obs))
    for net in ("actor", "critic", "target_critic"):
        sa, sb = getattr(a, net).state_dict(), getattr(b, net).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_autocast_update_keeps_the_projection_invariants() -> None:
    agent = make_agent(make_cfg(amp_bf16=True))
    warm_stats(agent)
    eager = make_agent(make_cfg())
    warm_stats(eager)
    for i in range(2):
        m = agent.update(random_batch(seed=i), update_actor=True)
        m32 = eager.update(random_batch(seed=i), update_actor=True)
    assert m["critic_loss"].dtype == torch.float32
    assert m["critic_loss"] != m32["critic_loss"]  # the matmuls did run in bf16 ...
    assert m["critic_loss"].item() == pytest.approx(m32["critic_loss"].item(), rel=0.05)  # ... and agree roughly
    torch.testing.assert_close(row_norms(agent.critic), torch.ones_like(row_norms(agent.critic)), atol=2e-6, rtol=0)


def test_compiled_update_matches_eager_and_lr_changes_do_not_recompile(monkeypatch) -> None:
    # aot_eager: Dynamo + AOTAutograd exactly as the real modes trace (guards, functionalised backward and
    # optimiser step) without Inductor's C++ build, which takes about a minute on a 2-core CPU.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: real_compile(fn, backend="aot_eager"))
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    cfg = make_cfg(compile_mode="default")
    compiled, eager = make_agent(cfg, total_updates=6), make_agent(make_cfg(), total_updates=6)
    for agent in (compiled, eager):
        warm_stats(agent)
    graphs = None
    for i in range(6):
        if i == 2:
            graphs = counters["stats"]["unique_graphs"]  # critic-only and critic+actor updates both compiled
        mc = compiled.update(random_batch(seed=i), update_actor=i % 2 == 1)
        me = eager.update(random_batch(seed=i), update_actor=i % 2 == 1)
        for k in me:
            torch.testing.assert_close(mc[k], me[k], rtol=1e-5, atol=1e-6)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs  # 4 new learning rates, no new graph
    for pc, pe in zip(compiled.critic.parameters(), eager.critic.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)


def test_learns_a_tiny_contextual_bandit() -> None:
    """One-step episodes (every step terminates), reward -(a - a*(s))^2 with a*(s) = 0.6 tanh(s_0): the critic
    must learn Q = r and the actor must move towards a*, through the buffer's n-step targets."""
    from fasttd3_lora.replay import NStepReplayBuffer

    torch.manual_seed(0)
    cfg = make_cfg("lora", num_envs=32, batch_size=64, n_step=3, v_min=-3.0, v_max=1.0, num_atoms=41,
                   lr_init=3e-3, lr_final=1e-3, critic_hidden_dim=32, actor_hidden_dim=16, std_min=0.2, std_max=0.6)  # fmt: skip
    agent = FastTD3(cfg, 2, 1, None, 32, 600, "cpu", torch.Generator().manual_seed(0))
    rb = NStepReplayBuffer(32, 64, 2, 1, n_step=3, gamma=0.9)
    g = torch.Generator().manual_seed(1)

    def best(obs):
        return 0.6 * torch.tanh(obs[:, :1])

    eval_obs = torch.randn(512, 2, generator=g) * 2

    def regret() -> float:
        return float(((agent.act(eval_obs, explore=False) - best(eval_obs)) ** 2).mean())

    start = regret()
    for step in range(60):
        obs = torch.randn(32, 2, generator=g) * 2
        agent.record(obs)
        action = agent.act(obs)
        done = torch.ones(32, dtype=torch.bool)
        rb.add(TensorDict(observation=obs, action=action, reward=-((action - best(obs)) ** 2).squeeze(1),
                          next_observation=torch.randn(32, 2, generator=g), terminated=done,
                          truncated=torch.zeros(32, dtype=torch.bool), batch_size=[32]))  # fmt: skip
        agent.on_episode_end(done)
        for _ in range(4):
            agent.update(rb.sample(64, g), agent.actor_update_due())
    assert start > 0.05 and regret() < 0.2 * start


# ------------------------------------------------------------------------------------------------ config


def compose_cfg(*overrides: str):
    with initialize_config_module("fasttd3_lora.configs", version_base=None):
        return compose("config", overrides=["algo=fasttd3", *overrides])


def test_from_hydra_takes_algo_defaults_and_task_family_overrides() -> None:
    dmc = FastTD3Config.from_hydra(compose_cfg())  # the DMC family's numbers (configs/task/_dmc.yaml)
    assert (dmc.updates_per_step, dmc.n_step, dmc.v_min, dmc.v_max, dmc.buffer_size) == (4, 3, -10.0, 210.0, 10240)
    assert (dmc.num_envs, dmc.batch_size, dmc.num_atoms, dmc.tau, dmc.gamma) == (4096, 256, 101, 0.1, 0.99)
    assert dmc.action_repeat == 2
    # the command line wins over the family's value
    assert FastTD3Config.from_hydra(compose_cfg("algo.n_step=5", "algo.batch_size=64")).n_step == 5
    assert (dmc.lr_init, dmc.lr_final, dmc.policy_frequency, dmc.policy_noise, dmc.noise_clip) == (3e-4, 3e-5, 2, 0.001, 0.5)
    assert (dmc.std_min, dmc.std_max, dmc.use_cdq, dmc.actor_q, dmc.lora_weight_decay) == (0.001, 0.4, True, None, 6e-4)
    assert dmc.critic_kind == "lora" and dmc.lora_rank == 96 and dmc.compile_mode is None
    manip = FastTD3Config.from_hydra(compose_cfg("task=Isaac-Repose-Cube-Shadow-Direct-v0", "critic=simbav2"))
    assert (manip.updates_per_step, manip.n_step, manip.v_min, manip.v_max) == (2, 1, -500.0, 500.0)
    assert manip.critic_kind == "simbav2" and manip.lora_rank is None
    loco = FastTD3Config.from_hydra(compose_cfg("task=Isaac-Velocity-Rough-G1-v0"))
    assert (loco.updates_per_step, loco.n_step, loco.v_min, loco.v_max) == (4, 8, -10.0, 10.0)
    assert (loco.batch_size, loco.num_atoms, loco.action_repeat, loco.buffer_size) == (8192, 251, 1, 5120)


def test_config_errors_are_one_line_and_name_the_value() -> None:
    cfg = compose_cfg("task=Isaac-Velocity-Flat-H1-v0")
    with open_dict(cfg):
        cfg.task.fasttd3.bogus = 1
    with pytest.raises(ValueError, match=r"task.fasttd3 has unknown keys \['bogus'\]"):
        FastTD3Config.from_hydra(cfg)
    with pytest.raises(ValueError, match="needs algo.name 'fasttd3'"):
        with initialize_config_module("fasttd3_lora.configs", version_base=None):
            FastTD3Config.from_hydra(compose("config"))
    for bad, pattern in [
        (dict(actor_q="max"), "actor_q must be None or one of"),
        (dict(compile_mode="fast"), "compile_mode must be one of"),
        (dict(warmup_fraction=0.2), "dense warm-up is implemented for SAC only"),
        (dict(std_min=0.5, std_max=0.4), "std_min <= std_max"),
        (dict(n_step=0), "n_step must be a positive int"),
        (dict(gamma=1.0), "gamma must be in"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            make_cfg(**bad)
    with pytest.raises(ValueError, match="only apply to critic_kind 'lora'"):
        make_cfg("simbav2", lora_rank=4)


def test_the_family_keys_are_exactly_the_algo_keys_a_family_can_set() -> None:
    """upgrade_saved pins FAMILY_KEYS for old runs: they must be the keys configs/algo/fasttd3.yaml reads from
    task.fasttd3."""
    from omegaconf import OmegaConf

    from fasttd3_lora.config import config_dir
    from fasttd3_lora.fasttd3 import FAMILY_KEYS

    raw = OmegaConf.to_container(OmegaConf.load(config_dir() / "algo" / "fasttd3.yaml"), resolve=False)
    interpolated = {k for k, v in raw.items() if isinstance(v, str) and v.startswith("${oc.select:task.fasttd3.")}
    assert interpolated == set(FAMILY_KEYS)
    assert all(raw[k] == f"${{oc.select:task.fasttd3.{k},{raw[k].split(',')[1]}" for k in FAMILY_KEYS)

