"""The general LoRA adapter layer (DESIGN §10): frozen base, N adapters, mixed batches, the ensemble axis, one
adapter's tensors on their own, sizes, wrapping an existing network; and the contract the critic's
hyperspherical layer shares (optimiser groups, dense targets, Polyak)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fasttd3_lora.adapters import AdapterLayer, LoRALinear, add_adapters, adapter_layers, adapter_parameters
from fasttd3_lora.lora import SphericalLoRALinear
from fasttd3_lora.networks import dense_target, make_critic, optimizer_groups, polyak_update_


def trained(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    """Give every adapter different, non-zero factors (as after fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return layer


def test_zero_b_adapters_equal_the_base_and_only_the_factors_train() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(6, 5, rank=2, num_adapters=3)
    x = torch.randn(7, 6)
    base = x @ layer.base.T + layer.base_bias
    for k in range(3):
        assert torch.equal(layer(x, adapter=k), base)
        assert torch.equal(layer.merged_weight(k), layer.base)
    assert [name for name, _ in layer.named_parameters()] == ["lora_A", "lora_B"]
    assert {name for name, _ in layer.named_buffers()} == {"base", "base_bias"}
    frozen = layer.base.clone(), layer.base_bias.clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(x, adapter=1).square().sum().backward()
        opt.step()
    assert torch.equal(layer.base, frozen[0]) and torch.equal(layer.base_bias, frozen[1])
    assert not torch.equal(layer(x, adapter=1), base)  # adapter 1 trained...
    assert torch.equal(layer(x, adapter=0), base) and torch.equal(layer(x, adapter=2), base)  # ...the others not


@settings(max_examples=30, deadline=None)
@given(
    num_adapters=st.integers(1, 5),
    rows=st.integers(1, 9),
    rank=st.integers(1, 3),
    ensemble=st.sampled_from([None, 2]),
    seed=st.integers(0, 2**16),
)
def test_a_mixed_batch_equals_each_row_through_its_own_merged_weight(num_adapters, rows, rank, ensemble, seed) -> None:
    torch.manual_seed(seed)
    layer = trained(LoRALinear(4, 3, rank=rank, num_adapters=num_adapters, alpha=2.0 * rank, ensemble=ensemble), seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, 4) if ensemble is None else (ensemble, rows, 4), generator=g, dtype=torch.float32)
    idx = torch.randint(0, num_adapters, (rows,), generator=g)
    mixed = layer(x, adapter=idx)
    for b in range(rows):
        k = int(idx[b])
        xb = x[..., b : b + 1, :]
        merged = xb @ layer.merged_weight(k).mT + layer.base_bias
        single = layer(x, adapter=k)[..., b : b + 1, :]
        torch.testing.assert_close(mixed[..., b : b + 1, :], merged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[..., b : b + 1, :], single, rtol=1e-6, atol=1e-6)


def test_merged_weight_is_w0_plus_alpha_over_r_b_a() -> None:
    layer = trained(LoRALinear(5, 4, rank=2, num_adapters=2, alpha=6.0))
    for k in range(2):
        expected = layer.base + 3.0 * layer.lora_B[k] @ layer.lora_A[k]
        torch.testing.assert_close(layer.merged_weight(k), expected)


def test_the_ensemble_axis_composes_with_the_adapter_axis() -> None:
    layer = trained(LoRALinear(4, 3, rank=2, num_adapters=2, ensemble=3))
    assert layer.base.shape == (3, 3, 4) and layer.lora_A.shape == (2, 3, 2, 4) and layer.lora_B.shape == (2, 3, 3, 2)
    x = torch.randn(3, 5, 4)
    y = layer(x, adapter=1)
    for e in range(3):  # member e of adapter 1 is its own matrix
        w = layer.base[e] + layer.lora_B[1, e] @ layer.lora_A[1, e]
        torch.testing.assert_close(y[e], x[e] @ w.T + layer.base_bias[e], rtol=1e-5, atol=1e-5)


