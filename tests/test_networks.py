"""Critics, actors, targets and optimiser groups (DESIGN §1-§4)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora.hypersphere import SphericalLinear, project_
from fasttd3_lora.lora import SphericalLoRALinear
from fasttd3_lora.networks import (
    CategoricalCritic,
    DeterministicActor,
    TanhGaussianActor,
    bounded_log_std,
    convert_blocks_to_lora_,
    dense_target,
    lora_parameters,
    make_critic,
    non_lora_parameters,
    polyak_update_,
    tanh_gaussian_sample,
)
from fasttd3_lora.param_counts import dense_critic_params, lora_critic_trainable

OBS, ACT, ATOMS = 17, 6, 101


def count(params) -> int:
    return sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def lora_512x2():
    torch.manual_seed(0)
    return make_critic("lora", OBS, ACT, 512, 2, ATOMS, -5.0, 5.0, num_critics=1, lora=dict(rank=96, alpha=96.0))


def test_lora_critic_trainable_parameter_counts_match_closed_forms(lora_512x2):
    assert count(lora_512x2.lora_parameters()) == 2 * 2 * 96 * (512 + 2048) == 983_040
    trainable = count(p for p in lora_512x2.parameters() if p.requires_grad)
    assert trainable == lora_critic_trainable(OBS + ACT, 512, 2, ATOMS, 96)
    assert count(lora_512x2.base_parameters()) == trainable - 983_040


def test_dense_and_twin_parameter_counts():
    single = make_critic("simbav2", OBS, ACT, 64, 2, ATOMS, -5.0, 5.0, num_critics=1)
    twin = make_critic("simbav2", OBS, ACT, 64, 2, ATOMS, -5.0, 5.0, num_critics=2)
    assert count(single.parameters()) == dense_critic_params(OBS + ACT, 64, 2, ATOMS)
    assert count(twin.parameters()) == 2 * count(single.parameters())
    lora_single = make_critic("lora", OBS, ACT, 64, 2, ATOMS, -5.0, 5.0, lora=dict(rank=8))
    lora_twin = make_critic("lora", OBS, ACT, 64, 2, ATOMS, -5.0, 5.0, num_critics=2, lora=dict(rank=8))
    assert count(lora_single.parameters()) == lora_critic_trainable(OBS + ACT, 64, 2, ATOMS, 8)
    assert count(lora_twin.parameters()) == 2 * count(lora_single.parameters())


def test_critic_shapes_and_q_range(lora_512x2):
    obs, act = torch.randn(9, OBS), torch.rand(9, ACT) * 2 - 1
    logits = lora_512x2(obs, act)
    assert logits.shape == (1, 9, ATOMS)
    q = lora_512x2.q_value(logits)
    assert q.shape == (1, 9) and torch.all(q.abs() <= 5.0)
    torch.testing.assert_close(q, (torch.softmax(logits, -1) * torch.linspace(-5, 5, ATOMS)).sum(-1))


@pytest.mark.parametrize("kind, extra", [("simbav2", {}), ("lora", dict(lora=dict(rank=4)))])
def test_stacked_twin_equals_two_single_critics_with_the_same_weights(kind, extra):
    torch.manual_seed(1)
    twin = make_critic(kind, 5, 2, 16, 2, 11, -1.0, 1.0, num_critics=2, **extra)
    with torch.no_grad():  # make biases and Scalers member-specific too
        for p in twin.parameters():
            p.add_(0.01 * torch.randn_like(p))
    singles = [make_critic(kind, 5, 2, 16, 2, 11, -1.0, 1.0, num_critics=1, **extra) for _ in range(2)]
    twin_state = twin.state_dict()
    for e, single in enumerate(singles):
        state = {
            key: value if value.shape == single.state_dict()[key].shape else value[e : e + 1]
            for key, value in twin_state.items()
        }
        single.load_state_dict(state)
    obs, act = torch.randn(7, 5), torch.rand(7, 2) * 2 - 1
    out = twin(obs, act)
    for e, single in enumerate(singles):
        torch.testing.assert_close(out[e : e + 1], single(obs, act))
    assert not torch.allclose(out[0], out[1])


def adamw_steps(critic, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(
        [
            {"params": lora_parameters(critic), "weight_decay": 2e-4},
            {"params": non_lora_parameters(critic), "weight_decay": 0.0},
        ],
        lr=3e-3,
    )
    obs, act = torch.randn(32, 5, generator=g), torch.rand(32, 2, generator=g)
    target = torch.randn(critic.num_critics, 32, 11, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        ((critic(obs, act) - target) ** 2).mean().backward()
        opt.step()
        project_(critic)


def test_lora_critic_keeps_every_effective_row_on_the_sphere_while_training():
    torch.manual_seed(2)
    critic = make_critic("lora", 5, 2, 16, 2, 11, -1.0, 1.0, num_critics=2, lora=dict(rank=4, alpha=4.0))
    bases = [m.base.clone() for m in critic.modules() if isinstance(m, SphericalLoRALinear)]
    adamw_steps(critic, 20)
    matrices = [m for m in critic.modules() if isinstance(m, (SphericalLinear, SphericalLoRALinear))]
    assert len(matrices) == 1 + 4 + 2
    for m in matrices:
        norms = torch.linalg.vector_norm(m.effective_weight(), dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    assert all(torch.equal(m.base, b) for m, b in zip([m for m in critic.modules() if isinstance(m, SphericalLoRALinear)], bases))


def test_optimiser_groups_partition_the_parameters():
    critic = make_critic("lora", 5, 2, 16, 2, 11, -1.0, 1.0, lora=dict(rank=4))
    lora, rest = lora_parameters(critic), non_lora_parameters(critic)
    layers = [m for m in critic.modules() if isinstance(m, SphericalLoRALinear)]
    assert len(layers) == 4 and len(lora) == 8
    assert {id(p) for p in lora} == {id(p) for m in layers for p in (m.lora_A, m.lora_B)}
    assert {id(p) for p in lora}.isdisjoint(id(p) for p in rest)
    assert len(lora) + len(rest) == len(list(critic.parameters()))


def test_dense_target_is_dense_frozen_and_computes_the_same_function():
    torch.manual_seed(3)
    critic = make_critic("lora", 5, 2, 16, 2, 11, -1.0, 1.0, num_critics=2, lora=dict(rank=4))
    target = dense_target(critic)
    assert not any(isinstance(m, SphericalLoRALinear) for m in target.modules())
    assert all(not p.requires_grad for p in target.parameters())
    online_eff = [m.effective_weight() for m in critic.modules() if isinstance(m, SphericalLoRALinear)]
    target_blocks = [b for blk in target.encoder.blocks for b in (blk.w1, blk.w2)]
    for eff, dense in zip(online_eff, target_blocks):
        assert isinstance(dense, SphericalLinear)
        torch.testing.assert_close(dense.weight, eff.detach())
    obs, act = torch.randn(4, 5), torch.rand(4, 2)
    torch.testing.assert_close(target(obs, act), critic(obs, act).detach(), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, SphericalLoRALinear) for m in critic.modules())  # the online critic is untouched


def test_polyak_update_is_an_ema_of_effective_weights():
    torch.manual_seed(4)
    tau = 0.1
    critic = make_critic("lora", 5, 2, 16, 2, 11, -1.0, 1.0, num_critics=2, lora=dict(rank=4))
    target = dense_target(critic)
    adamw_steps(critic, 5)
    w_t = [p.clone() for p in target.parameters()]
    online_state = {k: v.clone() for k, v in critic.state_dict().items()}
    sources = []
    for t, o in zip(target.modules(), critic.modules()):
        if isinstance(o, SphericalLoRALinear):
            sources.append(o.effective_weight().detach())
        else:
            sources.extend(p.detach() for p in o.parameters(recurse=False))
    atoms = target.atoms.clone()
    polyak_update_(target, critic, tau)
    after = list(target.parameters())
    assert len(after) == len(sources) == len(w_t)
    for new, old, src in zip(after, w_t, sources):
        assert torch.equal(new, tau * src + (1 - tau) * old)
    assert any(not torch.allclose(new, old) for new, old in zip(after, w_t))
    assert torch.equal(target.atoms, atoms)
    assert all(torch.equal(v, critic.state_dict()[k]) for k, v in online_state.items())


def test_polyak_update_rejects_mismatched_networks_and_bad_tau():
    a = make_critic("simbav2", 5, 2, 16, 1, 11, -1.0, 1.0)
    b = make_critic("simbav2", 5, 2, 16, 2, 11, -1.0, 1.0)
    with pytest.raises(ValueError, match="not the same architecture"):
        polyak_update_(a, b, 0.1)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\], got 0"):
        polyak_update_(a, a, 0)


def test_dense_warm_up_conversion():
    torch.manual_seed(5)
    critic = make_critic("simbav2", 5, 2, 16, 2, 11, -1.0, 1.0, num_critics=2)
    adamw_steps(critic, 3)
    old = [(b.w1.weight.detach().clone(), b.w2.weight.detach().clone()) for b in critic.encoder.blocks]
    embedder = critic.encoder.embedder.linear
    assert convert_blocks_to_lora_(critic, rank=4, alpha=4.0, base_init_scale=0.5) == 4
    for block, (w1, w2) in zip(critic.encoder.blocks, old):
        for layer, w in ((block.w1, w1), (block.w2, w2)):
            assert isinstance(layer, SphericalLoRALinear) and layer.ensemble == 2
            torch.testing.assert_close(layer.base, math.sqrt(0.5) * w)
            norms = torch.linalg.vector_norm(layer.effective_weight(), dim=-1)
            torch.testing.assert_close(norms, torch.ones_like(norms))
    assert critic.encoder.embedder.linear is embedder
    assert isinstance(critic.head.linear1, SphericalLinear) and isinstance(critic.head.linear2, SphericalLinear)
    fresh = make_critic("lora", 5, 2, 16, 2, 11, -1.0, 1.0, num_critics=2, lora=dict(rank=4))
    assert count(critic.lora_parameters()) == count(fresh.lora_parameters())


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(kind="dense"), "kind must be one of"),
        (dict(kind="simbav2", lora=dict(rank=4)), "lora settings are only for kind='lora'"),
        (dict(kind="lora", sparsity=0.5), "sparsity is only for kind='sparse'"),
        (dict(kind="sparse"), r"kind='sparse' needs sparsity in \[0, 1\), got None"),
        (dict(kind="lora", lora=dict(rnk=4)), r"unknown lora settings \['rnk'\]; allowed"),
        (dict(kind="simbav2", num_critics=3), "num_critics must be 1 or 2, got 3"),
    ],
)
def test_make_critic_rejects_bad_settings(args, message):
    base = dict(obs_dim=5, act_dim=2, hidden_dim=8, num_blocks=1, num_atoms=11, v_min=-1.0, v_max=1.0)
    with pytest.raises(ValueError, match=message):
        make_critic(**{**base, **args})


def test_bounded_log_std_spans_minus_ten_to_two():
    raw = torch.tensor([-1e4, 0.0, 1e4])
    torch.testing.assert_close(bounded_log_std(raw), torch.tensor([-10.0, -4.0, 2.0]))


@settings(max_examples=50, deadline=None)
@given(mean=st.floats(-3, 3), log_std=st.floats(-3, 1), noise=st.floats(-3, 3))
def test_tanh_gaussian_log_prob_matches_the_change_of_variables(mean, log_std, noise):
    m, s, n = (torch.tensor([[v]], dtype=torch.float64) for v in (mean, log_std, noise))
    action, log_prob = tanh_gaussian_sample(m, s, n)
    u = m + s.exp() * n
    base = torch.distributions.Normal(m, s.exp()).log_prob(u)
    expected = (base - torch.log1p(-torch.tanh(u) ** 2)).sum(-1)
    torch.testing.assert_close(log_prob, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(action, torch.tanh(u))


def test_tanh_gaussian_log_prob_is_finite_where_tanh_saturates():
    _, log_prob = tanh_gaussian_sample(torch.tensor([[30.0, -30.0]]), torch.zeros(1, 2), torch.zeros(1, 2))
    assert torch.isfinite(log_prob).all()


def test_sac_actor_samples_reparameterised_actions_and_deterministic_tanh_mean():
    torch.manual_seed(6)
    actor = TanhGaussianActor(5, 3, 16, 1)
    obs = torch.randn(8, 5)
    action, log_prob = actor(obs)
    assert action.shape == (8, 3) and log_prob.shape == (8,)
    assert torch.all(action.abs() < 1)
    (action.sum() + log_prob.sum()).backward()
    assert actor.mean_head.linear2.weight.grad.abs().sum() > 0
    assert actor.log_std_head.linear2.weight.grad.abs().sum() > 0
    expected = torch.tanh(actor.mean_head(actor.encoder(obs)))
    torch.testing.assert_close(actor.deterministic_action(obs), expected)


def test_td3_actor_is_tanh_of_its_head():
    actor = DeterministicActor(5, 3, 16, 1)
    obs = torch.randn(4, 5)
    torch.testing.assert_close(actor(obs), torch.tanh(actor.head(actor.encoder(obs))))
    torch.testing.assert_close(actor.deterministic_action(obs), actor(obs))


def test_critic_class_is_usable_directly():
    critic = CategoricalCritic(5, 2, 8, 1, 11, -1.0, 1.0, num_critics=2)
    assert critic(torch.randn(3, 5), torch.rand(3, 2)).shape == (2, 3, 11)
