"""SAC (DESIGN §2, §3, §5): categorical target, update order, projections, optimiser groups, schedules,
temperature, shapes, exact resume, dense warm-up, config mapping, and a learning smoke test."""

from __future__ import annotations

import copy
import dataclasses
import io
import math

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict
from tensordict import TensorDict

from fasttd3_lora.hypersphere import Projected, SphericalLinear, project_
from fasttd3_lora.lora import SphericalLoRALinear
from fasttd3_lora.networks import lora_parameters, non_lora_parameters, polyak_update_
from fasttd3_lora.replay import ReplayBuffer
from fasttd3_lora.sac import (
    SAC,
    SACConfig,
    actor_loss,
    critic_loss,
    critic_target,
    discount_from_horizon,
    linear_lr_factor,
    temperature_loss,
)

OBS, ACT, N = 3, 2, 16
KINDS = ("simbav2", "sparse", "lora")
LORA_FIELDS = dict(
    lora_rank=4, lora_alpha=4.0, lora_base_init_scale=0.5, lora_project=True, lora_use_base=True,
    lora_base_rank=None, warmup_fraction=0.0,
)  # fmt: skip


def make_cfg(kind: str = "lora", **overrides) -> SACConfig:
    fields = dict(
        num_envs=4, action_repeat=1, updates_per_step=1, batch_size=N, buffer_size=1000, learning_starts=0,
        lr_init=1e-3, lr_final=2.5e-4, tau=0.05, temperature_init=0.01, target_entropy_per_action_dim=-0.5,
        discount=0.9, num_atoms=11, v_min=-5.0, v_max=5.0, num_critics=2, lora_weight_decay=1e-2,
        actor_hidden_dim=8, actor_num_blocks=1, amp_bf16=False, compile=False, critic_kind=kind,
        critic_hidden_dim=8, critic_num_blocks=1, sparsity=0.5,
    )  # fmt: skip
    fields.update(LORA_FIELDS if kind == "lora" else {k: None for k in LORA_FIELDS})
    fields.update(overrides)
    return SACConfig(**fields)


def make_agent(cfg: SACConfig, total_updates: int = 100, seed: int = 0) -> SAC:
    torch.manual_seed(seed)
    return SAC(cfg, OBS, ACT, cfg.num_envs, total_updates, "cpu", torch.Generator().manual_seed(seed))


def random_batch(n: int = N, seed: int = 1) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        observation=torch.randn(n, OBS, generator=g) * 2 + 1,
        action=torch.rand(n, ACT, generator=g) * 2 - 1,
        reward=torch.randn(n, generator=g),
        next_observation=torch.randn(n, OBS, generator=g) * 2 + 1,
        terminated=torch.rand(n, generator=g) < 0.3,
        truncated=torch.zeros(n, dtype=torch.bool),
        batch_size=[n],
    )


def warm_stats(agent: SAC) -> None:
    """Non-trivial normaliser statistics, so normalisation and reward scaling matter in the checks."""
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        agent.record(
            torch.randn(agent.cfg.num_envs, OBS, generator=g) * 2 + 1,
            torch.randn(agent.cfg.num_envs, generator=g) * 3,
            torch.zeros(agent.cfg.num_envs, dtype=torch.bool),
        )


# ------------------------------------------------------------------------------------- target and loss