def test_one_adapter_saves_and_loads_alone(tmp_path) -> None:
    source = trained(LoRALinear(6, 5, rank=3, num_adapters=4))
    torch.save(source.adapter_state(2), tmp_path / "adapter.pt")
    target = LoRALinear(6, 5, rank=3, num_adapters=2, weight=source.base, bias_value=source.base_bias)
    target.load_adapter_state_(1, torch.load(tmp_path / "adapter.pt", weights_only=True))
    x = torch.randn(4, 6)
    torch.testing.assert_close(target(x, adapter=1), source(x, adapter=2), rtol=0, atol=0)
    assert torch.equal(target(x, adapter=0), x @ source.base.T + source.base_bias)  # adapter 0 untouched
    with pytest.raises(ValueError, match=r"^adapter state lora_A: shape \(2, 6\), expected shape \(3, 6\)$"):
        target.load_adapter_state_(0, {"lora_A": torch.zeros(2, 6), "lora_B": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match=r"^adapter state lora_B: missing, expected shape \(5, 3\)$"):
        target.load_adapter_state_(0, {"lora_A": torch.zeros(3, 6)})


def test_sizes_per_adapter_follow_r_times_in_plus_out() -> None:
    layer = LoRALinear(512, 256, rank=4, num_adapters=10)
    assert layer.adapter_numel() == 4 * (512 + 256)
    assert layer.adapter_nbytes() == 4 * (512 + 256) * 4
    assert layer.base_numel() == 512 * 256 + 256
    assert LoRALinear(8, 6, rank=2, ensemble=3).adapter_numel() == 3 * 2 * (8 + 6)


def test_gaussian_b_starts_away_from_the_base() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(8, 8, rank=4, init_B="gaussian")
    assert not torch.equal(layer.merged_weight(0), layer.base)
    assert layer.lora_B.std().item() == pytest.approx(0.5, rel=0.35)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), r"rank must be an int in \[1, min\(in, out\)\] = \[1, 3\], got 0"),
        (dict(rank=4), r"rank must be an int in \[1, min\(in, out\)\] = \[1, 3\], got 4"),
        (dict(num_adapters=0), r"num_adapters must be an int >= 1, got 0"),
        (dict(alpha=-1.0), r"alpha must be a finite number > 0, got -1.0"),
        (dict(init_B="ones"), r"init_B must be one of \('zeros', 'gaussian', 'mirror'\), got 'ones'"),
        (dict(weight=torch.zeros(3, 3)), r"weight has shape \(3, 3\), expected \(3, 4\)"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LoRALinear(4, 3, **{"rank": 2, **kwargs})


def test_bad_adapter_indices_are_refused() -> None:
    layer = LoRALinear(4, 3, rank=2, num_adapters=2)
    with pytest.raises(ValueError, match=r"adapter must be an int in \[0, 2\), got 2"):
        layer(torch.zeros(1, 4), adapter=2)
    with pytest.raises(ValueError, match=r"adapter must be an int or a \(3,\) long tensor, got torch.int32 \(3,\)"):
        layer(torch.zeros(3, 4), adapter=torch.zeros(3, dtype=torch.int32))


def test_add_adapters_wraps_the_chosen_linears_over_their_current_weights() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ELU(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 2))
    x = torch.randn(6, 5)
    before = net(x)
    chosen = [net[0], net[4]]  # the caller picks; nothing is matched by name
    wrapped = add_adapters(net, chosen, rank=2, num_adapters=3)
    assert [type(m) for m in net] == [LoRALinear, nn.ELU, nn.Linear, nn.ELU, LoRALinear]
    assert wrapped == [net[0], net[4]] and adapter_layers(net) == wrapped
    assert torch.equal(net(x), before)  # B = 0: the wrapped network is the original one
    assert torch.equal(net[0].base, chosen[0].weight) and torch.equal(net[4].base_bias, chosen[1].bias)
    assert {id(p) for p in adapter_parameters(net)} == {id(p) for m in wrapped for p in (m.lora_A, m.lora_B)}
    with pytest.raises(ValueError, match="is not a submodule of the network"):
        add_adapters(net, [nn.Linear(2, 2)])


def test_dense_copy_and_polyak_go_through_the_contract_for_both_kinds() -> None:
    torch.manual_seed(0)
    layer = trained(LoRALinear(4, 3, rank=2))
    dense = layer.dense_copy()
    x = torch.randn(5, 4)
    torch.testing.assert_close(dense(x), layer(x))
    assert not any(p.requires_grad for p in dense.parameters())

    critic = make_critic("lora", 6, 2, 16, 1, 11, -1.0, 1.0, num_critics=2, lora=dict(rank=4, alpha=4.0))
    spherical = [m for m in critic.modules() if isinstance(m, SphericalLoRALinear)]
    assert spherical and adapter_layers(critic) == spherical
    assert all(isinstance(m, AdapterLayer) for m in spherical)
    groups = optimizer_groups(critic, 1e-3)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for m in spherical for p in (m.lora_A, m.lora_B)}
    target = dense_target(critic)
    assert adapter_layers(target) == []
    with torch.no_grad():
        for m in spherical:
            m.lora_A.add_(0.1)
            m.project_()
    polyak_update_(target, critic, 1.0)  # tau = 1: the target takes the online effective weights
    pairs = [(t, o) for t, o in zip(target.modules(), critic.modules()) if isinstance(o, SphericalLoRALinear)]
    assert len(pairs) == len(spherical)
    assert all(torch.equal(t.weight, o.effective_weight()) for t, o in pairs)
