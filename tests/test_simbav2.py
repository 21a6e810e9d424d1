"""SimbaV2 blocks (DESIGN §1): Scaler semantics, unit-norm features and weights, LERP block, head."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora.hypersphere import SphericalLinear, l2_normalize, project_
from fasttd3_lora.simbav2 import (
    C_SHIFT,
    HEAD_SCALER_INIT,
    Block,
    Embedder,
    Head,
    Scaler,
    SimbaV2Encoder,
    block_scaler_init,
    embedder_scaler_init,
    residual_alpha_init,
    residual_alpha_scale,
)


def effective(scaler: Scaler) -> torch.Tensor:
    return scaler.weight * (scaler.init / scaler.scale)


def test_scaler_parameter_starts_at_scale_and_acts_with_init():
    s = Scaler(4, init=0.25, scale=0.05)
    assert torch.all(s.weight == 0.05)
    x = torch.randn(3, 4)
    torch.testing.assert_close(s(x), 0.25 * x)


def test_scaler_gradient_is_scaled_by_init_over_scale():
    # The point of the (init, scale) split: the optimiser sees p, the network sees p * init/scale.
    s = Scaler(3, init=2.0, scale=0.5)
    s(torch.ones(1, 3)).sum().backward()
    torch.testing.assert_close(s.weight.grad, torch.full((3,), 4.0))


def test_stacked_scaler_has_per_member_feature_shape():
    s = Scaler(5, 1.0, 1.0, ensemble=2)
    assert s.weight.shape == (2, 1, 5)
    assert s(torch.ones(2, 3, 5)).shape == (2, 3, 5)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf")])
def test_scaler_rejects_non_positive_scale(scale):
    with pytest.raises(ValueError, match=f"scale must be a finite number > 0, got {scale}"):
        Scaler(3, 1.0, scale)


def test_encoder_scalers_start_at_their_effective_inits():
    d, blocks = 32, 3
    enc = SimbaV2Encoder(7, d, blocks)
    torch.testing.assert_close(effective(enc.embedder.scaler), torch.full((d,), math.sqrt(2 / d)))
    for block in enc.blocks:
        torch.testing.assert_close(effective(block.scaler), torch.full((4 * d,), math.sqrt(2 / d) / 2))
        torch.testing.assert_close(effective(block.alpha), torch.full((d,), 1 / (blocks + 1)))
        assert block.alpha.scale == pytest.approx(1 / math.sqrt(d))
    head = Head(d, 3)
    torch.testing.assert_close(effective(head.scaler), torch.full((d,), 1.0))
    assert torch.all(head.bias == 0)
    # the named constants are the DESIGN values
    assert (C_SHIFT, HEAD_SCALER_INIT) == (3.0, 1.0)
    assert embedder_scaler_init(d) == block_scaler_init(d) * 2 == math.sqrt(2 / d)
    assert residual_alpha_init(blocks) == 0.25 and residual_alpha_scale(16) == 0.25


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 6),
    log_scale=st.floats(-3, 3),
    ensemble=st.sampled_from([None, 2]),
    seed=st.integers(0, 2**31),
)
def test_encoder_features_have_unit_norm(batch, log_scale, ensemble, seed):
    torch.manual_seed(seed)
    enc = SimbaV2Encoder(5, 16, 2, ensemble=ensemble)
    h = enc(torch.randn(batch, 5) * 10.0**log_scale)
    assert h.shape == ((batch, 16) if ensemble is None else (ensemble, batch, 16))
    torch.testing.assert_close(torch.linalg.vector_norm(h, dim=-1), torch.ones(h.shape[:-1]))


def test_all_matrices_start_with_unit_rows_and_project_restores_them():
    enc = SimbaV2Encoder(5, 16, 2, ensemble=2)
    layers = [m for m in enc.modules() if isinstance(m, SphericalLinear)]
    assert len(layers) == 1 + 2 * 2  # embedder + (W1, W2) per block
    for layer in layers:
        torch.testing.assert_close(torch.linalg.vector_norm(layer.weight, dim=-1), torch.ones(layer.weight.shape[:-1]))
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(1.7)
    scalers = [p.clone() for m in enc.modules() if isinstance(m, Scaler) for p in m.parameters()]
    project_(enc)
    for layer in layers:
        torch.testing.assert_close(torch.linalg.vector_norm(layer.weight, dim=-1), torch.ones(layer.weight.shape[:-1]))
    after = [p for m in enc.modules() if isinstance(m, Scaler) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(scalers, after))  # Scalers are not projected


def test_embedder_appends_the_shift_before_normalising():
    emb = Embedder(3, 8)
    x = torch.randn(4, 3)
    expected = l2_normalize(emb.scaler(l2_normalize(torch.cat([x, torch.full((4, 1), 3.0)], -1)) @ emb.linear.weight.T))
    torch.testing.assert_close(emb(x), expected)
    # The shift keeps the input's norm: x and 2x embed differently.
    assert not torch.allclose(emb(x), emb(2 * x))


def test_block_lerp_endpoints():
    d = 8
    block = Block(d, 1)
    h = l2_normalize(torch.randn(5, d))
    u = torch.relu(block.scaler(h @ block.w1.weight.T)) + 1e-8
    h_tilde = l2_normalize(u @ block.w2.weight.T)
    with torch.no_grad():
        block.alpha.weight.zero_()  # alpha = 0: the block is the identity on unit vectors
    torch.testing.assert_close(block(h), h)
    with torch.no_grad():
        block.alpha.weight.fill_(block.alpha.scale / block.alpha.init)  # effective alpha = 1: the block is h~
    torch.testing.assert_close(block(h), h_tilde)


def test_block_matrices_have_expansion_four_and_come_from_the_factory():
    made = []

    def factory(in_features, out_features, *, ensemble=None):
        made.append((in_features, out_features, ensemble))
        return SphericalLinear(in_features, out_features, ensemble=ensemble)

    Block(8, 2, factory, ensemble=2)
    assert made == [(8, 32, 2), (32, 8, 2)]


def test_head_is_linear_scaler_linear_plus_bias():
    head = Head(6, 3, ensemble=2)
    with torch.no_grad():
        head.bias.copy_(torch.randn(2, 1, 3))
    h = torch.randn(4, 6)
    w1, w2 = head.linear1.weight, head.linear2.weight
    expected = (h @ w1.mT) @ w2.mT + head.bias  # scaler is 1 at init
    torch.testing.assert_close(head(h), expected)
    assert head(h).shape == (2, 4, 3)


def test_encoder_rejects_zero_blocks():
    with pytest.raises(ValueError, match="num_blocks must be an int >= 1, got 0"):
        SimbaV2Encoder(3, 8, 0)
