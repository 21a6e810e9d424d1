"""DMCEnv: specs, agreement with a plain dm_control loop (action repeat, rescaling, seeding, time limit),
TorchRL partial-reset semantics, and worker failure / shutdown behaviour (no hangs, no orphans)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from dm_control import suite
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torchrl.envs import check_env_specs

from fasttd3_lora.tasks.dmc import DMCEnv, list_dmc_tasks, parse_dmc_task
from fasttd3_lora.tasks.dmc_slice import DMCSlice, result_nbytes, result_views, slice_bounds
from fasttd3_lora.tasks.vector_workers import ProcessPool, WorkerError

CHEETAH_OBS, CHEETAH_ACT = 17, 6


def flat(observation: dict) -> np.ndarray:
    """The reference flattening: dm_control's own observation order, float32."""
    return np.concatenate([np.ravel(v) for v in observation.values()]).astype(np.float32)


def manual_rollout(domain, task, seed, actions, repeat=1, limit=None, resets=()):
    """Plain dm_control loop: per agent step (obs, summed reward, episode over); resets before listed steps."""
    env = suite.load(domain, task, task_kwargs={"random": seed})
    spec = env.action_spec()
    ts, steps, out = env.reset(), 0, []
    first = flat(ts.observation)
    for t, action in enumerate(actions):
        if t in resets:
            ts, steps = env.reset(), 0
        scaled = (spec.maximum + spec.minimum) / 2 + (spec.maximum - spec.minimum) / 2 * action.astype(np.float64)
        total = 0.0
        for _ in range(repeat):
            ts = env.step(scaled)
            total += ts.reward
            steps += 1
            if ts.last() or (limit is not None and steps >= limit):
                break
        out.append((flat(ts.observation), np.float32(total), ts.last() or steps == limit))
    return first, out


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(pid_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def random_actions(n_steps: int, n_envs: int, act_dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_steps, n_envs, act_dim, generator=g) * 2 - 1


# --- task names ---------------------------------------------------------------------------------------------


def test_task_names_round_trip_through_parse():
    names = list_dmc_tasks()
    assert "dmc/cheetah-run" in names and "dmc/ball_in_cup-catch" in names
    from fasttd3_lora.tasks.dmc_families import ALL_TASKS

    assert "dmc/walker-speed_3" in names and len(names) == len(ALL_TASKS) == len(suite.ALL_TASKS) + 13
    assert [parse_dmc_task(n) for n in names] == list(ALL_TASKS)


@pytest.mark.parametrize(("name", "expected"), [("dmc/cheetah-rn", "dmc/cheetah-run"),
                                                ("cheetah-run", "dmc/cheetah-run"),
                                                ("dmc/ball-in-cup-catch", "dmc/ball_in_cup-catch")])
def test_unknown_task_error_is_one_line_with_close_matches(name, expected):
    with pytest.raises(ValueError, match="unknown DMC task") as err:
        DMCEnv(name)
    message = str(err.value)
    assert "\n" not in message and expected in message


@pytest.mark.parametrize(("kwargs", "bad"), [({"num_envs": 0}, "num_envs"), ({"action_repeat": 0}, "action_repeat"),
                                             ({"num_envs": 2, "num_workers": 3}, "num_workers"),
                                             ({"seed": -1}, "seed"), ({"max_episode_steps": 0}, "max_episode_steps")])
def test_bad_arguments_name_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        DMCEnv("dmc/cheetah-run", **kwargs)


def test_task_without_time_limit_needs_max_episode_steps():
    with pytest.raises(ValueError, match="no time limit"):
        DMCEnv("dmc/lqr-lqr_2_1")
    with DMCEnv("dmc/lqr-lqr_2_1", max_episode_steps=5) as env:
        assert env.max_episode_steps == 5


# --- pure helpers -------------------------------------------------------------------------------------------


@given(st.integers(1, 200), st.integers(1, 16))
def test_slice_bounds_cover_contiguously_and_balance(n, k):
    k = min(k, n)
    bounds = slice_bounds(n, k)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@given(st.integers(1, 9), st.integers(1, 40), st.data())
def test_result_views_are_disjoint_and_round_trip(n, d, data):
    buf = bytearray(result_nbytes(n, d))
    obs, rew, term, trunc = result_views(buf, n, d)
    o = np.asarray(data.draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=n * d, max_size=n * d)),
                   dtype=np.float32).reshape(n, d)
    r = np.asarray(data.draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=n, max_size=n)), dtype=np.float32)
    te = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    tr = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    obs[:], rew[:], term[:], trunc[:] = o, r, te, tr
    back = result_views(bytes(buf), n, d)  # what the parent reads from the pipe
    for got, want in zip(back, (o, r, te, tr)):
        np.testing.assert_array_equal(got, want)


