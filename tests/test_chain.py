"""Chain-MDP experiment: the MDP, exact Q^π and Bellman residual, the plain-LoRA critic, stacking, the CLI."""

import csv
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttd3_lora.experiments.chain import (
    CSV_COLUMNS,
    LEFT,
    REGIMES,
    RIGHT,
    ChainConfig,
    bellman_residual,
    bellman_target,
    build_chain_mdp,
    discounted_state_distribution,
    main,
    make_critics,
    make_setup,
    polyak_,
    stacked_q,
    train_regime,
    true_q,
    true_q_error,
)

chains = st.tuples(st.integers(2, 20), st.floats(0.0, 1.0), st.floats(0.0, 0.99))


def _policy(data: st.DataObject, n: int) -> torch.Tensor:
    return torch.tensor(data.draw(st.lists(st.sampled_from([LEFT, RIGHT]), min_size=n, max_size=n)))


# ------------------------------------------------------------------------------------------------- the MDP
def test_paper_chain_transitions_and_reward():
    mdp = build_chain_mdp(15, 0.9, 13)
    P = mdp.P.view(15, 2, 15)
    assert P[0, LEFT, 0] == pytest.approx(0.9) and P[0, LEFT, 1] == pytest.approx(0.1)  # reflects at the left end
    assert P[14, RIGHT, 14] == pytest.approx(0.9) and P[14, RIGHT, 13] == pytest.approx(0.1)  # and the right end
    assert P[5, RIGHT, 6] == pytest.approx(0.9) and P[5, RIGHT, 4] == pytest.approx(0.1)
    assert P[5, LEFT, 4] == pytest.approx(0.9) and P[5, LEFT, 6] == pytest.approx(0.1)
    assert mdp.R.nonzero().flatten().tolist() == [13 * 2 + RIGHT] and mdp.R.sum() == 1.0


@settings(max_examples=30, deadline=None)
@given(chain=chains)
def test_transition_matrix_is_row_stochastic_and_local(chain):
    n, p, _ = chain
    P = build_chain_mdp(n, p, n - 1).P
    assert (P >= 0).all()
    torch.testing.assert_close(P.sum(1), torch.ones(2 * n, dtype=torch.float64))
    s = torch.arange(2 * n) // 2
    far = (torch.arange(n)[None, :] - s[:, None]).abs() > 1
    assert (P[far] == 0).all()  # only neighbours (or staying put at an end) are reachable


def test_mdp_rejects_bad_values():
    with pytest.raises(ValueError, match="success_prob=1.5"):
        build_chain_mdp(15, 1.5, 13)
    with pytest.raises(ValueError, match="reward_state=15"):
        build_chain_mdp(15, 0.9, 15)


# ------------------------------------------------------------------------------------ Q^π and the metrics
@settings(max_examples=30, deadline=None)
@given(chain=chains, data=st.data())
def test_true_q_is_the_bellman_fixed_point(chain, data):
    n, p, gamma = chain
    mdp = build_chain_mdp(n, p, data.draw(st.integers(0, n - 1)))
    policy = _policy(data, n)
    q = true_q(mdp, policy, gamma)
    assert (q - bellman_target(q, mdp, policy, gamma)).abs().max() < 1e-6
    assert bellman_residual(q, mdp, policy, gamma) < 1e-9


@settings(max_examples=30, deadline=None)
@given(chain=chains, data=st.data(), shift=st.floats(-5.0, 5.0))
def test_residual_and_error_of_a_shifted_q(chain, data, shift):
    # T(Q + c) = TQ + γc, so Q^π + c has residual (1 - γ)|c| everywhere; d_π sums to 1, so the error is |c|.
    n, p, gamma = chain
    mdp = build_chain_mdp(n, p, 0)
    policy = _policy(data, n)
    q = true_q(mdp, policy, gamma)
    d = discounted_state_distribution(mdp, policy, gamma, data.draw(st.integers(0, n - 1)))
    assert float(bellman_residual(q + shift, mdp, policy, gamma)) == pytest.approx((1 - gamma) * abs(shift), abs=1e-9)
    assert float(true_q_error(q + shift, q, policy, d)) == pytest.approx(abs(shift), abs=1e-9)


def test_perturbed_q_has_positive_residual():
    mdp = build_chain_mdp(15, 0.9, 13)
    policy = torch.full((15,), RIGHT)
    q = true_q(mdp, policy, 0.97)
    for i in range(30):
        bumped = q.clone()
        bumped[i] += 0.1
        assert bellman_residual(bumped, mdp, policy, 0.97) > 1e-3


