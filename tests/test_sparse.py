"""Sparse baseline (DESIGN §4): Erdős–Rényi densities, masks, masked entries staying exactly zero."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora.hypersphere import SphericalLinear, project_
from fasttd3_lora.networks import make_critic
from fasttd3_lora.sparse import apply_sparsity_, bernoulli_mask, erdos_renyi_densities, masked_layers

shapes_strategy = st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(shapes=shapes_strategy, sparsity=st.floats(0, 0.99))
def test_er_densities_keep_the_target_fraction_and_stay_in_unit_interval(shapes, sparsity):
    d = erdos_renyi_densities(shapes, sparsity)
    assert all(0.0 <= x <= 1.0 for x in d)
    sizes = [a * b for a, b in shapes]
    kept = sum(x * n for x, n in zip(d, sizes)) / sum(sizes)
    assert kept == pytest.approx(1 - sparsity, rel=1e-9, abs=1e-12)
    # Non-dense tensors follow the ER rule with one common eps.
    eps = {round(x / ((a + b) / (a * b)), 9) for x, (a, b) in zip(d, shapes) if x < 1.0}
    assert len(eps) <= 1


def test_small_tensors_are_made_dense_and_eps_is_resolved():
    shapes = [(1000, 3), (1000, 1000)]
    d = erdos_renyi_densities(shapes, 0.5)
    assert d[0] == 1.0  # ER would give it density > 1
    assert d[1] == pytest.approx((0.5 * 1_003_000 - 3000) / 1_000_000)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_bad_sparsity_is_rejected(sparsity):
    with pytest.raises(ValueError, match=rf"sparsity must be in \[0, 1\), got {sparsity}"):
        erdos_renyi_densities([(4, 4)], sparsity)


def test_masks_are_reproducible_from_the_generator():
    a = bernoulli_mask((50, 40), 0.3, torch.Generator().manual_seed(3))
    b = bernoulli_mask((50, 40), 0.3, torch.Generator().manual_seed(3))
    c = bernoulli_mask((50, 40), 0.3, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.bool


def achieved_sparsity(net) -> float:
    layers = masked_layers(net)
    zeros = sum((layer.weight == 0).sum().item() for layer in layers)
    return zeros / sum(layer.weight.numel() for layer in layers)


@pytest.mark.parametrize("hidden, blocks, sparsity, critics", [(512, 2, 0.7, 2), (1024, 4, 0.85, 1)])
def test_critic_sparsity_is_within_one_percent_of_target(hidden, blocks, sparsity, critics):
    torch.manual_seed(0)
    critic = make_critic(
        "sparse", 24, 6, hidden, blocks, 101, -5.0, 5.0, num_critics=critics, sparsity=sparsity,
        generator=torch.Generator().manual_seed(0),
    )
    assert abs(achieved_sparsity(critic) - sparsity) < 0.01
    layers = masked_layers(critic)
    assert len(layers) == 1 + 2 * blocks + 2  # embedder, block W1/W2, two head matrices
    assert all(layer.mask is not None for layer in layers)
    if critics == 2:  # one mask per member
        assert not torch.equal(layers[1].mask[0], layers[1].mask[1])


def test_masked_entries_stay_exactly_zero_through_adamw_with_weight_decay():
    torch.manual_seed(1)
    critic = make_critic("sparse", 5, 2, 32, 2, 11, -1.0, 1.0, num_critics=2, sparsity=0.7,
                         generator=torch.Generator().manual_seed(1))
    layers = masked_layers(critic)
    masks = [layer.mask.clone() for layer in layers]
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2, weight_decay=0.1)
    obs, act = torch.randn(64, 5), torch.rand(64, 2) * 2 - 1
    target = torch.randn(2, 64, 11)
    for _ in range(100):
        opt.zero_grad()
        ((critic(obs, act) - target) ** 2).mean().backward()
        opt.step()
        assert any((layer.weight[~mask] != 0).any() for layer, mask in zip(layers, masks))  # the step un-zeroes
        project_(critic)
        for layer, mask in zip(layers, masks):
            assert torch.all(layer.weight[~mask] == 0)
    for layer, mask in zip(layers, masks):
        assert torch.equal(layer.mask, mask)
        norms = torch.linalg.vector_norm(layer.weight, dim=-1)
        nonempty = mask.any(-1)
        torch.testing.assert_close(norms[nonempty], torch.ones_like(norms[nonempty]))


def test_scalers_and_biases_stay_dense():
    critic = make_critic("sparse", 5, 2, 16, 1, 11, -1.0, 1.0, sparsity=0.9, generator=torch.Generator().manual_seed(2))
    layer_params = {id(layer.weight) for layer in masked_layers(critic)}
    others = [p for p in critic.parameters() if id(p) not in layer_params]
    assert others and all(torch.all(p != 0) for p in others if p is not critic.head.bias)


def test_apply_sparsity_refuses_lora_layers():
    critic = make_critic("lora", 5, 2, 16, 1, 11, -1.0, 1.0, lora=dict(rank=2))
    with pytest.raises(ValueError, match=r"sparsity applies to dense SphericalLinear layers only, found \['SphericalLoRALinear'\]"):
        apply_sparsity_(critic, 0.5)


def test_apply_sparsity_returns_er_densities_per_layer():
    net = torch.nn.Sequential(SphericalLinear(10, 200), SphericalLinear(200, 200))
    densities = apply_sparsity_(net, 0.6, torch.Generator().manual_seed(5))
    assert densities == pytest.approx(erdos_renyi_densities([(200, 10), (200, 200)], 0.6))
    assert math.isclose(densities[0], 1.0)  # the thin layer would exceed 1: dense
