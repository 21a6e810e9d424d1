"""C51 math (DESIGN §2): projection against a brute-force loop, invariants, loss, min-target selection."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora.distributional import (
    categorical_loss,
    categorical_projection,
    expected_value,
    make_atoms,
    select_min_target,
)


def random_probs(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(n, k, generator=gen), dim=-1)


def loop_projection(p, r, d, v_min, v_max, k, bonus=None):
    """Textbook C51 in float64 Python, one atom at a time."""
    dz = (v_max - v_min) / (k - 1)
    out = np.zeros((len(r), k))
    for i in range(len(r)):
        for j in range(k):
            z = v_min + j * dz
            t = r[i] + d[i] * (z - (0.0 if bonus is None else bonus[i]))
            t = min(max(t, v_min), v_max)
            b = (t - v_min) / dz
            lo, up = math.floor(b), math.ceil(b)
            if lo == up:
                out[i, lo] += p[i, j]
            else:
                out[i, lo] += p[i, j] * (up - b)
                out[i, up] += p[i, j] * (b - lo)
    return out


def test_make_atoms_and_bad_arguments():
    z = make_atoms(-10.0, 10.0, 251)
    assert z.shape == (251,) and z.dtype == torch.float32
    assert z[0] == -10 and z[-1] == 10
    torch.testing.assert_close(z.diff(), torch.full((250,), 20 / 250))
    with pytest.raises(ValueError, match="v_min"):
        make_atoms(1.0, 1.0, 5)
    with pytest.raises(ValueError, match="num_atoms"):
        make_atoms(-1.0, 1.0, 1)
    p = torch.full((3, 5), 0.2)
    with pytest.raises(ValueError, match="rewards"):
        categorical_projection(p, torch.zeros(4), torch.ones(3), make_atoms(-1, 1, 5))
    with pytest.raises(ValueError, match="atoms"):
        categorical_projection(p, torch.zeros(3), torch.ones(3), make_atoms(-1, 1, 7))


@pytest.mark.parametrize("bonus", [False, True])
def test_projection_matches_loop_reference(bonus):
    gen = torch.Generator().manual_seed(0)
    n, k, v_min, v_max = 64, 21, -5.0, 5.0
    atoms = make_atoms(v_min, v_max, k)
    p = random_probs(n, k, gen)
    r = 4 * torch.randn(n, generator=gen)  # many targets clip at both ends
    d = torch.rand(n, generator=gen) * 0.99
    d[::5] = 0.0  # terminal transitions
    r[1::7] = torch.randint(-5, 6, (len(r[1::7]),), generator=gen).float()  # lands on atoms when d = 0
    bo = torch.randn(n, generator=gen) if bonus else None
    got = categorical_projection(p, r, d, atoms, bo)
    ref = loop_projection(
        p.double().numpy(), r.double().numpy(), d.double().numpy(), v_min, v_max, k,
        None if bo is None else bo.double().numpy(),
    )
    np.testing.assert_allclose(got.numpy(), ref, atol=2e-6)


def test_mass_conserved_including_on_support_and_clipped_targets():
    gen = torch.Generator().manual_seed(1)
    n, k = 200, 51
    atoms = make_atoms(-1.0, 1.0, k)
    p = random_probs(n, k, gen)
    # every third sample: r = 0, d = 1, so every t_k is exactly the atom z_k; the others clip hard or land between
    on_support = torch.arange(n) % 3 == 0
    r = torch.where(on_support, 0.0, 10 * torch.randn(n, generator=gen))
    d = torch.where(on_support, 1.0, torch.rand(n, generator=gen))
    out = categorical_projection(p, r, d, atoms)
    torch.testing.assert_close(out.sum(1), torch.ones(n), atol=1e-6, rtol=0)
    assert (out >= 0).all()
    # r = 0, d = 1 is the identity map: t_k = z_k exactly. b = (z_j - v_min)/dz is j only to 1 float32 ulp
    # (~4e-6 at j = 49), and that much of p may move to the neighbour: hence 1e-5, not exact equality.
    torch.testing.assert_close(out[::3], p[::3], atol=1e-5, rtol=0)


def test_terminal_target_is_reward_interpolated_on_two_atoms():
    atoms = make_atoms(-5.0, 5.0, 11)  # dz = 1
    p = torch.full((3, 11), 1 / 11)
    out = categorical_projection(p, torch.tensor([0.25, 2.0, 9.0]), torch.zeros(3), atoms)
    expected = torch.zeros(3, 11)
    expected[0, 5], expected[0, 6] = 0.75, 0.25  # 0.25 between atoms 0 and 1
    expected[1, 7] = 1.0  # exactly on atom 2.0: l == u, all mass to l
    expected[2, 10] = 1.0  # clipped to v_max
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("with_bonus", [False, True])
def test_projection_shifts_expectation_exactly_when_nothing_clips(with_bonus):
    gen = torch.Generator().manual_seed(2)
    n, k = 128, 101
    atoms = make_atoms(-5.0, 5.0, k)
    p = random_probs(n, k, gen)
    # |t| <= |r| + d (5 + |bonus|) <= 2 + 0.5 * 6 = 5: never clips
    r = 4 * torch.rand(n, generator=gen) - 2
    d = 0.5 * torch.rand(n, generator=gen)
    bonus = 2 * torch.rand(n, generator=gen) - 1 if with_bonus else torch.zeros(n)
    out = categorical_projection(p, r, d, atoms, bonus if with_bonus else None)
    mean_z = (p * atoms).sum(1)
    torch.testing.assert_close((out * atoms).sum(1), r + d * (mean_z - bonus), atol=1e-5, rtol=0)


def test_bonus_equals_shifting_the_reward():
    # r + d (z - bonus) = (r - d bonus) + d z: the bonus is a per-sample reward shift
    gen = torch.Generator().manual_seed(3)
    n, k = 50, 31
    atoms = make_atoms(-3.0, 3.0, k)
    p = random_probs(n, k, gen)
    r, d, bonus = torch.randn(n, generator=gen), torch.rand(n, generator=gen), torch.randn(n, generator=gen)
    with_bonus = categorical_projection(p, r, d, atoms, bonus)
    torch.testing.assert_close(with_bonus, categorical_projection(p, r - d * bonus, d, atoms), atol=1e-5, rtol=0)
    assert not torch.allclose(with_bonus, categorical_projection(p, r, d, atoms), atol=1e-3)


def test_projection_in_bf16_autocast_is_done_in_fp32():
    gen = torch.Generator().manual_seed(4)
    n, k = 256, 251
    atoms = make_atoms(-10.0, 10.0, k)
    p = random_probs(n, k, gen).bfloat16()
    r, d = (5 * torch.randn(n, generator=gen)).bfloat16(), torch.rand(n, generator=gen).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = categorical_projection(p, r, d, atoms)
    assert out.dtype == torch.float32
    # same as projecting the upcast inputs: the bf16 rounding of b (8-bit mantissa) never happens
    torch.testing.assert_close(out, categorical_projection(p.float(), r.float(), d.float(), atoms), atol=0, rtol=0)
    torch.testing.assert_close(out.sum(1), p.float().sum(1), atol=1e-5, rtol=0)


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)  # up to +-3.4e38: most clip


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 8),
    k=st.integers(2, 40),
    v_max=st.floats(0.1, 1e3),
    rewards=st.lists(finite32, min_size=8, max_size=8),
    discounts=st.lists(st.one_of(st.floats(0.0, 1.0, width=32), finite32), min_size=8, max_size=8),
    bonus=st.one_of(st.none(), st.lists(finite32, min_size=8, max_size=8)),
)
def test_property_mass_conserved_and_nonnegative(seed, n, k, v_max, rewards, discounts, bonus):
    gen = torch.Generator().manual_seed(seed)
    atoms = make_atoms(-v_max, v_max, k)
    p = random_probs(n, k, gen)
    r, d = torch.tensor(rewards[:n]), torch.tensor(discounts[:n])
    b = None if bonus is None else torch.tensor(bonus[:n])
    out = categorical_projection(p, r, d, atoms, b)
    assert torch.isfinite(out).all()
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(n), atol=2e-6, rtol=0)
    # Each p_k is split between the two atoms around clip(t_k) keeping its mean, so the projected mean is
    # sum_k p_k clip(t_k) (t in float32 as the spec writes it; huge ones must land on the right end).
    t = r[:, None] + d[:, None] * (atoms - (0.0 if b is None else b[:, None]))
    clipped_mean = (p.double() * t.clamp(-v_max, v_max).double()).sum(1)
    torch.testing.assert_close((out.double() * atoms.double()).sum(1), clipped_mean, atol=1e-5 * v_max, rtol=0)


def test_loss_equals_manual_cross_entropy_single_and_stacked():
    gen = torch.Generator().manual_seed(5)
    e, n, k = 2, 16, 11
    logits = torch.randn(e, n, k, generator=gen, dtype=torch.float64)
    target = random_probs(n, k, gen).double()
    lg, tg = logits.tolist(), target.tolist()
    manual = [
        sum(-sum(tg[i][j] * (lg[c][i][j] - math.log(sum(math.exp(v) for v in lg[c][i]))) for j in range(k))
            for i in range(n)) / n
        for c in range(e)
    ]
    torch.testing.assert_close(categorical_loss(logits[0], target), torch.tensor(manual[0], dtype=torch.float32))
    torch.testing.assert_close(categorical_loss(logits, target), torch.tensor(sum(manual), dtype=torch.float32))
    with pytest.raises(ValueError, match="logits"):
        categorical_loss(logits[:, :, :5], target)


def test_loss_gradient_is_softmax_minus_target():
    # d/dlogits of mean_i CE = (softmax - p_target) / N: the loss trains towards the target
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(8, 7, generator=gen, requires_grad=True)
    target = random_probs(8, 7, gen)
    categorical_loss(logits, target).backward()
    torch.testing.assert_close(logits.grad, (torch.softmax(logits.detach(), -1) - target) / 8)


def test_expected_value_and_min_target_selection_per_sample():
    atoms = make_atoms(-1.0, 1.0, 3)
    hi, lo = torch.tensor([0.0, 0.0, 5.0]), torch.tensor([5.0, 0.0, 0.0])  # Q near +1 / near -1
    peak, sides = torch.tensor([0.0, 5.0, 0.0]), torch.tensor([5.0, 0.0, 5.0])  # both Q = 0 exactly (symmetric)
    # sample 0: critic 1 is lower; sample 1: critic 0 is lower; sample 2: a tie, which argmin gives to critic 0
    logits = torch.stack([torch.stack([hi, lo, peak]), torch.stack([lo, hi, sides])])
    q = expected_value(logits, atoms)
    torch.testing.assert_close(q[0, 0], (torch.softmax(hi, -1) * atoms).sum())
    assert q[0, 0] > 0.9 and q[0, 1] < -0.9
    chosen = select_min_target(logits, atoms)
    torch.testing.assert_close(chosen[0], torch.softmax(lo, -1))
    torch.testing.assert_close(chosen[1], torch.softmax(lo, -1))
    torch.testing.assert_close(chosen[2], torch.softmax(peak, -1))
    torch.testing.assert_close(select_min_target(logits[:1], atoms), torch.softmax(logits[0], -1))


def test_min_target_matches_elementwise_choice_on_random_logits():
    gen = torch.Generator().manual_seed(7)
    atoms = make_atoms(-5.0, 5.0, 51)
    logits = torch.randn(2, 300, 51, generator=gen)
    q = expected_value(logits, atoms)
    probs = torch.softmax(logits, -1)
    ref = torch.where((q[0] <= q[1]).unsqueeze(1), probs[0], probs[1])
    torch.testing.assert_close(select_min_target(logits, atoms), ref)
    assert (q[0] <= q[1]).any() and (q[1] < q[0]).any()
