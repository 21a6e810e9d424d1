"""Hyperspherical LoRA (DESIGN §3, Eqs. 11-15) and its ablation switches."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora.hypersphere import SphericalLinear
from fasttd3_lora.adapters import lora_delta
from fasttd3_lora.lora import SphericalLoRALinear
from fasttd3_lora.lora_projection import hyperspherical_lora_weight, positive_root, projection_factors


def row_norms(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(w, dim=-1)


def assert_unit_rows(w: torch.Tensor, tol: float = 1e-5) -> None:
    err = (row_norms(w.float()) - 1).abs().max().item()
    assert err <= tol, f"max | ||w_i|| - 1 | = {err}"


def train_steps(layer: SphericalLoRALinear, steps: int, seed: int = 0, check=None) -> None:
    """AdamW steps on a random regression, each followed by project_()."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=2e-4)
    x = torch.randn(32, layer.in_features, generator=g)
    y = torch.randn(32, layer.out_features, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        opt.step()
        before = layer.lora_B.detach().clone()
        layer.project_()
        if check is not None:
            check(before)


@pytest.mark.parametrize("ensemble", [None, 2])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_projection_invariants_hold_over_many_adamw_steps(shape, ensemble):
    torch.manual_seed(0)
    layer = SphericalLoRALinear(*shape, rank=8, alpha=8.0, ensemble=ensemble)
    base0 = layer.base.clone()
    w_init = layer.effective_weight().detach().clone()
    assert_unit_rows(w_init)

    def check(b_before):
        assert_unit_rows(layer.effective_weight())
        assert torch.equal(layer.base, base0)
        ratio = layer.lora_B / b_before  # every row of B was multiplied by one positive factor
        c = ratio[..., :1]
        torch.testing.assert_close(ratio, c.expand_as(ratio), rtol=1e-5, atol=0)
        assert torch.all(c > 0)

    train_steps(layer, 50, check=check)
    assert (layer.effective_weight() - w_init).abs().max() > 0.1  # the adapters did move


@settings(max_examples=300, deadline=None)
@given(
    log_norm=st.floats(-6, 3),
    cosine=st.one_of(st.floats(-1, 1), st.sampled_from([-1.0, -1.0 + 1e-7, -0.999999, 0.0, 1.0])),
    base_sq=st.one_of(st.floats(1e-6, 1 - 1e-5), st.sampled_from([0.5, 0.99, 0.999, 0.9999, 1 - 1e-5])),
)
def test_positive_root_puts_the_row_on_the_sphere(log_norm, cosine, base_sq):
    # w0 = sqrt(base_sq) e1; dw = ||dw|| (cos e1 + sin e2), in float32 as the layer holds them.
    n = 10.0**log_norm
    sine = math.sqrt(max(0.0, 1 - cosine * cosine))
    w0 = torch.zeros(8, dtype=torch.float32)
    w0[0] = math.sqrt(base_sq)
    dw = torch.zeros(8, dtype=torch.float32)
    dw[0], dw[1] = n * cosine, n * sine
    c = projection_factors(w0, dw)
    assert c.dtype == torch.float32
    assert torch.isfinite(c) and c > 0
    norm = torch.linalg.vector_norm(w0.double() + c.double() * dw.double())
    assert abs(norm.item() - 1) < 2e-6, f"||w0 + c dw|| = {norm.item()}, c = {c.item()}"


def test_positive_root_is_the_positive_solution_of_the_quadratic():
    a = torch.tensor([4.0, 1.0, 0.25])
    b = torch.tensor([0.0, -0.5, 0.3])
    g = torch.tensor([0.5, 0.75, 0.1])
    c = positive_root(a, b, g)
    torch.testing.assert_close(a * c * c + 2 * b * c - g, torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(c, (-b + torch.sqrt(b * b + a * g)) / a)
    assert torch.all(c > 0)


def test_reference_weight_does_not_mutate_and_matches_project():
    torch.manual_seed(1)
    layer = SphericalLoRALinear(16, 32, rank=4, alpha=4.0, project=False)  # unprojected adapters
    layer.project = True
    b_before = layer.lora_B.detach().clone()
    w_eff, c = hyperspherical_lora_weight(layer.base, layer.lora_A, layer.lora_B, layer.scale)
    assert torch.equal(layer.lora_B, b_before)
    assert_unit_rows(w_eff, 1e-6)
    layer.project_()
    torch.testing.assert_close(layer.lora_B, b_before * c.unsqueeze(-1))
    torch.testing.assert_close(layer.effective_weight(), w_eff)


def test_base_and_adapter_init():
    torch.manual_seed(2)
    layer = SphericalLoRALinear(64, 32, rank=16, alpha=32.0, base_init_scale=0.3)
    torch.testing.assert_close(row_norms(layer.base) ** 2, torch.full((32,), 0.3))
    # out <= in: orthogonal rows, each of squared norm base_init_scale
    torch.testing.assert_close(layer.base @ layer.base.T, 0.3 * torch.eye(32), atol=1e-5, rtol=0)
    assert layer.lora_A.std().item() == pytest.approx(1 / 4, rel=0.1)  # N(0, 1/r)
    assert layer.scale == 2.0
    assert not layer.base.requires_grad
    assert [name for name, _ in layer.named_parameters()] == ["lora_A", "lora_B"]
    torch.testing.assert_close(layer.delta_weight(), lora_delta(layer.lora_A, layer.lora_B, 2.0))


@pytest.mark.parametrize("value", [1.0, 1.5, 0.0, -0.2])
def test_base_init_scale_outside_open_unit_interval_is_rejected(value):
    with pytest.raises(ValueError, match=rf"base_init_scale must be in the open interval \(0, 1\), got {value}"):
        SphericalLoRALinear(16, 8, rank=4, base_init_scale=value)


@pytest.mark.parametrize("rank", [0, -1, 9])
def test_rank_outside_range_is_rejected(rank):
    with pytest.raises(ValueError, match=rf"rank must be an int in \[1, min\(in, out\)\] = \[1, 8\], got {rank}"):
        SphericalLoRALinear(16, 8, rank=rank)


@pytest.mark.parametrize("base_rank", [0, 8])
def test_base_rank_outside_range_is_rejected(base_rank):
    with pytest.raises(ValueError, match=rf"base_rank must be None or an int in \[1, min\(in, out\)\) = \[1, 8\), got {base_rank}"):
        SphericalLoRALinear(16, 8, rank=4, base_rank=base_rank)


def test_nobase_has_zero_base_and_unit_rows_from_adapters_alone():
    torch.manual_seed(3)
    layer = SphericalLoRALinear(32, 16, rank=4, alpha=4.0, use_base=False)
    assert torch.equal(layer.base, torch.zeros(16, 32))
    torch.testing.assert_close(layer.effective_weight(), layer.delta_weight())
    train_steps(layer, 10, check=lambda _: assert_unit_rows(layer.effective_weight()))
    assert torch.equal(layer.base, torch.zeros(16, 32))
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ layer.effective_weight().T)


@pytest.mark.parametrize("base_rank", [1, 5])
def test_low_rank_base_has_that_rank_and_rescaled_rows(base_rank):
    torch.manual_seed(4)
    layer = SphericalLoRALinear(24, 16, rank=4, base_rank=base_rank, ensemble=2)
    assert torch.all(torch.linalg.matrix_rank(layer.base) == base_rank)
    torch.testing.assert_close(row_norms(layer.base) ** 2, torch.full((2, 16), 0.5))
    assert_unit_rows(layer.effective_weight())


def test_nown_does_not_project():
    torch.manual_seed(5)
    layer = SphericalLoRALinear(32, 16, rank=4, alpha=4.0, project=False)
    b = layer.lora_B.detach().clone()
    layer.project_()
    assert torch.equal(layer.lora_B, b)
    assert (row_norms(layer.effective_weight()) - 1).abs().max() > 1e-2  # not on the sphere
    _, c = hyperspherical_lora_weight(layer.base, layer.lora_A, layer.lora_B, layer.scale, project=False)
    assert torch.equal(c, torch.ones(16))


@pytest.mark.parametrize("ensemble", [None, 3])
def test_from_dense_freezes_the_rescaled_dense_weight(ensemble):
    torch.manual_seed(6)
    dense = SphericalLinear(20, 12, ensemble=ensemble)
    lora = SphericalLoRALinear.from_dense(dense, rank=4, alpha=4.0, base_init_scale=0.4)
    assert lora.ensemble == ensemble and lora.rank == 4
    torch.testing.assert_close(lora.base, math.sqrt(0.4) * dense.weight.detach())
    x = torch.randn(5, 20)
    torch.testing.assert_close(x @ lora.base.mT, math.sqrt(0.4) * dense(x).detach())  # same function, rescaled
    assert_unit_rows(lora.effective_weight())
    assert lora.lora_A.std().item() == pytest.approx(0.5, rel=0.2)  # fresh N(0, 1/r) adapters


def test_from_dense_rejects_other_layers():
    with pytest.raises(ValueError, match="from_dense expects a SphericalLinear, got SphericalLoRALinear"):
        SphericalLoRALinear.from_dense(SphericalLoRALinear(8, 8, rank=2), rank=2)


@pytest.mark.parametrize("ensemble", [None, 2])
def test_factored_and_dense_forward_agree(ensemble):
    torch.manual_seed(7)
    layer = SphericalLoRALinear(48, 16, rank=4, alpha=8.0, ensemble=ensemble)
    threshold = 48 * 16 / (48 + 16)  # 12 rows: below uses the factored form, above the dense one
    lead = () if ensemble is None else (ensemble,)
    for rows in (3, 12, 13, 40):
        x = torch.randn(*lead, rows, 48)
        expected = x @ layer.effective_weight().mT
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        assert (rows > threshold) == (rows >= 13)


@pytest.mark.parametrize("rows", [2, 64])  # factored and dense paths
def test_gradients_reach_only_the_adapters(rows):
    layer = SphericalLoRALinear(16, 8, rank=4)
    layer(torch.randn(rows, 16)).square().sum().backward()
    assert layer.base.grad is None and not layer.base.requires_grad
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_projection_stays_fp32_inside_a_bf16_autocast_region():
    torch.manual_seed(8)
    layer = SphericalLoRALinear(64, 128, rank=8, project=False)
    layer.project = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.project_()
        w_eff, _ = hyperspherical_lora_weight(layer.base, layer.lora_A, layer.lora_B, layer.scale)
    assert_unit_rows(layer.effective_weight(), 1e-6)
    assert w_eff.dtype == torch.float32
    assert_unit_rows(w_eff, 1e-6)
