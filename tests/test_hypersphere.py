"""Row normalisation, orthogonal unit-row init, SphericalLinear and the `project_` walk (DESIGN §1, Eq. 8)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fasttd3_lora.hypersphere import SphericalLinear, l2_normalize, orthogonal_unit_rows_, project_


def row_norms(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(w, dim=-1)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 8), log_scale=st.floats(-6, 6), seed=st.integers(0, 2**31))
def test_l2_normalize_gives_unit_rows_in_the_same_direction(rows, cols, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 10.0**log_scale
    y = l2_normalize(x)
    torch.testing.assert_close(row_norms(y), torch.ones(rows, dtype=torch.float64))
    # Same direction: y is a positive multiple of x.
    torch.testing.assert_close(y * row_norms(x).unsqueeze(-1), x)


def test_l2_normalize_keeps_a_zero_row_zero():
    y = l2_normalize(torch.zeros(2, 3))
    assert torch.equal(y, torch.zeros(2, 3))


@pytest.mark.parametrize("shape", [(16, 4), (4, 16), (8, 8), (3, 16, 4), (2, 4, 16)])
def test_orthogonal_unit_rows_has_unit_rows_and_orthonormal_rows_when_wide(shape):
    w = orthogonal_unit_rows_(torch.empty(shape))
    torch.testing.assert_close(row_norms(w), torch.ones(shape[:-1]))
    out, inp = shape[-2:]
    if out <= inp:  # rows of a wide orthogonal matrix are orthonormal
        torch.testing.assert_close(w @ w.mT, torch.eye(out).expand(*shape[:-2], out, out), atol=1e-5, rtol=0)
    else:  # tall: rows cannot all be orthogonal; the row rescale keeps full column rank
        assert torch.linalg.matrix_rank(w).min() == inp


def test_orthogonal_init_of_a_tall_matrix_alone_would_not_give_unit_rows():
    # The reason for the row normalisation (DESIGN §9): a raw (out > in) orthogonal matrix has rows ~ sqrt(in/out).
    raw = nn.init.orthogonal_(torch.empty(64, 16))
    assert row_norms(raw).mean().item() == pytest.approx((16 / 64) ** 0.5, rel=0.05)


def test_ensemble_members_are_drawn_independently():
    w = orthogonal_unit_rows_(torch.empty(2, 8, 8))
    assert not torch.allclose(w[0], w[1])


def test_spherical_linear_forward_is_x_times_w_transpose_and_broadcasts_over_members():
    layer = SphericalLinear(5, 3, ensemble=2)
    x = torch.randn(7, 5)
    y = layer(x)
    assert y.shape == (2, 7, 3)
    for e in range(2):
        torch.testing.assert_close(y[e], x @ layer.weight[e].T)
    assert layer.effective_weight() is layer.weight


def test_project_walks_nested_projected_modules_only():
    net = nn.Sequential(SphericalLinear(4, 6), nn.Sequential(nn.Linear(6, 6), SphericalLinear(6, 2, ensemble=3)))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0).add_(0.1)
    plain_before = net[1][0].weight.clone()
    project_(net)
    for layer in (net[0], net[1][1]):
        torch.testing.assert_close(row_norms(layer.weight), torch.ones(layer.weight.shape[:-1]))
    assert torch.equal(net[1][0].weight, plain_before)  # an ordinary Linear is not projected


def test_mask_is_reapplied_by_project():
    layer = SphericalLinear(6, 4)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[:, 0] = True  # keep every row non-empty
    layer.set_mask_(mask)
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer.project_()
    assert torch.all(layer.weight[~mask] == 0)
    torch.testing.assert_close(row_norms(layer.weight), torch.ones(4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(in_features=0, out_features=3), "in_features must be an int >= 1, got 0"),
        (dict(in_features=3, out_features=-2), "out_features must be an int >= 1, got -2"),
        (dict(in_features=3, out_features=3, ensemble=0), "ensemble must be None or an int >= 1, got 0"),
    ],
)
def test_bad_sizes_raise_value_error_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SphericalLinear(**kwargs)


def test_mask_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"mask shape \(3, 4\) must equal weight shape \(4, 3\)"):
        SphericalLinear(3, 4).set_mask_(torch.ones(3, 4, dtype=torch.bool))
