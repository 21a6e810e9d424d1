"""NStepReplayBuffer (DESIGN §6): n-step sums and discounts against a brute-force loop, stops at dones and at the
newest step, never mixes envs, ring wrap-around, even sampling over envs, memory check, state round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from fasttd3_lora.replay import NStepReplayBuffer, free_memory_bytes

ACT = 2


def make_step(env_ids: torch.Tensor, t: int, g: torch.Generator, p_term: float, p_trunc: float, critic: bool):
    """One step of all envs. observation = (env, t) and next_observation = (env, t + 0.5) identify the step, so a
    sample can be traced back to its env and time; rewards and episode ends are random."""
    e = env_ids.numel()
    obs = torch.stack([env_ids.float(), torch.full((e,), float(t))], dim=1)
    d = {
        "observation": obs,
        "action": torch.rand(e, ACT, generator=g) * 2 - 1,
        "reward": torch.randn(e, generator=g),
        "next_observation": obs + torch.tensor([0.0, 0.5]),
        "terminated": torch.rand(e, generator=g) < p_term,
        "truncated": torch.rand(e, generator=g) < p_trunc,
    }
    if critic:
        d["critic_observation"] = torch.cat([obs, -obs], dim=1)
        d["next_critic_observation"] = torch.cat([obs, -obs], dim=1) + 0.25
    return TensorDict(d, batch_size=[e])


def reference(steps: list[TensorDict], env: int, t: int, size: int, n: int, gamma: float):
    """Brute-force n-step target of step t of `env`, from the list of every step ever added (float64)."""
    newest = len(steps) - 1
    assert newest - size < t <= newest  # only stored steps can be sampled
    ret, k = 0.0, 0
    for j in range(n):
        if t + j > newest:
            break
        step = steps[t + j]
        ret += gamma**j * float(step["reward"][env])
        k += 1
        if bool(step["terminated"][env]) or bool(step["truncated"][env]):
            break
    last = steps[t + k - 1]
    discount = gamma**k * (0.0 if bool(last["terminated"][env]) else 1.0)
    return ret, discount, last


@settings(max_examples=60, deadline=None)
@given(
    num_envs=st.integers(1, 4),
    capacity=st.integers(1, 9),
    total=st.integers(1, 25),
    n=st.integers(1, 5),
    gamma=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),
    p_done=st.sampled_from([0.0, 0.2, 0.6]),
    critic=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nstep_targets_match_a_loop_reference(num_envs, capacity, total, n, gamma, p_done, critic, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    rb = NStepReplayBuffer(num_envs, capacity, 2, ACT, n_step=n, gamma=gamma, critic_obs_dim=4 if critic else None)
    env_ids = torch.arange(num_envs)
    steps = [make_step(env_ids, t, g, p_done, p_done, critic) for t in range(total)]
    for step in steps:
        rb.add(step)
    assert len(rb) == min(total, capacity)
    batch = rb.sample(64, g)
    assert set(batch.keys()) == {"observation", "action", "reward", "next_observation", "discount"} | (
        {"critic_observation", "next_critic_observation"} if critic else set()
    )
    for i in range(64):
        env, t = int(batch["observation"][i, 0]), int(batch["observation"][i, 1])
        ret, discount, last = reference(steps, env, t, len(rb), n, gamma)
        assert batch["reward"][i].item() == pytest.approx(ret, rel=1e-5, abs=1e-5)
        assert batch["discount"][i].item() == pytest.approx(discount, rel=1e-6, abs=1e-7)
        # the bootstrap observation is next_observation of step t+k-1 of the SAME env
        assert torch.equal(batch["next_observation"][i], last["next_observation"][env])
        assert torch.equal(batch["action"][i], steps[t]["action"][env])
        if critic:
            assert torch.equal(batch["critic_observation"][i], steps[t]["critic_observation"][env])
            assert torch.equal(batch["next_critic_observation"][i], last["next_critic_observation"][env])


def hand_buffer(gamma: float = 0.5) -> NStepReplayBuffer:
    """One env, 6 steps, rewards 1..6; step 2 is a time-out, step 4 a termination."""
    rb = NStepReplayBuffer(1, 8, 2, ACT, n_step=3, gamma=gamma)
    g = torch.Generator().manual_seed(0)
    for t in range(6):
        step = make_step(torch.arange(1), t, g, 0.0, 0.0, False)
        step["reward"] = torch.tensor([t + 1.0])
        step["truncated"] = torch.tensor([t == 2])
        step["terminated"] = torch.tensor([t == 4])
        rb.add(step)
    return rb


def by_start(batch: TensorDict) -> dict[int, tuple[float, float, float]]:
    return {
        int(o[1]): (float(r), float(d), float(nxt[1]))
        for o, r, d, nxt in zip(batch["observation"], batch["reward"], batch["discount"], batch["next_observation"])
    }


def test_nstep_by_hand_stops_at_time_out_termination_and_newest_step() -> None:
    got = by_start(hand_buffer().sample(400, torch.Generator().manual_seed(1)))
    assert sorted(got) == [0, 1, 2, 3, 4, 5]
    # start: (n-step reward, gamma^k (1 - terminated), step index of the bootstrap obs + 0.5)
    assert got[0] == (1 + 0.5 * 2 + 0.25 * 3, 0.125, 2.5)  # k = 3, ends on the time-out: bootstraps
    assert got[1] == (2 + 0.5 * 3, 0.25, 2.5)  # stops at the time-out, k = 2
    assert got[2] == (3.0, 0.5, 2.5)  # the time-out itself: k = 1, bootstraps from its true final obs
    assert got[3] == (4 + 0.5 * 5, 0.0, 4.5)  # stops at the termination: no bootstrap
    assert got[4] == (5.0, 0.0, 4.5)
    assert got[5] == (6.0, 0.5, 5.5)  # the newest step: k = 1


def test_ring_wraps_per_env_and_samples_only_the_newest_steps() -> None:
    rb = NStepReplayBuffer(3, 4, 2, ACT, n_step=2, gamma=0.9)
    g = torch.Generator().manual_seed(0)
    for t in range(11):
        rb.add(make_step(torch.arange(3), t, g, 0.1, 0.1, False))
    # slot t % 4 holds step t: steps 7..10 survive, in ring order 8, 9, 10, 7
    assert rb.storage["observation"][:, :, 1].tolist() == [[8.0, 9.0, 10.0, 7.0]] * 3
    assert rb.storage["observation"][:, :, 0].tolist() == [[float(e)] * 4 for e in range(3)]
    batch = rb.sample(600, g)
    starts = batch["observation"][:, 1]
    assert set(starts.tolist()) == {7.0, 8.0, 9.0, 10.0}
    # a window never runs past the newest step into the oldest slot (10 -> 7 would be a wrap)
    assert (batch["next_observation"][:, 1] >= starts).all()
    assert (batch["next_observation"][:, 1] <= torch.clamp(starts + 1, max=10) + 0.5).all()


@pytest.mark.parametrize("num_envs, batch_size", [(4, 8), (4, 10), (7, 3), (5, 5)])
def test_sampling_is_even_over_envs(num_envs: int, batch_size: int) -> None:
    rb = NStepReplayBuffer(num_envs, 16, 2, ACT, n_step=1)
    g = torch.Generator().manual_seed(0)
    for t in range(16):
        rb.add(make_step(torch.arange(num_envs), t, g, 0.0, 0.0, False))
    seen = torch.zeros(num_envs)
    for _ in range(50):
        counts = torch.bincount(rb.sample(batch_size, g)["observation"][:, 0].long(), minlength=num_envs)
        assert counts.sum() == batch_size
        assert counts.min() == batch_size // num_envs and counts.max() == math.ceil(batch_size / num_envs)
        seen += counts
    assert (seen > 0).all()  # which envs get the extra samples is random: every env is reached


def test_sampling_is_reproducible_and_state_round_trips() -> None:
    rb = NStepReplayBuffer(2, 5, 2, ACT, n_step=3, gamma=0.9, critic_obs_dim=4)
    g = torch.Generator().manual_seed(0)
    for t in range(7):
        rb.add(make_step(torch.arange(2), t, g, 0.2, 0.2, True))
    buf = io.BytesIO()
    torch.save(rb.state_dict(), buf)
    buf.seek(0)
    clone = NStepReplayBuffer(2, 5, 2, ACT, n_step=3, gamma=0.9, critic_obs_dim=4)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    a = rb.sample(32, torch.Generator().manual_seed(5))
    b = clone.sample(32, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a.keys())
    # the restored cursor keeps the ring order: the next add overwrites the same slot in both
    step = make_step(torch.arange(2), 7, g, 0.0, 0.0, True)
    rb.add(step)
    clone.add(step)
    assert all(torch.equal(rb.storage[k], clone.storage[k]) for k in rb.storage.keys())


def test_partly_filled_state_round_trip_keeps_only_filled_slots() -> None:
    rb = NStepReplayBuffer(2, 10, 2, ACT)
    g = torch.Generator().manual_seed(0)
    for t in range(3):
        rb.add(make_step(torch.arange(2), t, g, 0.0, 0.0, False))
    state = rb.state_dict()
    assert state["storage"]["observation"].shape == (2, 3, 2)
    other = NStepReplayBuffer(2, 10, 2, ACT)
    other.load_state_dict(state)
    assert len(other) == 3 and torch.equal(other.storage["observation"], rb.storage["observation"])
    with pytest.raises(ValueError, match="do not match"):
        NStepReplayBuffer(3, 10, 2, ACT).load_state_dict(state)


def test_memory_report_and_check_fits_raises_with_the_numbers(caplog) -> None:
    # obs 310 and next obs (2 x 310 x 4 B) + action 37 x 4 B + reward 4 B + two bool flags = 2634 B
    with caplog.at_level("INFO", logger="fasttd3_lora.replay"):
        small = NStepReplayBuffer(2, 3, 310, 37)
    assert small.bytes_per_transition == 2634 and small.nbytes == 2634 * 6
    assert "2634 B/transition" in caplog.text
    if free_memory_bytes("cpu") is None:
        pytest.skip("this platform reports no free memory")
    need = 4096 * 10_000_000 * 2634
    with pytest.raises(ValueError, match=rf"^replay buffer needs {need:,} B .* 4096 envs x 10000000 steps x 2634 B\) but cpu has [\d,]+ B"):
        NStepReplayBuffer(4096, 10_000_000, 310, 37)


def test_bad_input_is_refused_in_one_line() -> None:
    rb = NStepReplayBuffer(2, 4, 2, ACT, critic_obs_dim=3)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="empty"):
        rb.sample(4, g)
    with pytest.raises(ValueError, match=r"batch_size \[2\]"):
        rb.add(make_step(torch.arange(3), 0, g, 0.0, 0.0, True))
    with pytest.raises(ValueError, match="missing keys"):
        rb.add(make_step(torch.arange(2), 0, g, 0.0, 0.0, False))
    step = make_step(torch.arange(2), 0, g, 0.0, 0.0, True)
    step["critic_observation"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"critic_observation has per-transition shape \(4,\), expected \(3,\)"):
        rb.add(step)
    for bad in (dict(n_step=0), dict(gamma=1.5), dict(critic_obs_dim=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NStepReplayBuffer(2, 4, 2, ACT, **bad)
