"""Replay buffers.

`ReplayBuffer` is the SAC buffer: a preallocated ring of transitions held as one `TensorDict`
(DESIGN §5, buffer 1M). It is ours rather than TorchRL's `TensorDictReplayBuffer` because the ring is
faster at the sizes we use: DESIGN §9 measured `TensorDictReplayBuffer(LazyTensorStorage)` 1.7-2.4x
slower at batch 256 on CPU, and `benchmarks/replay_sampling.py` re-measures ours against both
`LazyTensorStorage` and `LazyMemmapStorage` (tables in `docs/sac_benchmarks.md`).

Sampling draws indices from a caller-owned `torch.Generator`, so a resumed run that restores the
generator state and the buffer's `state_dict()` samples exactly the same batches.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor

__all__ = ["ReplayBuffer"]


class ReplayBuffer:
    """Uniform replay over a preallocated ring of `capacity` transitions.

    Keys: ``observation`` (obs_dim), ``action`` (act_dim), ``reward`` (), ``next_observation`` (obs_dim),
    ``terminated`` (), ``truncated`` () and, when ``critic_obs_dim`` is given (asymmetric critics),
    ``critic_observation`` and ``next_critic_observation`` (critic_obs_dim).
    """

    def __init__(
        self,
        capacity: int,
        obs_dim: int,
        act_dim: int,
        *,
        critic_obs_dim: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, value in (("capacity", capacity), ("obs_dim", obs_dim), ("act_dim", act_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if critic_obs_dim is not None and (not isinstance(critic_obs_dim, int) or critic_obs_dim < 1):
            raise ValueError(f"critic_obs_dim must be None or a positive int, got {critic_obs_dim!r}")
        self.capacity = capacity
        self.device = torch.device(device)
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "observation": ((obs_dim,), dtype),
            "action": ((act_dim,), dtype),
            "reward": ((), dtype),
            "next_observation": ((obs_dim,), dtype),
            "terminated": ((), torch.bool),
            "truncated": ((), torch.bool),
        }
        if critic_obs_dim is not None:
            shapes["critic_observation"] = ((critic_obs_dim,), dtype)
            shapes["next_critic_observation"] = ((critic_obs_dim,), dtype)
        self._storage = TensorDict(
            {k: torch.zeros((capacity, *s), dtype=dt, device=self.device) for k, (s, dt) in shapes.items()},
            batch_size=[capacity],
            device=self.device,
        )
        self._keys = tuple(shapes)
        # The TensorDict's own tensors, looked up once: per-call TensorDict.get costs more than the copy.
        self._columns: dict[str, Tensor] = {k: self._storage.get(k) for k in self._keys}
        self._cursor = 0  # next slot to write
        self._size = 0  # number of filled slots

    def __len__(self) -> int:
        return self._size

    @property
    def storage(self) -> TensorDict:
        """The whole ring (read-only use: slots at index >= len(self) hold zeros or stale data)."""
        return self._storage

    def add(self, td: TensorDict) -> None:
        """Write a batch of N transitions (``td.batch_size == [N]``), overwriting the oldest when full."""
        if td.batch_dims != 1:
            raise ValueError(f"add expects a TensorDict with one batch dimension [N], got batch_size {td.batch_size}")
        missing = set(self._keys) - set(td.keys())
        if missing:
            raise ValueError(f"add: missing keys {sorted(missing)}; the buffer stores {list(self._keys)}")
        n = td.batch_size[0]
        src = {k: td.get(k) for k in self._keys}
        for key, value in src.items():
            if value.shape[1:] != self._columns[key].shape[1:]:
                raise ValueError(
                    f"add: {key} has per-transition shape {tuple(value.shape[1:])}, "
                    f"expected {tuple(self._columns[key].shape[1:])}"
                )
        if n == 0:
            return
        if n > self.capacity:  # only the newest `capacity` transitions can survive
            src = {k: v[n - self.capacity :] for k, v in src.items()}
            n = self.capacity
        # At most two contiguous slices (before and after the wrap): slice copies cost about half of
        # an index_put with a computed index tensor.
        first = min(n, self.capacity - self._cursor)
        for key, value in src.items():
            dst = self._columns[key]
            dst[self._cursor : self._cursor + first].copy_(value[:first])
            if first < n:
                dst[: n - first].copy_(value[first:])
        self._cursor = (self._cursor + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> TensorDict:
        """Uniformly sample `batch_size` filled slots (with replacement), indices drawn from `generator`."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if self._size == 0:
            raise ValueError("sample: the buffer is empty (add transitions first)")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(0, self._size, (batch_size,), generator=generator, device=gen_device)
        idx = idx.to(self.device, non_blocking=True)
        # Per-key index_select is ~3x faster than TensorDict fancy indexing (td[idx]) at batch 256.
        return TensorDict(
            {k: col.index_select(0, idx) for k, col in self._columns.items()},
            batch_size=[batch_size],
            device=self.device,
        )

    def state_dict(self) -> dict[str, object]:
        """Filled slots only (a 1M ring that is 10% full saves 10% of its memory), plus the cursor."""
        return {
            "capacity": self.capacity,
            "cursor": self._cursor,
            "size": self._size,
            "storage": {k: col[: self._size].clone() for k, col in self._columns.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"load_state_dict: capacity {state['capacity']} does not match this buffer's {self.capacity}")
        size, cursor = int(state["size"]), int(state["cursor"])
        if not 0 <= size <= self.capacity or not 0 <= cursor < self.capacity:
            raise ValueError(f"load_state_dict: size {size} / cursor {cursor} out of range for capacity {self.capacity}")
        storage: dict[str, Tensor] = state["storage"]  # type: ignore[assignment]
        if set(storage) != set(self._keys):
            raise ValueError(f"load_state_dict: keys {sorted(storage)} do not match the buffer's {sorted(self._keys)}")
        for key in self._keys:
            dst = self._columns[key]
            src = storage[key]
            if src.shape != (size, *dst.shape[1:]):
                raise ValueError(f"load_state_dict: {key} has shape {tuple(src.shape)}, expected {(size, *dst.shape[1:])}")
            dst[:size].copy_(src)
            dst[size:].zero_()
        self._size, self._cursor = size, cursor
