"""Evaluation keeps every tensor on the env's device (Isaac Lab's are CUDA): checked without a GPU under PyTorch's
fake tensors, which can claim a `cuda` device on a CPU-only build and refuse a cuda/cpu mix the way CUDA does."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from fasttd3_lora.loops import kit


class FakeCudaEnv:
    """Two envs whose every tensor lives on (fake) cuda, as Isaac Lab's do; episodes never end by themselves."""

    def __init__(self) -> None:
        self.device = torch.device("cuda:0")
        self.batch_size = torch.Size([2])
        self.steps = 0

    def set_seed(self, seed: int) -> None: ...

    def reset(self) -> TensorDict:
        return TensorDict({"observation": torch.zeros(2, 3, device=self.device)}, batch_size=[2], device=self.device)

    def step_and_maybe_reset(self, td: TensorDict) -> tuple[TensorDict, TensorDict]:
        assert td["action"].device == self.device  # what Isaac Lab's step needs
        self.steps += 1
        flags = torch.zeros(2, 1, dtype=torch.bool, device=self.device)
        nxt = {"observation": torch.ones(2, 3, device=self.device), "reward": torch.ones(2, 1, device=self.device),
               "done": flags, "terminated": flags, "truncated": flags}  # fmt: skip
        td = td.clone().set("next", TensorDict(nxt, batch_size=[2], device=self.device))
        return td, self.reset()


class CudaPolicy:
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        return obs.sum(-1, keepdim=True) * 0.0  # on the observations' device (fake cuda tensors refuse slicing)


def test_evaluation_makes_no_host_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under fake tensors `bool(running.any())` has no value: let the loop run three steps, then stop it.
    answers = iter([True, True, True, False])
    monkeypatch.setattr(kit, "bool", lambda _tensor: next(answers), raising=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        env = FakeCudaEnv()
        # a host tensor anywhere in the loop raises FakeTensorDeviceMismatchError before the returns are read;
        # reading them (.item()) is the first thing fake tensors cannot do
        with pytest.raises(DataDependentOutputException):
            kit.evaluate(CudaPolicy(), env, seed=0)
    assert env.steps == 3


def test_the_check_catches_a_host_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same loop with the bug this test is for (returns accumulated on the host) fails under it."""
    answers = iter([True, False])
    monkeypatch.setattr(kit, "bool", lambda _tensor: next(answers), raising=False)
    real_zeros = torch.zeros
    monkeypatch.setattr(kit.torch, "zeros", lambda *a, device=None, **k: real_zeros(*a, **k))  # ignore device=
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            kit.evaluate(CudaPolicy(), FakeCudaEnv(), seed=0)