def test_critic_target_matches_hand_computation() -> None:
    atoms = torch.tensor([-1.0, 0.0, 1.0])
    # critic 0 has expected value 0.3 (the smaller), critic 1 is all on +1: the target uses critic 0
    probs0 = torch.tensor([0.2, 0.3, 0.5])
    logits = torch.stack([probs0.log(), torch.tensor([-30.0, -30.0, 0.0])]).unsqueeze(1)  # (E=2, N=1, K=3)
    log_prob, temperature = torch.tensor([-2.0]), torch.tensor(0.1)
    reward, discount = torch.tensor([0.5]), 0.5
    # bonus = 0.1 * -2 = -0.2: shifted atoms z - bonus = (-0.8, 0.2, 1.2); t = 0.5 + 0.5 (.) = (0.1, 0.6, 1.1 -> 1.0)
    # b = t + 1 = (1.1, 1.6, 2.0): 0.2 -> 0.18 on atom 1 and 0.02 on atom 2; 0.3 -> 0.12 / 0.18; 0.5 -> all on 2
    out = critic_target(logits, log_prob, reward, torch.tensor([False]), temperature, discount, atoms)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.30, 0.70]]), atol=1e-6, rtol=0)
    # terminated: every atom collapses on r = 0.5, split between atoms 1 and 2
    out = critic_target(logits, log_prob, reward, torch.tensor([True]), temperature, discount, atoms)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.5]]), atol=1e-6, rtol=0)
    # single critic: that critic's distribution, whatever its value
    out = critic_target(logits[1:], log_prob, torch.tensor([0.0]), torch.tensor([False]), torch.tensor(0.0), 1.0, atoms)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-6, rtol=0)


def test_discount_from_horizon() -> None:
    assert discount_from_horizon(1000, 2) == pytest.approx(0.99)  # DMC: T = 500, T/5 = 100
    assert discount_from_horizon(1000, 1) == pytest.approx(0.995)  # 0.995 exactly at T/5 = 200
    assert discount_from_horizon(100_000, 1) == 0.995  # clipped above
    assert discount_from_horizon(50, 1) == 0.95  # clipped below ((10 - 1)/10 = 0.9)
    with pytest.raises(ValueError, match="action_repeat"):
        discount_from_horizon(1000, 0)


def test_temperature_loss_gradient_sign() -> None:
    log_t = torch.tensor(math.log(0.5), requires_grad=True)
    temperature_loss(log_t, torch.tensor(1.0), target_entropy=-1.0).backward()
    assert log_t.grad == pytest.approx(0.5 * 2.0)  # d/dlogα [α (H - H*)] = α (H - H*): descent lowers α


# --------------------------------------------------------------------------------------------- update


def test_update_equals_manual_reimplementation_in_design_order() -> None:
    """Actor, temperature, critic (with the new actor and temperature), target EMA: bit-identical."""
    cfg = make_cfg("lora")
    agent = make_agent(cfg)
    warm_stats(agent)
    actor, critic = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic)
    target, log_t = copy.deepcopy(agent.target_critic), copy.deepcopy(agent.log_temperature)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(agent.generator.get_state())
    batch = random_batch()
    metrics = agent.update(batch)

    obs = agent.obs_rms.normalize(batch["observation"])
    next_obs = agent.obs_rms.normalize(batch["next_observation"])
    reward = agent.reward_normalizer.scale(batch["reward"])
    noise = torch.randn((2, N, ACT), generator=gen)
    adam = dict(lr=cfg.lr_init, weight_decay=0.0, fused=True)
    a_opt = torch.optim.AdamW(actor.parameters(), **adam)
    a_loss, log_prob = actor_loss(actor, critic, obs, log_t.detach().exp(), noise[0])
    grads = torch.autograd.grad(a_loss, list(actor.parameters()))
    for p, g in zip(actor.parameters(), grads):
        p.grad = g
    a_opt.step()
    project_(actor)
    t_opt = torch.optim.AdamW([log_t], **adam)
    temperature_loss(log_t, -log_prob.detach().mean(), -0.5 * ACT).backward()
    t_opt.step()
    c_opt = torch.optim.AdamW(
        [{"params": non_lora_parameters(critic)}, {"params": lora_parameters(critic), "weight_decay": cfg.lora_weight_decay}],
        **adam,
    )
    c_loss, _ = critic_loss(
        critic, target, actor, obs, batch["action"], reward, next_obs, batch["terminated"], log_t.detach().exp(),
        cfg.discount, noise[1],
    )  # fmt: skip
    c_loss.backward()
    c_opt.step()
    project_(critic)
    polyak_update_(target, critic, cfg.tau)

    for mine, ref in ((agent.actor, actor), (agent.critic, critic), (agent.target_critic, target)):
        for (name, a), b in zip(mine.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), name
    assert torch.equal(agent.log_temperature, log_t)
    assert torch.equal(metrics["critic_loss"], c_loss.detach())
    assert torch.equal(metrics["actor_loss"], a_loss.detach())


