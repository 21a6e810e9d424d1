"""The single-layer drift bound (fasttd3_lora/drift.py, docs/drift.md): its pieces against autograd and closed
forms, and the bound against measured drift and KL for every rank, both policies and full fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora import gaussian
from fasttd3_lora.drift import (
    clip_norm,
    full_drift_bound,
    gaussian_mean_kl,
    kl_bound,
    lora_drift_bound,
    lora_gradients,
    single_layer_run,
    softmax_kl,
)

seeds = st.integers(0, 2**16)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, rank=st.integers(1, 6), scale=st.floats(0.1, 4.0))
def test_lora_gradients_are_the_chain_rule_autograd_computes(seed, rank, scale):
    g = torch.Generator().manual_seed(seed)
    w0, x = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(11, 7, generator=g, dtype=torch.float64)
    a = torch.randn(rank, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, rank, generator=g, dtype=torch.float64, requires_grad=True)
    w = (w0 + scale * b @ a).detach().requires_grad_(True)
    loss = lambda weight: (x @ weight.mT).sin().sum()  # noqa: E731
    loss(w).backward()
    loss(w0 + scale * b @ a).backward()
    grad_a, grad_b = lora_gradients(w.grad, a.detach(), b.detach(), scale)
    torch.testing.assert_close(grad_a, a.grad)
    torch.testing.assert_close(grad_b, b.grad)


def test_the_bound_with_b0_zero_is_its_closed_form_and_starts_at_zero():
    u0, s, eta, g = 1.7, 0.5, 0.1, 0.3
    c = eta * s * g
    for steps in (0, 1, 5, 50):
        expected = s * u0**2 * ((1 + c) ** (2 * steps) - (1 - c) ** (2 * steps)) / 4
        assert lora_drift_bound(steps, eta, g, s, u0) == pytest.approx(expected)
    assert lora_drift_bound(0, eta, g, s, u0) == 0.0
    # to first order in eta the bound grows like s^2 u0^2 eta g T: one step of GD on B moves B A by s eta g |A|^2
    assert lora_drift_bound(1, eta, g, s, u0) == pytest.approx(s * u0**2 * c, rel=1e-12)
    assert full_drift_bound(10, eta, g) == pytest.approx(eta * g * 10)


@settings(max_examples=50, deadline=None)
@given(seed=seeds, sigma=st.floats(0.1, 2.0))
def test_gaussian_mean_kl_is_the_gaussian_kl_at_equal_stds(seed, sigma):
    g = torch.Generator().manual_seed(seed)
    delta, w0, states = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((3, 4), (3, 4), (9, 4)))
    log_std = torch.full((9, 3), math.log(sigma), dtype=torch.float64)
    expected = gaussian.kl(states @ w0.mT, log_std, states @ (w0 + delta).mT, log_std)
    torch.testing.assert_close(gaussian_mean_kl(delta, states, sigma), expected)


@settings(max_examples=50, deadline=None)
@given(seed=seeds, size=st.floats(0.01, 5.0))
def test_softmax_kl_is_at_most_a_quarter_of_the_squared_logit_shift(seed, size):
    g = torch.Generator().manual_seed(seed)
    z0, dz = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g, dtype=torch.float64)
    dz = size * dz
    kls = softmax_kl(z0, z0 + dz)
    assert torch.all(kls >= -1e-12) and torch.all(kls <= dz.pow(2).sum(-1) / 4 + 1e-12)
    assert kl_bound(2.0, 3.0, "softmax") == pytest.approx(9.0) and kl_bound(2.0, 3.0, "gaussian", 0.5) == pytest.approx(72.0)


def test_clipping_keeps_the_gradient_within_g():
    grad = torch.full((3, 3), 2.0)
    assert clip_norm(grad, 1.0).norm() == pytest.approx(1.0)
    assert torch.equal(clip_norm(grad, 100.0), grad)


@settings(max_examples=12, deadline=None)
@given(seed=seeds, policy=st.sampled_from(["gaussian", "softmax"]), rank=st.sampled_from([1, 2, 4, 8, None]),
       alpha=st.sampled_from([None, 2.0]), eta=st.floats(0.01, 0.2), g=st.floats(0.05, 2.0))  # fmt: skip
def test_measured_drift_and_kl_stay_below_the_bound_at_every_step(seed, policy, rank, alpha, eta, g):
    out = single_layer_run(policy, rank, alpha=None if rank is None else alpha, steps=40, eta=eta, g=g, seed=seed)
    assert torch.all(out["drift"] <= out["drift_bound"] * (1 + 1e-9) + 1e-12)
    assert torch.all(out["kl_max"] <= out["kl_bound"] * (1 + 1e-9) + 1e-12)
    assert out["drift"][-1] > 0  # it did move


def test_drift_grows_with_the_rank_at_alpha_equal_rank_and_falls_at_a_fixed_alpha():
    """The bound's prediction (docs/drift.md), measured: mean over 3 seeds, Gaussian policy, 100 steps."""

    def drift(rank: int, alpha: float | None) -> float:
        return sum(float(single_layer_run("gaussian", rank, alpha=alpha, steps=100, eta=0.05, g=0.2, seed=s)["drift"][-1])
                   for s in range(3))  # fmt: skip

    scale_one = [drift(r, None) for r in (1, 4, 16)]
    fixed = [drift(r, 4.0) for r in (1, 4, 16)]
    assert scale_one == sorted(scale_one) and fixed == sorted(fixed, reverse=True)
    full = sum(float(single_layer_run("gaussian", None, steps=100, eta=0.05, g=0.2, seed=s)["drift"][-1]) for s in range(3))
    assert full > scale_one[-1]