@settings(max_examples=20, deadline=None)
@given(chain=chains, data=st.data())
def test_discounted_distribution_matches_its_series(chain, data):
    n, p, gamma = chain
    mdp = build_chain_mdp(n, p, 0)
    policy = _policy(data, n)
    start = data.draw(st.integers(0, n - 1))
    d = discounted_state_distribution(mdp, policy, gamma, start)
    P_pi = mdp.P.view(n, 2, n)[torch.arange(n), policy]
    state = torch.zeros(n, dtype=torch.float64)
    state[start] = 1.0
    series = torch.zeros(n, dtype=torch.float64)
    for t in range(3000):  # γ ≤ 0.99: the tail after 3000 terms is < 1e-13
        series += (1 - gamma) * gamma**t * state
        state = state @ P_pi
    torch.testing.assert_close(d, series, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------- the critic
def _tiny(**kw) -> ChainConfig:
    return dataclasses.replace(ChainConfig(), **{"steps": 4, "eval_every": 2, "num_seeds": 2, "ranks": (1, 4), **kw})


def test_lora_starts_as_the_dense_network_and_trains_only_a_b_and_output():
    cfg = _tiny()
    setup = make_setup(cfg)
    dense, *loras = make_critics(cfg, setup)
    q_dense = dense(setup.features)
    for lora in loras:
        torch.testing.assert_close(lora(setup.features), q_dense, rtol=0, atol=1e-6)
        trainable = {id(p) for p in lora.parameters()}
        expected = {id(lora.out)} | {id(t) for layer in lora.hidden for t in (layer.lora_A, layer.lora_B)}
        assert trainable == expected
        bases = [layer.base.clone() for layer in lora.hidden]
        opt = torch.optim.Adam(lora.parameters(), lr=1e-2)
        for step in range(2):  # B = 0 at init, so A gets gradient from the second step on
            opt.zero_grad()
            (lora(setup.features) - setup.q_true.float()).pow(2).sum().backward()
            assert lora.out.grad.abs().sum() > 0
            for layer in lora.hidden:
                assert layer.lora_B.grad.abs().sum() > 0
                assert (layer.lora_A.grad.abs().sum() > 0) == (step == 1)
                assert not layer.base.requires_grad
            opt.step()
        for layer, base in zip(lora.hidden, bases):
            assert torch.equal(layer.base, base)
            assert torch.linalg.matrix_rank(layer.lora_B[0, 0] @ layer.lora_A[0, 0]) <= layer.rank


@pytest.mark.parametrize("regime", REGIMES)
def test_stacked_seeds_train_independently(regime):
    # Seed 0 alone and seed 0 stacked next to seed 1 must follow the same trajectory: stacking mixes nothing.
    alone = train_regime(regime, _tiny(num_seeds=1), make_setup(_tiny(num_seeds=1)))
    stacked = train_regime(regime, _tiny(num_seeds=2), make_setup(_tiny(num_seeds=2)))
    torch.testing.assert_close(stacked[:, 0::2], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stacked[-1, 0::2], stacked[-1, 1::2])  # the seeds do differ


def test_static_regime_learns_and_metrics_start_equal_across_models():
    cfg = _tiny(steps=40, eval_every=20)
    setup = make_setup(cfg)
    metrics = train_regime("static", cfg, setup)  # (evals, models * seeds, 2)
    with torch.no_grad():
        q0 = stacked_q(make_critics(cfg, setup), setup.features)
    assert metrics.shape == (3, 3 * 2, 2)
    # every model of a seed starts as the same function, so with the same metrics
    torch.testing.assert_close(metrics[0, 2:4], metrics[0, 0:2].expand(1, 2, 2).flatten(0, 1), rtol=1e-5, atol=1e-6)
    assert float(true_q_error(q0[0], setup.q_true, setup.policy, setup.state_weights)) == pytest.approx(
        float(metrics[0, 0, 0]), rel=1e-6)
    assert (metrics[-1, :2, 0] < metrics[0, :2, 0]).all()  # dense regression on the exact Q^π makes progress


def test_polyak_update_is_an_ema_outside_autograd():
    online = [torch.randn(3, 4, requires_grad=True), torch.randn(2, requires_grad=True)]
    target = [torch.zeros(3, 4), torch.ones(2)]
    polyak_(target, online, 0.25)
    torch.testing.assert_close(target[0], 0.25 * online[0].detach())
    torch.testing.assert_close(target[1], 0.75 + 0.25 * online[1].detach())
    assert all(t.grad_fn is None and not t.requires_grad for t in target)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="ChainConfig.gamma=1.0"):
        ChainConfig(gamma=1.0)
    with pytest.raises(ValueError, match="ChainConfig.eval_every=7"):
        ChainConfig(steps=10, eval_every=7)
    with pytest.raises(ValueError, match="ChainConfig.ranks=\\(0,\\)"):
        ChainConfig(ranks=(0,))


# -------------------------------------------------------------------------------------------------- the CLI
def test_cli_writes_every_combination(tmp_path):
    out = tmp_path / "run"  # in-process and one worker: spawning interpreters would dominate the test's time
    assert main(["--out", str(out), "--steps", "4", "--eval-every", "2", "--seeds", "2", "--workers", "1"]) == 0
    with open(out / "chain_results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    models = ["dense"] + [f"lora-r{r}" for r in ChainConfig().ranks]
    combos = {(r["regime"], r["model"], r["seed"]) for r in rows}
    assert combos == {(g, m, str(s)) for g in REGIMES for m in models for s in (0, 1)}
    assert sorted({int(r["step"]) for r in rows}) == [0, 2, 4] and len(rows) == len(combos) * 3
    assert all(float(r["true_q_error"]) >= 0 and float(r["bellman_residual"]) >= 0 for r in rows)
    assert (out / "chain_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "chain_summary.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(REGIMES) * len(models)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--steps", "4"], "--out"),
        (["--out", "{tmp}", "--steps", "0"], "--steps"),
        (["--out", "{tmp}", "--steps", "abc"], "abc"),
        (["--out", "{tmp}", "--steps", "10", "--eval-every", "3"], "multiple"),
        (["--out", "{tmp}", "--bogus"], "--bogus"),
        (["--out", "{file}"], "not a directory"),
    ],
)
def test_bad_cli_arguments_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    argv = [a.format(tmp=tmp_path / "o", file=tmp_path / "f.txt") for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (tmp_path / "o").exists()