@pytest.mark.parametrize("kind", KINDS)
def test_update_keeps_rows_unit_norm_and_lora_base_frozen(kind: str) -> None:
    agent = make_agent(make_cfg(kind, lora_project=True) if kind == "lora" else make_cfg(kind))
    bases = {id(m): m.base.clone() for m in agent.critic.modules() if isinstance(m, SphericalLoRALinear)}
    masks = {id(m): m.mask.clone() for m in agent.critic.modules() if isinstance(m, SphericalLinear) and m.mask is not None}
    assert bool(bases) == (kind == "lora") and bool(masks) == (kind == "sparse")
    for seed in range(3):
        agent.update(random_batch(seed=seed))
    for net in (agent.actor, agent.critic):
        for m in net.modules():
            if isinstance(m, Projected):
                norms = torch.linalg.vector_norm(m.effective_weight(), dim=-1)
                torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    for m in agent.critic.modules():
        if isinstance(m, SphericalLoRALinear):
            assert torch.equal(m.base, bases[id(m)])
            assert not m.base.requires_grad
        if id(m) in masks:
            assert torch.all(m.weight[~masks[id(m)]] == 0)  # sparse entries stay exactly zero


def test_only_lora_adapters_have_weight_decay() -> None:
    agent = make_agent(make_cfg("lora"))
    adapters = {id(p) for m in agent.critic.modules() if isinstance(m, SphericalLoRALinear) for p in (m.lora_A, m.lora_B)}
    assert adapters
    decayed = {id(p) for g in agent.critic_optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == adapters
    assert {g["weight_decay"] for g in agent.critic_optimizer.param_groups} == {0.0, 1e-2}
    everything = {id(p) for g in agent.critic_optimizer.param_groups for p in g["params"]}
    assert everything == {id(p) for p in agent.critic.parameters()}
    for opt in (agent.actor_optimizer, agent.temperature_optimizer):
        assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    dense = make_agent(make_cfg("simbav2"))
    assert all(g["weight_decay"] == 0.0 for g in dense.critic_optimizer.param_groups)


def test_learning_rate_decays_linearly_to_final() -> None:
    cfg = make_cfg("simbav2", lr_init=1e-3, lr_final=2e-4)
    agent = make_agent(cfg, total_updates=4)
    expected = [1e-3, 8e-4, 6e-4, 4e-4, 2e-4, 2e-4]
    for k, lr in enumerate(expected):
        for opt in (agent.actor_optimizer, agent.critic_optimizer, agent.temperature_optimizer):
            assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-9), (k, opt)
        metrics = agent.update(random_batch(seed=k))
        assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-6)
    assert linear_lr_factor(10, 4, 1e-3, 2e-4) == pytest.approx(0.2)


@pytest.mark.parametrize("target_per_dim, direction", [(5.0, +1), (-50.0, -1)])
def test_temperature_moves_toward_target_entropy(target_per_dim: float, direction: int) -> None:
    # A target entropy far above the policy's raises α (more exploration), one far below lowers it.
    agent = make_agent(make_cfg("simbav2", target_entropy_per_action_dim=target_per_dim))
    before = float(agent.temperature)
    for seed in range(5):
        metrics = agent.update(random_batch(seed=seed))
        entropy = float(metrics["entropy"])
        assert math.copysign(1.0, target_per_dim * ACT - entropy) == direction
    assert (float(agent.temperature) - before) * direction > 0


