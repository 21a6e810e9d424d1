"""Running statistics (DESIGN §1 observation normalisation, §5 reward scaling)."""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora.normalization import RewardNormalizer, RunningMeanStd

EPS = 1e-4  # initial pseudo-count of the (mean 0, var 1) prior


def pooled_with_prior(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean / population variance of the data pooled with a pseudo-sample set of weight EPS, mean 0, var 1.

    mu = sum(x) / (n + EPS);  M2 = EPS (1 + mu^2) + sum((x - mu)^2);  var = M2 / (n + EPS).
    """
    n = x.shape[0]
    mu = x.sum(0) / (n + EPS)
    m2 = EPS * (1.0 + mu**2) + ((x - mu) ** 2).sum(0)
    return mu, m2 / (n + EPS)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    loc=st.floats(-100.0, 100.0),
    scale=st.floats(0.1, 100.0),
)
def test_welford_merge_equals_statistics_of_concatenation(sizes, seed, loc, scale):
    rng = np.random.default_rng(seed)
    batches = [loc + scale * rng.standard_normal((b, 3)) for b in sizes]
    data = np.concatenate(batches)

    merged, at_once = RunningMeanStd(3), RunningMeanStd((3,))
    for b in batches:
        merged.update(torch.from_numpy(b).float())
    at_once.update(torch.from_numpy(data).float())

    mu, var = pooled_with_prior(data.astype(np.float32).astype(np.float64))
    for rms in (merged, at_once):
        assert int(rms.num_samples) == len(data)
        np.testing.assert_allclose(rms.mean.numpy(), mu, rtol=0, atol=1e-5 * (abs(loc) + scale))
        np.testing.assert_allclose(rms.var.numpy(), var, rtol=1e-4)
    torch.testing.assert_close(merged.mean, at_once.mean, rtol=0, atol=1e-5 * (abs(loc) + scale))
    torch.testing.assert_close(merged.var, at_once.var, rtol=1e-4, atol=0)


def test_leading_axes_are_samples():
    x = torch.randn(4, 5, 2, generator=torch.Generator().manual_seed(0))
    a, b = RunningMeanStd(2), RunningMeanStd(2)
    a.update(x)
    b.update(x.reshape(20, 2))
    torch.testing.assert_close(a.state_dict(), b.state_dict())


def test_initial_statistics_and_normalize():
    rms = RunningMeanStd(4)
    assert torch.equal(rms.mean, torch.zeros(4)) and torch.equal(rms.var, torch.ones(4))
    assert float(rms.count) == pytest.approx(EPS)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    torch.testing.assert_close(rms(x), x / math.sqrt(1 + 1e-8))


@pytest.mark.parametrize("value", [0.0, 3.0, -1e4])
def test_normalize_is_finite_on_constant_data(value):
    rms = RunningMeanStd(3)
    for _ in range(50):
        rms.update(torch.full((64, 3), value))
    assert (rms.var >= 0).all()
    out = rms.normalize(torch.full((2, 3), value))
    assert torch.isfinite(out).all()
    assert out.abs().max() < 1e-2  # constant data sits at the mean


def test_normalize_with_zero_variance_divides_by_sqrt_eps():
    # var = 0 (e.g. a loaded checkpoint of a coordinate that never moved): (x - mu) / sqrt(0 + 1e-8) = 1e4 (x - mu)
    rms = RunningMeanStd(2)
    rms.load_state_dict({"mean": torch.tensor([1.0, -2.0]), "var": torch.zeros(2), "num_samples": torch.tensor(10)})
    torch.testing.assert_close(rms(torch.tensor([[1.5, -2.0]])), torch.tensor([[5000.0, 0.0]]))


def test_state_dict_round_trip_and_weights_only_load():
    gen = torch.Generator().manual_seed(1)
    rms = RunningMeanStd(5)
    for _ in range(3):
        rms.update(2 + 3 * torch.randn(17, 5, generator=gen))
    buf = io.BytesIO()
    torch.save(rms.state_dict(), buf)
    buf.seek(0)
    restored = RunningMeanStd(5)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(9, 5, generator=gen)
    torch.testing.assert_close(restored(x), rms(x), rtol=0, atol=0)
    rms.update(x)
    restored.update(x)
    torch.testing.assert_close(restored.state_dict(), rms.state_dict(), rtol=0, atol=0)


def test_dtype_casts_keep_the_exact_sample_count():
    rms = RunningMeanStd(2)
    rms.update(torch.randn(70000, 2))
    rms.half()  # a float16 count would have saturated at 65504
    assert rms.num_samples.dtype == torch.int64 and int(rms.num_samples) == 70000


def test_bad_shapes_raise():
    rms = RunningMeanStd(3)
    with pytest.raises(ValueError, match=r"\(5, 4\)"):
        rms.update(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="non-empty"):
        rms.update(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="shape"):
        rms.update(torch.zeros(3))  # a single unbatched sample is ambiguous
    with pytest.raises(ValueError, match="shape"):
        RunningMeanStd((2, 0))


# ---------------------------------------------------------------------------------------------- rewards


def hand_scale(g_seen: list[float], g_max_abs: float, reward: float, g_max: float = 5.0) -> float:
    _, var = pooled_with_prior(np.array(g_seen, dtype=np.float64))
    return reward / max(math.sqrt(float(var) + 1e-8), g_max_abs / g_max)


def test_returns_reset_at_done_and_scale_matches_hand_computation():
    norm = RewardNormalizer(num_envs=2, gamma=0.9)
    steps = [  # (rewards, dones, G by hand: G <- 0.9 (1 - done) G + r)
        ([1.0, 2.0], [False, False], [1.0, 2.0]),
        ([1.0, -1.0], [False, True], [1.9, -1.0]),  # env 1 ends: its G restarts at this reward
        ([0.5, 3.0], [True, False], [0.5, 2.1]),  # env 0 ends; env 1 continues from -1
    ]
    seen: list[float] = []
    for rewards, dones, g in steps:
        norm.update(torch.tensor(rewards), torch.tensor(dones))
        seen += g
        torch.testing.assert_close(norm.returns, torch.tensor(g))
    assert float(norm.abs_max) == pytest.approx(2.1)
    r = torch.tensor([0.3, -2.0, 7.0])
    expected = [hand_scale(seen, 2.1, x) for x in r.tolist()]
    assert math.sqrt(float(pooled_with_prior(np.array(seen))[1])) > 2.1 / 5  # the std branch is the active one
    torch.testing.assert_close(norm.scale(r), torch.tensor(expected))


def test_max_branch_bounds_the_scaled_return():
    # equal returns across envs: var(G) is tiny (only the 1e-4 prior), so max|G| / 5 sets the denominator
    norm = RewardNormalizer(num_envs=3, gamma=0.99)
    norm.update(torch.full((3,), 10.0), torch.zeros(3))
    torch.testing.assert_close(norm.denominator(), torch.tensor(2.0))
    torch.testing.assert_close(norm.scale(torch.tensor([10.0, -4.0])), torch.tensor([5.0, -2.0]))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.scale(torch.ones(4))
    torch.testing.assert_close(norm.state_dict(), before)  # scale only reads the statistics


def test_reward_normalizer_state_round_trip():
    gen = torch.Generator().manual_seed(2)
    norm = RewardNormalizer(num_envs=4, gamma=0.95)
    for _ in range(6):
        norm.update(torch.randn(4, generator=gen), torch.rand(4, generator=gen) < 0.3)
    restored = RewardNormalizer(num_envs=4, gamma=0.95)
    restored.load_state_dict(norm.state_dict())
    r, d = torch.randn(4, generator=gen), torch.tensor([True, False, False, True])
    norm.update(r, d)
    restored.update(r, d)
    torch.testing.assert_close(restored.state_dict(), norm.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(restored.scale(r), norm.scale(r), rtol=0, atol=0)


def test_reward_normalizer_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        RewardNormalizer(2, gamma=1.0)
    with pytest.raises(ValueError, match="num_envs"):
        RewardNormalizer(0, gamma=0.99)
    with pytest.raises(ValueError, match="g_max"):
        RewardNormalizer(2, gamma=0.99, g_max=0.0)
    with pytest.raises(ValueError, match=r"rewards must have shape \(2,\)"):
        RewardNormalizer(2, gamma=0.99).update(torch.zeros(3), torch.zeros(2))