# --- the experiment driver (fasttd3_lora/experiments/drift.py) ------------------------------------------------


def test_spearman_of_monotone_sequences_and_ties():
    from fasttd3_lora.experiments.drift import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, math.inf], [0.1, 0.3, 0.2, 0.9]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [5, 5, 7]) == pytest.approx(math.sqrt(3) / 2)


def _fake_run(root, task, rank, coef, seed, kl):  # a finished GRPO run's files, as the app writes them
    import yaml

    run = root / "runs" / f"{task}_{rank}_{coef}_{seed}"
    run.mkdir(parents=True)
    config = {"algo": {"name": "grpo", "rank": rank, "kl_coef": coef}, "task": {"name": task}, "seed": seed}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.csv").write_text("env_step,kl_ref,kl_ref_max,dW,episode_return,update_s,eval_return\n"
                                     f"100,{kl / 2},{kl},1.0,5.0,0.5,\n200,{kl},{2 * kl},2.0,6.0,0.7,9.0\n")  # fmt: skip


def test_report_groups_runs_by_rank_and_computes_rho_with_the_largest_rank(tmp_path):
    from fasttd3_lora.experiments.drift import report

    for seed in (0, 1):
        for rank, kl in (("1", 0.01), ("4", 0.05), ("full", 0.2)):
            _fake_run(tmp_path, "dmc/walker-run", rank, 0.0, seed, kl * (1 + seed / 10))
        _fake_run(tmp_path, "dmc/walker-run", "4", 0.1, seed, 0.002)
    table = report(tmp_path)
    assert "| dmc/walker-run | 0 | full | 2 | 200 | 0.21 ± 0.01 |" in table
    assert "| dmc/walker-run | 0.1 | 4 | 2 | 200 | 0.002 ± 0 |" in table and table.count("0.60 ± 0.00") == 4
    assert "KL coefficient 0: Spearman ρ(rank, mean KL) = 1.00 over ranks 1, 4, full; largest KL at rank full" in table
    assert (tmp_path / "drift_kl_vs_rank.png").stat().st_size > 0 and (tmp_path / "drift_runs.csv").is_file()


def test_the_plot_puts_a_coefficient_run_at_few_ranks_at_those_ranks(tmp_path):
    """The penalised runs (rank 4 only) sit at rank 4's position among all ranks, not at the first."""
    from fasttd3_lora.experiments.drift import kl_points

    rows = [{"task": "t", "rank": rank, "kl_coef": coef, "kl_ref": kl} for rank, coef, kl in
            (("1", 0.0, 0.01), ("4", 0.0, 0.05), ("full", 0.0, 0.2), ("4", 0.1, 0.002), ("4", 0.1, 0.004))]  # fmt: skip
    every, points = kl_points(rows, "t")
    assert every == ["1", "4", "full"]
    assert [x for x, _, _ in points[0.0]] == [0, 1, 2]
    ((x, mean, std),) = points[0.1]
    assert (x, mean, std) == (1, 0.003, 0.001)


def test_single_layer_cli_writes_its_table_and_says_the_bound_held(tmp_path, capsys):
    from fasttd3_lora.experiments.drift import main

    main(["single-layer", "--out", str(tmp_path), "--seeds", "1"])
    assert "the bound held at every step in 22 of 22 runs" in capsys.readouterr().out
    assert (tmp_path / "single_layer.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["control", "--out", str(tmp_path), "--from", str(tmp_path / "nothing"), "--task", "dmc/walker-run"])
    assert exit_info.value.code == 2
