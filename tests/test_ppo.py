"""PPO's math (DESIGN §10) against TorchRL's GAE and ClipPPOLoss and against torch.distributions, its invariants as
properties, and the agent on a problem whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch.distributions import Independent, Normal

from fasttd3_lora import gaussian
from fasttd3_lora.config import compose_config
from fasttd3_lora.mlp_policy import GaussianPolicy, ValueFunction
from fasttd3_lora.normalization import RunningMeanStd
from fasttd3_lora.ppo import (
    PPO,
    PPOConfig,
    adapted_lr,
    clipped_surrogate_loss,
    clipped_value_loss,
    gae,
)

seeds = st.integers(0, 2**16)


# --- Gaussian math ----------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(seed=seeds, dim=st.integers(1, 6))
def test_gaussian_log_prob_entropy_and_kl_match_torch_distributions(seed, dim):
    g = torch.Generator().manual_seed(seed)
    m0, m1, x = (torch.randn(32, dim, generator=g, dtype=torch.float64) for _ in range(3))
    s0, s1 = (torch.randn(32, dim, generator=g, dtype=torch.float64) * 0.7 for _ in range(2))
    p, q = Independent(Normal(m0, s0.exp()), 1), Independent(Normal(m1, s1.exp()), 1)
    torch.testing.assert_close(gaussian.log_prob(x, m0, s0), p.log_prob(x))
    torch.testing.assert_close(gaussian.entropy(s0), p.entropy())
    torch.testing.assert_close(gaussian.kl(m0, s0, m1, s1), torch.distributions.kl_divergence(p, q))


@settings(max_examples=50, deadline=None)
@given(seed=seeds)
def test_gaussian_kl_is_nonnegative_and_zero_only_for_equal_policies(seed):
    g = torch.Generator().manual_seed(seed)
    m, s = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    assert torch.all(gaussian.kl(m, s, m, s).abs() < 1e-5)
    shifted = gaussian.kl(m, s, m + 0.1, s)
    assert torch.all(shifted > 0)
    # a mean shift d under std sigma costs d^2 / (2 sigma^2) per dimension
    torch.testing.assert_close(shifted, (0.01 / (2 * torch.exp(2 * s))).sum(-1), rtol=1e-4, atol=1e-6)


# --- GAE --------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=seeds, steps=st.integers(1, 30), envs=st.integers(1, 5), gamma=st.floats(0.5, 0.999),
       lam=st.floats(0.0, 1.0))  # fmt: skip
def test_gae_equals_torchrl_generalized_advantage_estimate(seed, steps, envs, gamma, lam):
    from torchrl.objectives.value.functional import generalized_advantage_estimate

    g = torch.Generator().manual_seed(seed)
    rewards, values, next_values = (torch.randn(steps, envs, generator=g, dtype=torch.float64) for _ in range(3))
    terminated = torch.rand(steps, envs, generator=g) < 0.1
    done = terminated | (torch.rand(steps, envs, generator=g) < 0.1)  # time-outs: done, not terminated
    adv, ret = gae(rewards, values, next_values, terminated, done, gamma, lam)
    # TorchRL wants [batch, time, feature]
    t = lambda x: x.T.unsqueeze(-1)  # noqa: E731
    ref_adv, ref_ret = generalized_advantage_estimate(gamma, lam, t(values), t(next_values), t(rewards), t(done),
                                                      t(terminated))  # fmt: skip
    torch.testing.assert_close(adv, ref_adv.squeeze(-1).T)
    torch.testing.assert_close(ret, ref_ret.squeeze(-1).T)


def test_gae_bootstraps_a_time_out_from_the_final_observation_and_not_a_termination():
    rewards, values = torch.ones(1, 2), torch.zeros(1, 2)
    next_values = torch.full((1, 2), 10.0)
    terminated, done = torch.tensor([[False, True]]), torch.tensor([[True, True]])
    adv, _ = gae(rewards, values, next_values, terminated, done, gamma=0.9, lam=0.95)
    assert adv.tolist() == [[1.0 + 0.9 * 10.0, 1.0]]


# --- losses against ClipPPOLoss ----------------------------------------------------------------------------


class _IndependentNormal(Independent):
    def __init__(self, loc, scale):
        super().__init__(Normal(loc, scale), 1)


@pytest.mark.parametrize("clip", [0.1, 0.2])
def test_surrogate_and_clipped_value_loss_equal_torchrl_clip_ppo_loss(clip):
    from tensordict.nn import TensorDictModule
    from torchrl.modules import ProbabilisticActor, ValueOperator
    from torchrl.objectives import ClipPPOLoss

    torch.manual_seed(0)
    obs_dim, act_dim, n = 3, 2, 256
    mean_net, value_net = torch.nn.Linear(obs_dim, act_dim), torch.nn.Linear(obs_dim, 1)
    log_std = torch.nn.Parameter(torch.randn(act_dim) * 0.1)

    class Params(torch.nn.Module):
        def forward(self, obs):
            mean = mean_net(obs)
            return mean, torch.exp(log_std).expand_as(mean)

    actor = ProbabilisticActor(TensorDictModule(Params(), ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
                               distribution_class=_IndependentNormal, return_log_prob=True)  # fmt: skip
    # rsl_rl's value loss is squared and clipped, its advantages are normalised by the caller: TorchRL's defaults
    # (smooth L1, no clip) differ, so they are set here
    loss = ClipPPOLoss(actor, ValueOperator(value_net, in_keys=["observation"]), clip_epsilon=clip,
                       entropy_bonus=False, critic_coeff=1.0, loss_critic_type="l2", normalize_advantage=False,
                       clip_value=clip)  # fmt: skip
    obs, action = torch.randn(n, obs_dim), torch.randn(n, act_dim)
    old_log_prob, adv = torch.randn(n) * 0.3 - 2.0, torch.randn(n)
    old_values, returns = torch.randn(n), torch.randn(n)
    td = TensorDict({"observation": obs, "action": action, "action_log_prob": old_log_prob,
                     "advantage": adv.unsqueeze(-1), "value_target": returns.unsqueeze(-1),
                     "state_value": old_values.unsqueeze(-1)}, [n])  # fmt: skip
    out = loss(td)
    with torch.no_grad():
        log_prob = gaussian.log_prob(action, mean_net(obs), log_std.expand(n, act_dim))
        values = value_net(obs).squeeze(-1)
    torch.testing.assert_close(clipped_surrogate_loss(log_prob, old_log_prob, adv, clip), out["loss_objective"])
    torch.testing.assert_close(clipped_value_loss(values, old_values, returns, clip), out["loss_critic"])


@settings(max_examples=50, deadline=None)
@given(seed=seeds, clip=st.floats(0.05, 0.5))
def test_surrogate_ignores_ratio_moves_beyond_the_clip_in_the_advantage_direction(seed, clip):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(64, generator=g)
    old = torch.randn(64, generator=g)
    edge = torch.where(adv > 0, math.log(1 + clip), math.log(1 - clip))  # log of the clip the way A pays
    beyond, further = old + 1.5 * edge, old + 3.0 * edge
    assert torch.allclose(clipped_surrogate_loss(beyond, old, adv, clip), clipped_surrogate_loss(further, old, adv, clip))
    # at ratio 1 the loss is -mean(A)
    assert torch.allclose(clipped_surrogate_loss(old, old, adv, clip), -adv.mean())


def test_value_loss_unclipped_is_plain_squared_error_and_clipping_never_lowers_it():
    g = torch.Generator().manual_seed(3)
    values, old, returns = (torch.randn(100, generator=g) for _ in range(3))
    plain = clipped_value_loss(values, old, returns, None)
    assert torch.allclose(plain, ((values - returns) ** 2).mean())
    assert clipped_value_loss(values, old, returns, 0.1) >= plain


def test_adaptive_lr_follows_rsl_rl():
    assert adapted_lr(1e-3, kl=0.05, desired_kl=0.01) == pytest.approx(1e-3 / 1.5)
    assert adapted_lr(1e-3, kl=0.001, desired_kl=0.01) == pytest.approx(1.5e-3)
    assert adapted_lr(1e-3, kl=0.01, desired_kl=0.01) == 1e-3
    assert adapted_lr(1e-5, kl=1.0, desired_kl=0.01) == 1e-5  # floor
    assert adapted_lr(1e-2, kl=1e-6, desired_kl=0.01) == 1e-2  # ceiling
    assert adapted_lr(1e-3, kl=0.0, desired_kl=0.01) == 1e-3  # no information, no move


# --- the agent ---------------------------------------------------------------------------------------------


def _config(**algo) -> PPOConfig:
    overrides = ["algo=ppo", "task=dmc/cartpole-balance", "precision=fp32"] + [f"algo.{k}={v}" for k, v in algo.items()]
    return PPOConfig.from_hydra(compose_config(overrides))


def test_the_agent_learns_a_bandit_whose_best_action_is_known():
    """Reward -|a - a*|^2 for a fixed a* inside the box: the policy mean must move to a* and the std shrink."""
    cfg = _config(num_envs=64, num_steps=8, num_epochs=5, num_minibatches=4, lr=3e-3, desired_kl="null",
                  entropy_coef=0.0, actor_hidden_dims="[32]", critic_hidden_dims="[32]")  # fmt: skip
    torch.manual_seed(0)
    policy, value = GaussianPolicy(3, 2, [32], init_std=0.5), ValueFunction(3, [32])
    agent = PPO(cfg, policy, value, RunningMeanStd(3), torch.device("cpu"), torch.Generator().manual_seed(0))
    target = torch.tensor([0.5, -0.3])
    obs = torch.randn(cfg.num_envs, 3)
    for _ in range(60):
        steps = []
        for _ in range(cfg.num_steps):
            out = agent.explore(obs)
            out["reward"] = -((out["action"].clamp(-1, 1) - target) ** 2).sum(-1)
            steps.append(out)
        rollout = torch.stack(steps)
        done = torch.ones(cfg.num_steps, cfg.num_envs, dtype=torch.bool)  # one-step episodes
        rollout["advantage"], rollout["return"] = gae(rollout["reward"], rollout["value"], torch.zeros_like(rollout["value"]),
                                                      done, done, cfg.gamma, cfg.gae_lambda)  # fmt: skip
        agent.update(rollout.exclude("reward").reshape(-1))
    with torch.no_grad():
        mean, log_std = agent.policy(agent.normalize(obs))
    assert torch.allclose(mean.mean(0), target, atol=0.05)
    assert log_std.exp().max() < 0.3


def test_frozen_statistics_stay_and_trainable_parameters_are_only_those_with_gradients():
    cfg = _config(num_envs=4, num_steps=2, num_minibatches=1, actor_hidden_dims="[8]", critic_hidden_dims="[8]")
    policy, value = GaussianPolicy(3, 1, [8]), ValueFunction(3, [8])
    policy.mean_net.requires_grad_(False)
    agent = PPO(cfg, policy, value, RunningMeanStd(3), torch.device("cpu"), torch.Generator(), frozen_obs_stats=True)
    before = agent.obs_rms.state_dict()
    agent.explore(torch.randn(4, 3) * 10)
    assert all(torch.equal(before[k], v) for k, v in agent.obs_rms.state_dict().items())
    trainable = {id(p) for p in agent.trainable_parameters()}
    assert id(policy.log_std) in trainable and not any(id(p) in trainable for p in policy.mean_net.parameters())
    assert agent.policy_trainable_numel() == 1