# --- contract: specs, layout, values against dm_control ------------------------------------------------------


def test_specs_shapes_dtypes_and_layout():
    with DMCEnv("dmc/cheetah-run", 3, seed=0, num_workers=2, action_repeat=2) as env:
        assert env.batch_size == torch.Size([3])
        assert env.observation_layout() == [("position", (8,)), ("velocity", (9,))]
        assert env.observation_spec["observation"].shape == (3, CHEETAH_OBS)
        assert env.action_spec.shape == (3, CHEETAH_ACT)
        assert torch.equal(env.action_spec.space.low, -torch.ones(3, CHEETAH_ACT))
        assert set(env.done_keys) == {"done", "terminated", "truncated"}
        assert env.max_episode_steps == 1000
        assert env.joint_names == ["bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot"]
        assert env.control_period == pytest.approx(0.01 * 2)
        td = env.reset()
        assert td["observation"].dtype == torch.float32 and td["observation"].shape == (3, CHEETAH_OBS)
        assert not td["done"].any()
        td = env.rand_step(td)
        nxt = td["next"]
        assert nxt["reward"].shape == (3, 1) and nxt["reward"].dtype == torch.float32
        for key in ("done", "terminated", "truncated"):
            assert nxt[key].shape == (3, 1) and nxt[key].dtype == torch.bool
        check_env_specs(env, seed=0)
    with DMCEnv("dmc/humanoid-walk", seed=0) as env:
        assert env.control_period == pytest.approx(0.025)
        layout = env.observation_layout()
        assert ("head_height", ()) in layout
        assert sum(int(np.prod(s)) for _, s in layout) == env.observation_spec["observation"].shape[-1] == 67


@pytest.mark.parametrize("num_workers", [0, 2])
def test_action_repeat_sums_rewards_and_stops_at_episode_end(num_workers):
    # 3 agent steps of repeat 3 with a 7-step limit: the last agent step runs 1 control step, then truncates.
    seed, n, repeat, limit = 11, 2, 3, 7
    actions = random_actions(3, n, CHEETAH_ACT)
    with DMCEnv("dmc/cheetah-run", n, seed=seed, action_repeat=repeat, max_episode_steps=limit,
                num_workers=num_workers) as env:
        td = env.reset()
        got = []
        for a in actions:
            td["action"] = a
            td = env.step(td)
            got.append(td["next"].clone())
            td = td["next"]
    for i in range(n):
        first, ref = manual_rollout("cheetah", "run", seed + i, actions[:, i].numpy(), repeat, limit)
        for t, (obs, reward, over) in enumerate(ref):
            np.testing.assert_array_equal(got[t]["observation"][i].numpy(), obs)
            assert got[t]["reward"][i, 0].item() == reward  # float64 sum, then float32, on both sides
            assert got[t]["truncated"][i, 0].item() == over == (t == 2)
            assert not got[t]["terminated"][i, 0].item()


def test_actions_are_rescaled_to_the_task_bounds():
    # quadruped's bounds are not [-1, 1] (e.g. [-0.8, 0.8] and [-1, 1.1]): +-1 must reach them exactly.
    with DMCEnv("dmc/quadruped-walk", seed=3) as env:
        spec = suite.load("quadruped", "walk").action_spec()
        np.testing.assert_allclose(env.action_offset - env.action_scale, spec.minimum, rtol=1e-6)
        np.testing.assert_allclose(env.action_offset + env.action_scale, spec.maximum, rtol=1e-6)
        actions = torch.tensor([[1.0, -1.0] * 6, [-1.0, 0.5] * 6]).unsqueeze(1)
        td = env.reset()
        got = []
        for a in actions:
            td = env.step(td.set("action", a))
            got.append(td["next", "observation"][0].numpy())
            td = td["next"]
    _, ref = manual_rollout("quadruped", "walk", 3, actions[:, 0].numpy())
    for g, (obs, _, _) in zip(got, ref):
        np.testing.assert_array_equal(g, obs)


