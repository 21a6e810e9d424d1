"""ReplayBuffer: ring wrap-around, sampling only filled slots, state round-trip, reproducible sampling."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from fasttd3_lora.replay import ReplayBuffer

OBS, ACT = 3, 2


def transitions(start: int, n: int, critic_obs: int | None = None) -> TensorDict:
    """Transition i carries the value i in every float field, so slots can be traced back to their origin."""
    ids = torch.arange(start, start + n, dtype=torch.float32)
    d = {
        "observation": ids[:, None].expand(n, OBS).clone(),
        "action": ids[:, None].expand(n, ACT).clone(),
        "reward": ids.clone(),
        "next_observation": (ids[:, None] + 0.5).expand(n, OBS).clone(),
        "terminated": (ids.long() % 3 == 0),
        "truncated": (ids.long() % 5 == 0),
    }
    if critic_obs is not None:
        d["critic_observation"] = ids[:, None].expand(n, critic_obs).clone()
        d["next_critic_observation"] = ids[:, None].expand(n, critic_obs).clone()
    return TensorDict(d, batch_size=[n])


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 12), chunks=st.lists(st.integers(0, 15), min_size=1, max_size=8))
def test_ring_holds_exactly_the_newest_transitions(capacity: int, chunks: list[int]) -> None:
    rb = ReplayBuffer(capacity, OBS, ACT)
    total = 0
    for n in chunks:
        rb.add(transitions(total, n))
        total += n
    assert len(rb) == min(total, capacity)
    held = sorted(rb.storage["reward"][: len(rb)].tolist())
    assert held == [float(i) for i in range(total - len(rb), total)]
    # every field of a slot comes from the same transition
    s = rb.storage[: len(rb)]
    assert torch.equal(s["observation"][:, 0], s["reward"])
    assert torch.equal(s["next_observation"][:, 0], s["reward"] + 0.5)
    assert torch.equal(s["terminated"], s["reward"].long() % 3 == 0)


def test_wrap_overwrites_oldest_in_order() -> None:
    rb = ReplayBuffer(4, OBS, ACT)
    rb.add(transitions(0, 3))
    rb.add(transitions(3, 3))  # writes slots 3, 0, 1
    assert rb.storage["reward"].tolist() == [4.0, 5.0, 2.0, 3.0]


def test_samples_only_filled_slots() -> None:
    rb = ReplayBuffer(100, OBS, ACT)
    rb.add(transitions(10, 7))  # slots 0..6 hold 10..16, the rest are zeros
    g = torch.Generator().manual_seed(0)
    batch = rb.sample(2000, g)
    values = set(batch["reward"].tolist())
    assert values == {float(v) for v in range(10, 17)}  # all filled slots seen, no empty slot
    assert batch.batch_size == torch.Size([2000])
    assert batch["observation"].shape == (2000, OBS) and batch["terminated"].dtype == torch.bool


def test_sampling_is_reproducible_from_generator_state() -> None:
    rb = ReplayBuffer(50, OBS, ACT)
    rb.add(transitions(0, 50))
    g = torch.Generator().manual_seed(123)
    rb.sample(8, g)
    state = g.get_state()
    a = rb.sample(16, g)
    g2 = torch.Generator().manual_seed(999)
    g2.set_state(state)
    b = rb.sample(16, g2)
    assert (a == b).all()
    c = rb.sample(16, g)  # the stream moves on
    assert not torch.equal(a["reward"], c["reward"])


@pytest.mark.parametrize("critic_obs", [None, 4])
def test_state_dict_round_trip_continues_identically(critic_obs: int | None) -> None:
    rb = ReplayBuffer(10, OBS, ACT, critic_obs_dim=critic_obs)
    rb.add(transitions(0, 13, critic_obs))  # wrapped: cursor 3
    state = rb.state_dict()
    rb2 = ReplayBuffer(10, OBS, ACT, critic_obs_dim=critic_obs)
    rb2.load_state_dict(state)
    assert len(rb2) == len(rb) and (rb2.storage == rb.storage).all()
    # later adds land in the same slots
    rb.add(transitions(13, 2, critic_obs))
    rb2.add(transitions(13, 2, critic_obs))
    assert (rb2.storage == rb.storage).all()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert (rb.sample(32, g1) == rb2.sample(32, g2)).all()


def test_partial_state_saves_only_filled_slots() -> None:
    rb = ReplayBuffer(1000, OBS, ACT)
    rb.add(transitions(0, 5))
    state = rb.state_dict()
    assert state["storage"]["observation"].shape == (5, OBS)
    rb2 = ReplayBuffer(1000, OBS, ACT)
    rb2.load_state_dict(state)
    assert rb2.storage["reward"][:6].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0]


def test_bad_input_messages() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, OBS, ACT)
    rb = ReplayBuffer(4, OBS, ACT)
    with pytest.raises(ValueError, match="empty"):
        rb.sample(2)
    with pytest.raises(ValueError, match="missing keys"):
        rb.add(transitions(0, 2).exclude("truncated"))
    with pytest.raises(ValueError, match="capacity 4"):
        ReplayBuffer(5, OBS, ACT).load_state_dict(rb.state_dict())
    bad = transitions(0, 2)
    bad["reward"] = bad["reward"][:, None]
    with pytest.raises(ValueError, match=r"reward has per-transition shape \(1,\)"):
        rb.add(bad)