@pytest.mark.parametrize("num_critics", [1, 2])
def test_single_and_twin_shapes(num_critics: int) -> None:
    cfg = make_cfg("lora", num_critics=num_critics)
    agent = make_agent(cfg)
    batch = random_batch()
    logits = agent.critic(batch["observation"], batch["action"])
    assert logits.shape == (num_critics, N, cfg.num_atoms)
    assert agent.target_critic(batch["observation"], batch["action"]).shape == logits.shape
    metrics = agent.update(batch)
    assert set(metrics) == {"critic_loss", "actor_loss", "temperature_loss", "temperature", "q_mean", "entropy", "lr"}
    assert all(v.shape == () and torch.isfinite(v) for v in metrics.values())
    assert agent.act(batch["observation"]).shape == (N, ACT)
    det = agent.act(batch["observation"], deterministic=True)
    assert det.shape == (N, ACT) and torch.equal(det, agent.act(batch["observation"], deterministic=True))
    assert det.abs().max() < 1


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind, warmup", [("lora", 0.0), ("sparse", 0.0), ("lora", 0.25)])
def test_state_dict_round_trip_gives_bit_identical_updates(kind: str, warmup: float) -> None:
    overrides = {"warmup_fraction": warmup} if kind == "lora" else {}
    cfg = make_cfg(kind, **overrides)
    agent = make_agent(cfg, total_updates=8)
    warm_stats(agent)
    for seed in range(3):  # with warm-up 0.25 of 8 updates: converted to LoRA at update 2
        agent.update(random_batch(seed=seed))
    state = _round_trip(agent.state_dict())
    resumed = make_agent(cfg, total_updates=8, seed=123)  # different weights and generator until loaded
    resumed.load_state_dict(state)
    for seed in range(3, 6):
        m1, m2 = agent.update(random_batch(seed=seed)), resumed.update(random_batch(seed=seed))
        assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert torch.equal(agent.act(random_batch()["observation"]), resumed.act(random_batch()["observation"]))
    for a, b in zip(agent.state_dict()["critic"].values(), resumed.state_dict()["critic"].values()):
        assert torch.equal(a, b)


def test_dense_warmup_converts_blocks_and_rebuilds_optimizer() -> None:
    cfg = make_cfg("lora", warmup_fraction=0.5)
    agent = make_agent(cfg, total_updates=4)
    assert not any(isinstance(m, SphericalLoRALinear) for m in agent.critic.modules())
    for seed in range(2):
        agent.update(random_batch(seed=seed))
    dense_w1 = agent.critic.encoder.blocks[0].w1.weight.detach().clone()
    agent.update(random_batch(seed=2))  # update 2 = 0.5 * 4: converts first
    w1 = agent.critic.encoder.blocks[0].w1
    assert isinstance(w1, SphericalLoRALinear)
    # W0 is the warmed-up weight with rows rescaled to squared norm base_init_scale (Eq. 14)
    torch.testing.assert_close(w1.base, dense_w1 * math.sqrt(0.5), atol=1e-6, rtol=0)
    decayed = {id(p) for g in agent.critic_optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in lora_parameters(agent.critic)}
    # the schedule continues where the dense one was: update 3 of 4
    assert agent.critic_optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr_init * linear_lr_factor(3, 4, cfg.lr_init, cfg.lr_final))