@pytest.fixture(scope="module")
def cheetah2():
    with DMCEnv("dmc/cheetah-run", 2, seed=0, num_workers=0) as env:
        yield env


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0, width=32), min_size=12, max_size=12),
       st.integers(0, 11), st.sampled_from([1.0001, 2.0, -1.5, float("inf"), float("nan")]))
def test_actions_outside_unit_box_are_rejected(cheetah2, inside, where, bad):
    env = cheetah2
    env.reset()
    a = torch.tensor(inside).reshape(2, CHEETAH_ACT)
    env.step(TensorDict({"action": a}, [2]))  # inside the box (bounds included): accepted
    a.view(-1)[where] = bad
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        env.step(TensorDict({"action": a}, [2]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_transposed_action_view_steps_like_its_contiguous_copy(num_workers):
    """A policy's output can be a non-contiguous view (e.g. `(W @ x.mT).mT`): same result as a contiguous copy."""
    actions = torch.rand(CHEETAH_ACT, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    results = []
    for action in (actions.mT, actions.mT.contiguous()):
        assert action.is_contiguous() == (len(results) == 1)
        with DMCEnv("dmc/cheetah-run", 3, seed=4, num_workers=num_workers) as env:
            td = env.step(env.reset().set("action", action))
            results.append(td["next", "observation"])
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_seeding_is_reproducible_and_independent_of_workers():
    actions = random_actions(4, 3, CHEETAH_ACT, seed=1)

    def run(env):
        td = env.reset()
        out = [td["observation"].clone()]
        for a in actions:
            td = env.step(td.set("action", a))
            out += [td["next", "observation"].clone(), td["next", "reward"].clone()]
            td = td["next"]
        return out

    with DMCEnv("dmc/cheetah-run", 3, seed=5, num_workers=0) as a, DMCEnv("dmc/cheetah-run", 3, seed=5) as b:
        ra, rb = run(a), run(b)
        assert all(torch.equal(x, y) for x, y in zip(ra, rb))
        # env i is seeded with seed + i: env 1 of seed 5 is env 0 of seed 6.
        with DMCEnv("dmc/cheetah-run", 1, seed=6) as c:
            assert torch.equal(c.reset()["observation"][0], ra[0][1])
        # mod 2**32: the largest seed numpy takes works for any number of envs, env 2 of it being env 0 of 1
        with DMCEnv("dmc/cheetah-run", 3, seed=2**32 - 1, num_workers=0) as d, DMCEnv("dmc/cheetah-run", 1, seed=1) as e:
            assert torch.equal(d.reset()["observation"][2], e.reset()["observation"][0])
            e.set_seed(0)
            d.set_seed(2**32 - 2)  # set_seed wraps the same way
            assert torch.equal(d.reset()["observation"][2], e.reset()["observation"][0])
        # set_seed restarts the sequence at the next reset.
        b.set_seed(5)
        assert torch.equal(b.reset()["observation"], ra[0])
        assert not torch.equal(ra[0][0], ra[0][1])  # different seeds, different initial states


# --- episode ends, partial resets -----------------------------------------------------------------------------


def test_time_limit_truncates_never_terminates():
    with DMCEnv("dmc/cheetah-run", 2, seed=0, num_workers=0, action_repeat=8) as env:
        td = env.reset()
        data = env.rollout(200, auto_reset=False, tensordict=td, break_when_any_done=True)
    # the task's own limit: 1000 control steps = 125 agent steps of repeat 8
    assert data.shape == (2, 125)
    assert data["next", "truncated"][:, -1].all() and not data["next", "truncated"][:, :-1].any()
    assert not data["next", "terminated"].any()
    assert torch.equal(data["next", "done"], data["next", "truncated"])


def test_stepping_a_finished_or_unreset_env_raises():
    with DMCEnv("dmc/cheetah-run", 2, seed=0, num_workers=0, max_episode_steps=1) as env:
        with pytest.raises(RuntimeError, match="must be reset"):
            env.rand_step(TensorDict({}, [2]))
        td = env.rand_step(env.reset())
        assert td["next", "truncated"].all()
        with pytest.raises(RuntimeError, match=r"envs \[0, 1\] must be reset"):
            env.rand_step(td["next"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_step_and_maybe_reset_keeps_final_obs_and_carries_reset_obs(num_workers):
    # Env 1 is reset after 2 steps, so at step 4 (limit 4) envs 0 and 2 end while env 1 goes on.
    seed, n, limit = 21, 3, 4
    actions = random_actions(5, n, CHEETAH_ACT, seed=2)
    with DMCEnv("dmc/cheetah-run", n, seed=seed, max_episode_steps=limit, num_workers=num_workers) as env:
        td = env.reset()
        for t in range(4):
            if t == 2:
                td = env.reset(td.set("_reset", torch.tensor([[False], [True], [False]])))
            td.set("action", actions[t])
            out, td = env.step_and_maybe_reset(td)
        final = out["next", "observation"]
        assert out["next", "truncated"].flatten().tolist() == [True, False, True]
        assert not td["done"].any() and not td["truncated"].any()
        for i in (0, 2):
            _, ref = manual_rollout("cheetah", "run", seed + i, actions[:4, i].numpy(), limit=limit)
            np.testing.assert_array_equal(final[i].numpy(), ref[-1][0])  # the true last observation
            assert ref[-1][2]
            # the carried-over observation is the first one of the next episode of the same env
            ref_env = suite.load("cheetah", "run", task_kwargs={"random": seed + i})
            ref_env.reset()
            for a in actions[:4, i].numpy():
                ref_env.step(a)
            np.testing.assert_array_equal(td["observation"][i].numpy(), flat(ref_env.reset().observation))
        _, ref1 = manual_rollout("cheetah", "run", seed + 1, actions[:4, 1].numpy(), limit=limit, resets=(2,))
        np.testing.assert_array_equal(final[1].numpy(), ref1[-1][0])
        assert torch.equal(td["observation"][1], final[1])  # not reset: carries on
        # the next step continues from the reset state for envs 0 and 2
        td.set("action", actions[4])
        out, td = env.step_and_maybe_reset(td)
        assert out["next", "truncated"].flatten().tolist() == [False, False, False]


# --- workers: failures and shutdown -----------------------------------------------------------------------------


def test_killed_worker_is_reported_with_task_and_signal_and_pool_closes():
    env = DMCEnv("dmc/cheetah-run", 2, seed=0, num_workers=2)
    td = env.reset()
    pids = env.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"dmc/cheetah-run: worker 1 .*SIGKILL"):
        env.rand_step(td)
    assert wait_gone(pids)
    with pytest.raises(WorkerError, match="closed"):
        env.rand_step(td)
    env.close()


def test_worker_that_raises_is_reported_with_its_traceback():
    # A worker that fails to build its envs, and one that raises mid-run (a malformed step payload).
    bad_task = functools.partial(DMCSlice, [("cheetah", "no_such_task")], 0, 0, 1, None)
    with pytest.raises(WorkerError, match=r"(?s)my-pool: worker 0 .*raised:.*no_such_task"):
        ProcessPool([bad_task], methods=["step"], name="my-pool")
    good = functools.partial(DMCSlice, [("cheetah", "run")], 0, 0, 1, None)
    pool = ProcessPool([good, good], methods=["step", "reset"], name="my-pool")
    pool.call("reset", [np.ones(1, bool)] * 2)
    pids = pool.pids
    with pytest.raises(WorkerError, match=r"(?s)my-pool: worker 0 .*raised:.*ValueError"):
        pool.call("step", [b"\0" * 3, np.zeros(CHEETAH_ACT)])
    assert wait_gone(pids)


def test_hung_worker_times_out_instead_of_hanging():
    env = DMCEnv("dmc/cheetah-run", 2, seed=0, num_workers=2, timeout_s=0.5)
    td = env.reset()
    pids = env.worker_pids
    os.kill(pids[0], signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="no reply within 0.5 s"):
        env.rand_step(td)
    assert time.monotonic() - t0 < 5
    assert wait_gone(pids)  # the stopped worker was killed
    env.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_close_and_context_manager_end_the_workers(num_workers):
    with DMCEnv("dmc/cheetah-run", 2, seed=0, num_workers=num_workers) as env:
        td = env.reset()
        pids = env.worker_pids
        assert len(pids) == num_workers and not any(pid_gone(p) for p in pids)
    assert wait_gone(pids)
    env.close()  # idempotent
    with pytest.raises(WorkerError, match="dmc/cheetah-run: the pool is closed"):
        env.rand_step(td)


_SCRIPT = """
import os, signal, sys, torch
# Python leaves SIGINT ignored when its parent ignored it (e.g. pytest started in the background by a shell):
# make Ctrl-C raise KeyboardInterrupt as in a terminal, which is the case this test is about.
signal.signal(signal.SIGINT, signal.default_int_handler)
from fasttd3_lora.tasks.dmc import DMCEnv
env = DMCEnv("dmc/cheetah-run", 2, seed=0, num_workers=2)
td = env.reset()
print(*env.worker_pids, flush=True)
mode = sys.argv[1]
if mode == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "raise":
    raise RuntimeError("boom")
while True:  # "interrupt": step until the test sends SIGINT
    td = env.step_and_maybe_reset(env.rand_action(td))[1]
"""


@pytest.mark.slow
def test_no_orphan_workers_when_the_parent_dies():
    # The three parents run side by side (each spends seconds importing torch); their workers must all go.
    modes = ("sigkill", "raise", "interrupt")
    procs = {m: subprocess.Popen([sys.executable, "-c", _SCRIPT, m], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m in modes}
    try:
        pids = {m: [int(p) for p in procs[m].stdout.readline().split()] for m in modes}
        assert all(len(p) == 2 for p in pids.values()), {m: p.stderr.read() for m, p in procs.items()}
        time.sleep(0.3)  # let "interrupt" step for a while
        procs["interrupt"].send_signal(signal.SIGINT)
        errors = {m: procs[m].communicate(timeout=60)[1] for m in modes}
    finally:
        for proc in procs.values():
            proc.kill()
    # an uncaught KeyboardInterrupt ends Python by re-raising SIGINT (after the atexit handlers ran)
    expected = {"sigkill": -signal.SIGKILL, "raise": 1, "interrupt": -signal.SIGINT}
    assert {m: p.returncode for m, p in procs.items()} == expected
    assert "RuntimeError: boom" in errors["raise"] and "KeyboardInterrupt" in errors["interrupt"]
    for m in modes:
        assert wait_gone(pids[m]), f"workers {pids[m]} outlived their parent ({m})"


@pytest.mark.parametrize("backend", ["dm_control", "envpool"])
def test_lean_step_and_maybe_reset_equals_torchrls_own_across_episode_ends(backend):
    """DMCEnv overrides step_and_maybe_reset (TorchRL's generic one cost more than an EnvPool batch step): both
    must give the same next step and the same next root, reset observations included."""
    from torchrl.envs import EnvBase

    pytest.importorskip("envpool") if backend == "envpool" else None
    ours, theirs = (DMCEnv("dmc/cartpole-balance", 3, seed=5, max_episode_steps=7, num_workers=0 if backend ==
                           "dm_control" else 1, backend=backend) for _ in range(2))  # fmt: skip
    a, b = ours.reset(), theirs.reset()
    actions = torch.rand(20, 3, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ends = 0
    for t in range(20):
        a.set("action", actions[t])
        b.set("action", actions[t].clone())
        a, next_a = ours.step_and_maybe_reset(a)
        b, next_b = EnvBase.step_and_maybe_reset(theirs, b)
        for key in ("observation", "reward", "done", "terminated", "truncated"):
            assert torch.equal(a["next", key], b["next", key]), (t, key)
        for key in ("observation", "done", "terminated", "truncated"):
            assert torch.equal(next_a[key], next_b[key]), (t, key)
        ends += int(a["next", "done"].any())
        a, b = next_a, next_b
    assert ends == 2  # 7-step episodes, 20 steps: the reset path ran
    ours.close()
    theirs.close()


# --- the EnvPool backend against dm_control ---------------------------------------------------------------------


@pytest.mark.parametrize("task", ["dmc/cartpole-balance", "dmc/walker-walk", "dmc/cheetah-run"])
def test_envpool_backend_has_dm_controls_specs_layout_and_facts(task):
    pytest.importorskip("envpool")
    with DMCEnv(task, 2, seed=0, num_workers=0) as ref, DMCEnv(task, 2, seed=0, backend="envpool") as ep:
        assert ep.observation_spec == ref.observation_spec and ep.action_spec == ref.action_spec
        assert ep.observation_layout() == ref.observation_layout() and ep.joint_names == ref.joint_names
        assert (ep.control_period, ep.max_episode_steps) == (ref.control_period, ref.max_episode_steps)
        assert torch.equal(ep.action_scale, ref.action_scale) and torch.equal(ep.action_offset, ref.action_offset)


def _random_returns(backend: str, seed: int) -> tuple[torch.Tensor, int]:
    with DMCEnv("dmc/cartpole-balance", 16, action_repeat=2, seed=seed, num_workers=0 if backend == "dm_control" else 1,
                backend=backend) as env:  # fmt: skip
        td, returns, steps = env.reset(), torch.zeros(16), 0
        gen = torch.Generator().manual_seed(seed)
        while True:
            td.set("action", torch.rand(16, 1, generator=gen) * 2 - 1)
            td, next_td = env.step_and_maybe_reset(td)
            returns += td["next", "reward"][:, 0]
            steps += 1
            if td["next", "done"].all():
                assert td["next", "truncated"].all() and not td["next", "terminated"].any()
                return returns, steps
            assert not td["next", "done"].any()  # every env ends at the same step
            td = next_td


def test_envpool_episodes_last_as_long_and_pay_like_dm_control():
    """Same episode length; random-policy returns from the same distribution (EnvPool draws its starts from its own
    generator, so the same seed gives other episodes: the comparison is statistical, 2 x 16 episodes each)."""
    pytest.importorskip("envpool")
    ref = [_random_returns("dm_control", s) for s in (0, 1)]
    ep = [_random_returns("envpool", s) for s in (0, 1)]
    assert {n for _, n in ref} == {n for _, n in ep} == {500}  # 1000 control steps at action repeat 2
    ref_returns, ep_returns = torch.cat([r for r, _ in ref]), torch.cat([r for r, _ in ep])
    assert abs(ep_returns.mean() - ref_returns.mean()) < 0.1 * ref_returns.mean()
    assert torch.equal(ep[0][0], _random_returns("envpool", 0)[0])  # a seed repeats exactly
    assert not torch.equal(ep[0][0], ep[1][0])


def test_envpool_backend_refuses_our_task_families_in_one_line():
    pytest.importorskip("envpool")
    with pytest.raises(ValueError, match=r"^backend=envpool: dmc/walker-speed_3 is one of this package's task families"):
        DMCEnv("dmc/walker-speed_3", 2, backend="envpool")


# ------------------------------------------------------------------------------ saved and continued episodes


def _steps(env: DMCEnv, td: TensorDict, actions: list[torch.Tensor]) -> tuple[TensorDict, list[TensorDict]]:
    """Step through `actions` (auto-resetting); the `next` entries of every step."""
    seen = []
    for action in actions:
        td, following = env.step_and_maybe_reset(td.set("action", action))
        seen.append(td["next"].clone())
        td = following
    return td, seen


@pytest.mark.parametrize(
    ("task", "workers", "restoring_workers"),
    [
        ("dmc/reacher-hard", 2, 0),  # the target lives in the model (geom_pos, geom_size)
        ("dmc/finger-spin", 0, 2),  # the task sets dof_damping at each episode's start
        ("dmc/cheetah-run", 2, 2),
    ],
)
def test_saved_episodes_continue_bit_for_bit_in_fresh_envs(tmp_path, task, workers, restoring_workers) -> None:
    """Through a weights_only checkpoint, into envs of another seed that ran other episodes, with another number
    of worker processes: the same observations, rewards and episode ends, past the episodes' ends (6 envs x
    20-step episodes, saved at step 13, continued for 40)."""
    from fasttd3_lora.checkpoint import load_checkpoint, save_checkpoint

    gen = torch.Generator().manual_seed(0)
    first = DMCEnv(task, 6, seed=3, num_workers=workers, max_episode_steps=20)
    actions = [torch.rand(6, first.action_spec.shape[-1], generator=gen) * 2 - 1 for _ in range(53)]
    td, _ = _steps(first, first.reset(), actions[:13])
    save_checkpoint(tmp_path / "c.pt", {"episodes": first.snapshot()})
    _, expected = _steps(first, td.clone(), actions[13:])
    first.close()

    second = DMCEnv(task, 6, seed=11, num_workers=restoring_workers, max_episode_steps=20)
    _steps(second, second.reset(), actions[:7])
    td2 = second.restore_episodes(load_checkpoint(tmp_path / "c.pt")["episodes"])
    assert torch.equal(td2["observation"], td["observation"])
    _, seen = _steps(second, td2, actions[13:])
    second.close()
    for a, b in zip(expected, seen, strict=True):
        for key in ("observation", "reward", "terminated", "truncated"):
            assert torch.equal(a[key], b[key]), key
    assert sum(int(s["truncated"].sum()) for s in seen) == 6 * 2  # two time limits of every env were crossed


def test_saved_episodes_of_other_envs_are_refused_in_one_line() -> None:
    with DMCEnv("dmc/cartpole-balance", 2, seed=0) as env:
        env.reset()
        saved = env.snapshot()
    with DMCEnv("dmc/cartpole-swingup", 2, seed=0) as other, pytest.raises(ValueError) as err:
        other.reset()
        other.restore_episodes(saved)
    assert str(err.value) == ("dmc/cartpole-swingup: the saved episodes are of 2 envs of ['dmc/cartpole-balance'], "
                              "this env has 2 of ['dmc/cartpole-swingup']")  # fmt: skip
    with DMCEnv("dmc/cartpole-balance", 2, seed=0, backend="envpool") as pooled:
        assert not pooled.can_snapshot
        with pytest.raises(ValueError, match="backend=envpool cannot save its envs' episodes"):
            pooled.snapshot()


def test_spread_starts_cut_each_first_episode_at_its_drawn_step_and_later_ones_whole() -> None:
    """`randomize_episode_starts` after a reset: env i's first episode times out after its drawn length in
    [1, 30] (distinct across envs, the same for the same seed), its second after the full 30; a snapshot taken
    inside a first episode keeps the cut."""
    lengths = {}
    for run in range(2):
        with DMCEnv("dmc/cartpole-balance", 8, seed=0, max_episode_steps=30, spread_starts=True, num_workers=2) as env:
            td = env.reset()
            env.randomize_episode_starts(123)
            before: list[TensorDict] = []
            if run:
                td, before = _steps(env, td, [torch.zeros(8, 1)] * 3)
                saved = env.snapshot()
                env.close()
                env = DMCEnv("dmc/cartpole-balance", 8, seed=5, max_episode_steps=30, spread_starts=True)
                env.reset()
                td = env.restore_episodes(saved)
            ends: list[list[int]] = [[] for _ in range(8)]
            _, seen = _steps(env, td, [torch.zeros(8, 1)] * (63 - 3 * run))
            for t, step in enumerate(before + seen, start=1):
                for i in np.flatnonzero(step["truncated"][:, 0].numpy()):
                    ends[i].append(t)
            env.close()
        lengths[run] = [e[0] for e in ends]
        assert all(len(e) >= 2 and all(b - a == 30 for a, b in zip(e, e[1:])) for e in ends), ends  # later ones whole
    assert lengths[0] == lengths[1] and len(set(lengths[0])) > 4 and 1 <= min(lengths[0]) and max(lengths[0]) <= 30
    with pytest.raises(ValueError, match="spread_starts=True needs backend=dm_control, got backend=envpool"):
        DMCEnv("dmc/cartpole-balance", 2, backend="envpool", spread_starts=True)