def test_bf16_autocast_update_is_close_to_fp32() -> None:
    results = []
    for amp in (False, True):
        agent = make_agent(make_cfg("lora", amp_bf16=amp))
        warm_stats(agent)
        results.append(agent.update(random_batch()))
    fp32, bf16 = results
    for key in ("critic_loss", "actor_loss", "q_mean"):
        assert float(bf16[key]) == pytest.approx(float(fp32[key]), rel=0.05, abs=0.05), key
    assert not torch.equal(fp32["critic_loss"], bf16["critic_loss"])  # autocast really ran in bf16


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("critic", ["lora", "simbav2", "sparse"])
def test_from_hydra_maps_the_config_groups(critic: str) -> None:
    with initialize_config_module("fasttd3_lora.configs", version_base=None):
        cfg = compose("config", overrides=[f"critic={critic}"])
    sac = SACConfig.from_hydra(cfg)  # algo.discount is null in the recipe: derived from the task's 1000 steps
    assert sac.discount == pytest.approx(0.99) and sac.critic_kind == critic
    with open_dict(cfg):
        cfg.task.max_episode_steps = 100  # T = 50 agent steps: clip((10 - 1) / 10, 0.95, 0.995)
    assert SACConfig.from_hydra(cfg).discount == pytest.approx(0.95)
    with open_dict(cfg):
        cfg.algo.discount = 0.97  # a set discount is taken as it is
    assert SACConfig.from_hydra(cfg).discount == 0.97
    assert (sac.batch_size, sac.num_atoms, sac.critic_hidden_dim) == (cfg.algo.batch_size, cfg.algo.num_atoms, 512)
    assert (sac.lora_rank is not None) == (critic == "lora")
    agent_fields = {f.name for f in dataclasses.fields(SACConfig)}
    assert set(cfg.algo) - {"name"} <= agent_fields


def test_config_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="critic_kind must be one of"):
        make_cfg("dense")
    with pytest.raises(ValueError, match="num_critics"):
        make_cfg("lora", num_critics=3)
    with pytest.raises(ValueError, match="only apply to critic_kind 'lora'"):
        make_cfg("simbav2", lora_rank=8)
    with pytest.raises(ValueError, match="lora_use_base=True"):
        make_cfg("lora", warmup_fraction=0.2, lora_use_base=False)
    with pytest.raises(ValueError, match="discount"):
        make_agent(make_cfg("lora", discount=None))


# ---------------------------------------------------------------------------------------------- learning


def bandit_reward(obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """One-step task: the best action is 0.8 * obs[0]; reward 1 - squared miss (random actions: 0.453)."""
    return 1.0 - (action[:, 0] - 0.8 * obs[:, 0]).square()


@pytest.mark.parametrize("kind, amp", [(k, False) for k in KINDS] + [("lora", True)])
def test_sac_learns_a_contextual_bandit(kind: str, amp: bool) -> None:
    envs, obs_dim, act_dim = 16, 2, 1
    cfg = make_cfg(
        kind, amp_bf16=amp, num_envs=envs, batch_size=64, lr_init=3e-3, lr_final=1e-3, critic_hidden_dim=16, actor_hidden_dim=16,
        num_atoms=21, num_critics=1, **({"lora_rank": 8, "lora_alpha": 8.0} if kind == "lora" else {}),
    )  # fmt: skip
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    steps = 150
    agent = SAC(cfg, obs_dim, act_dim, envs, steps, "cpu", g)
    rb = ReplayBuffer(10_000, obs_dim, act_dim)
    obs = torch.rand(envs, obs_dim, generator=g) * 2 - 1
    for step in range(steps):
        action = torch.rand(envs, act_dim, generator=g) * 2 - 1 if step < 10 else agent.act(obs)
        reward = bandit_reward(obs, action)
        next_obs = torch.rand(envs, obs_dim, generator=g) * 2 - 1
        done = torch.ones(envs, dtype=torch.bool)  # every step ends its episode
        agent.record(next_obs, reward, done)
        rb.add(TensorDict(observation=obs, action=action, reward=reward, next_observation=next_obs,
                          terminated=done, truncated=~done, batch_size=[envs]))  # fmt: skip
        obs = next_obs
        if step >= 10:
            agent.update(rb.sample(cfg.batch_size, g))
    eval_obs = torch.rand(512, obs_dim, generator=g) * 2 - 1
    learned = bandit_reward(eval_obs, agent.act(eval_obs, deterministic=True)).mean()
    random = bandit_reward(eval_obs, torch.rand(512, act_dim, generator=g) * 2 - 1).mean()
    assert learned > 0.85 > random + 0.3, (float(learned), float(random))
