"""Replay buffers.

`ReplayBuffer` is the SAC buffer: a preallocated ring of transitions held as one `TensorDict`
(DESIGN §5, buffer 1M). It is ours rather than TorchRL's `TensorDictReplayBuffer` because the ring is
faster at the sizes we use: DESIGN §9 measured `TensorDictReplayBuffer(LazyTensorStorage)` 1.7-2.4x
slower at batch 256 on CPU, and `benchmarks/replay_sampling.py` re-measures ours against both
`LazyTensorStorage` and `LazyMemmapStorage` (tables in `docs/sac_benchmarks.md`).

`NStepReplayBuffer` is the FastTD3 buffer (DESIGN §6): one ring per env on the env's device, n-step returns
computed at sample time.

Sampling draws indices from a caller-owned `torch.Generator`, so a resumed run that restores the
generator state and the buffer's `state_dict()` samples exactly the same batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import Tensor

__all__ = ["ReplayBuffer", "NStepReplayBuffer", "ReplayMemoryError", "free_memory_bytes", "bytes_per_transition"]

log = logging.getLogger(__name__)


def _transition_specs(
    obs_dim: int, act_dim: int, critic_obs_dim: int | None, dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-transition (shape, dtype) of every stored key; the critic keys only for asymmetric critics."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "observation": ((obs_dim,), dtype),
        "action": ((act_dim,), dtype),
        "reward": ((), dtype),
        "next_observation": ((obs_dim,), dtype),
        "terminated": ((), torch.bool),
        "truncated": ((), torch.bool),
    }
    if critic_obs_dim is not None:
        specs["critic_observation"] = ((critic_obs_dim,), dtype)
        specs["next_critic_observation"] = ((critic_obs_dim,), dtype)
    return specs


class ReplayMemoryError(ValueError):
    """A buffer that needs more memory than its device has free; the message is one line with the numbers."""


def bytes_per_transition(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes one stored transition occupies (every key of `_transition_specs`)."""
    return sum(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() for shape, dtype in specs.values())


def check_fits(nbytes: int, device: torch.device, layout: str, remedy: str) -> None:
    """Raise `ReplayMemoryError` before allocating when `nbytes` exceed what `device` has free; `layout` says
    how the bytes add up, `remedy` what to lower."""
    free = free_memory_bytes(device)
    if free is not None and nbytes > free:
        raise ReplayMemoryError(
            f"replay buffer needs {nbytes:,} B ({nbytes / 2**30:.2f} GiB = {layout}) but {device} has {free:,} B "
            f"({free / 2**30:.2f} GiB) free; lower {remedy}"
        )


def _checked_values(td: TensorDict, columns: dict[str, Tensor], lead: int) -> dict[str, Tensor]:
    """`td`'s value of every stored key (one `get` each), checked against its column's per-transition shape
    (the column's dims after its `lead` ring dims)."""
    missing = set(columns) - set(td.keys())
    if missing:
        raise ValueError(f"add: missing keys {sorted(missing)}; the buffer stores {list(columns)}")
    values = {k: td.get(k) for k in columns}
    for key, column in columns.items():
        got, want = tuple(values[key].shape[1:]), tuple(column.shape[lead:])
        if got != want:
            raise ValueError(f"add: {key} has per-transition shape {got}, expected {want}")
    return values


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
        shapes = _transition_specs(obs_dim, act_dim, critic_obs_dim, dtype)
        per = bytes_per_transition(shapes)
        check_fits(capacity * per, self.device, f"{capacity} transitions x {per} B", "buffer_size")
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
        src = _checked_values(td, self._columns, lead=1)
        n = td.batch_size[0]
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


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on `device`: `torch.cuda.mem_get_info` on CUDA, `MemAvailable` of
    /proc/meminfo on CPU; None where neither is known (another platform or device type)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
        except OSError:
            return None
    return None


class NStepReplayBuffer:
    """FastTD3's replay (DESIGN §6): a ring of `capacity_per_env` steps per env, held as one `TensorDict` of
    batch shape [num_envs, capacity_per_env] on the env's device, with n-step returns computed at sample time.

    `add` takes one step of all envs: ``observation``, ``action``, ``reward``, ``next_observation`` (the TRUE
    final observation when the episode ended and the env handed one out), ``terminated``, ``truncated`` and,
    with ``critic_obs_dim``, ``critic_observation`` / ``next_critic_observation`` (asymmetric critics).

    `sample` spreads the batch evenly over envs (each env gets floor or ceil of batch / num_envs samples; a
    random permutation decides which envs get the extra ones), as FastTD3 samples `batch // num_envs` per env,
    and a uniform stored step per sample. From step t it sums `sum_{j<k} gamma^j r_{t+j}`, where k is n, or the
    steps up to and including the first done (terminated or truncated), or up to the newest stored step,
    whichever is fewest; it bootstraps from ``next_observation`` at t+k-1 with discount
    `gamma^k (1 - terminated_{t+k-1})` (a time-out bootstraps from its true final observation). All of it is
    gathers over a (batch, n) index tensor within each sample's own env.

    Every step stores its own ``next_observation``, although it equals the next step's ``observation``
    except at episode ends: storing it only there needs a side table for time-outs whose size depends on how
    often envs time out; docs/fasttd3_benchmarks.md gives the numbers (it would save 47% at 4096 envs x
    10,240 steps x 310-dim obs) and why it is left out.
    """

    def __init__(
        self,
        num_envs: int,
        capacity_per_env: int,
        obs_dim: int,
        act_dim: int,
        *,
        n_step: int = 1,
        gamma: float = 0.99,
        critic_obs_dim: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, value in (("num_envs", num_envs), ("capacity_per_env", capacity_per_env), ("obs_dim", obs_dim),
                            ("act_dim", act_dim), ("n_step", n_step)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if critic_obs_dim is not None and (not isinstance(critic_obs_dim, int) or critic_obs_dim < 1):
            raise ValueError(f"critic_obs_dim must be None or a positive int, got {critic_obs_dim!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        self.num_envs, self.capacity = num_envs, capacity_per_env
        self.n_step, self.gamma = n_step, float(gamma)
        self.device = torch.device(device)
        self._specs = _transition_specs(obs_dim, act_dim, critic_obs_dim, dtype)
        log.info(
            "n-step replay: %d envs x %d steps x %d B/transition = %.3f GiB on %s",
            num_envs, capacity_per_env, self.bytes_per_transition, self.nbytes / 2**30, self.device,
        )  # fmt: skip
        self.check_fits(self.device)
        shape = (num_envs, capacity_per_env)
        self._storage = TensorDict(
            {k: torch.zeros((*shape, *s), dtype=dt, device=self.device) for k, (s, dt) in self._specs.items()},
            batch_size=list(shape),
            device=self.device,
        )
        self._keys = tuple(self._specs)
        self._columns: dict[str, Tensor] = {k: self._storage.get(k) for k in self._keys}
        # (num_envs * capacity, ...) views of the same memory: one flat index per (env, slot) for the gathers.
        self._flat: dict[str, Tensor] = {k: c.view(-1, *c.shape[2:]) for k, c in self._columns.items()}
        # gamma^j for j = 0..n, float64 powers rounded once, so the sum and gamma^k match a float64 reference.
        self._gamma_powers = (self.gamma ** torch.arange(n_step + 1, dtype=torch.float64)).float().to(self.device)
        self._cursor = 0  # next slot to write (the same for every env: one add() writes all of them)
        self._size = 0  # filled steps per env

    # -- memory
    @property
    def bytes_per_transition(self) -> int:
        """Bytes one env step occupies (every stored key)."""
        return bytes_per_transition(self._specs)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole preallocated buffer."""
        return self.bytes_per_transition * self.num_envs * self.capacity

    def check_fits(self, device: torch.device | str) -> None:
        """Raise `ReplayMemoryError` (one line, with the numbers) when the buffer needs more than `device` has free."""
        layout = f"{self.num_envs} envs x {self.capacity} steps x {self.bytes_per_transition} B"
        check_fits(self.nbytes, torch.device(device), layout, "buffer_size (per env) or num_envs")

    # -- data
    def __len__(self) -> int:
        """Stored steps per env."""
        return self._size

    @property
    def storage(self) -> TensorDict:
        """The whole ring [num_envs, capacity] (read-only use; slots >= len(self) hold zeros until the ring fills)."""
        return self._storage

    def add(self, td: TensorDict) -> None:
        """Write one step of all envs (``td.batch_size == [num_envs]``), overwriting each env's oldest step when full."""
        if tuple(td.batch_size) != (self.num_envs,):
            raise ValueError(f"add expects one step of all envs, batch_size [{self.num_envs}], got {list(td.batch_size)}")
        src = _checked_values(td, self._columns, lead=2)
        for key, dst in self._columns.items():
            dst[:, self._cursor].copy_(src[key])
        self._cursor = (self._cursor + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> TensorDict:
        """`batch_size` n-step transitions (see the class docstring), indices drawn from `generator`.

        Returns observation, action, reward (the n-step sum), next_observation (at t+k-1), discount
        (`gamma^k (1 - terminated_{t+k-1})`) and, when stored, critic_observation / next_critic_observation.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if self._size == 0:
            raise ValueError("sample: the buffer is empty (add steps first)")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        env = torch.randperm(self.num_envs, generator=generator, device=gen_device)
        env = env[torch.arange(batch_size, device=gen_device) % self.num_envs]
        age = torch.randint(0, self._size, (batch_size,), generator=generator, device=gen_device)  # 0 = oldest
        env, age = env.to(self.device, non_blocking=True), age.to(self.device, non_blocking=True)

        oldest = (self._cursor - self._size) % self.capacity
        start = (oldest + age) % self.capacity
        j = torch.arange(self.n_step, device=self.device)
        flat = env.unsqueeze(1) * self.capacity + (start.unsqueeze(1) + j) % self.capacity  # (B, n)
        done = (self._flat["terminated"][flat] | self._flat["truncated"][flat]).int()
        # Step j counts while it is stored (j < steps up to the newest) and no earlier step of the window ended.
        stored = j < (self._size - age).unsqueeze(1)
        ended_before = (done.cumsum(1) - done) > 0
        used = stored & ~ended_before  # (B, n); column 0 is always used
        k = used.sum(1)
        rewards = self._flat["reward"][flat].float() * self._gamma_powers[: self.n_step]
        reward = torch.where(used, rewards, 0.0).sum(1)
        last = flat.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
        discount = self._gamma_powers[k] * (~self._flat["terminated"][last]).float()

        first = flat[:, 0]
        out = {
            "observation": self._flat["observation"].index_select(0, first),
            "action": self._flat["action"].index_select(0, first),
            "reward": reward,
            "next_observation": self._flat["next_observation"].index_select(0, last),
            "discount": discount,
        }
        if "critic_observation" in self._flat:
            out["critic_observation"] = self._flat["critic_observation"].index_select(0, first)
            out["next_critic_observation"] = self._flat["next_critic_observation"].index_select(0, last)
        return TensorDict(out, batch_size=[batch_size], device=self.device)

    # -- checkpointing
    def state_dict(self) -> dict[str, object]:
        """Filled slots only (slots [0, size) of every env's ring are the filled ones), plus the cursor."""
        return {
            "num_envs": self.num_envs,
            "capacity": self.capacity,
            "cursor": self._cursor,
            "size": self._size,
            "storage": {k: col[:, : self._size].clone() for k, col in self._columns.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        if (state["num_envs"], state["capacity"]) != (self.num_envs, self.capacity):
            raise ValueError(
                f"load_state_dict: {state['num_envs']} envs x {state['capacity']} steps do not match this buffer's "
                f"{self.num_envs} x {self.capacity}"
            )
        size, cursor = int(state["size"]), int(state["cursor"])
        if not 0 <= size <= self.capacity or not 0 <= cursor < self.capacity or (size < self.capacity and cursor != size):
            raise ValueError(f"load_state_dict: size {size} / cursor {cursor} invalid for capacity {self.capacity}")
        storage: dict[str, Tensor] = state["storage"]  # type: ignore[assignment]
        if set(storage) != set(self._keys):
            raise ValueError(f"load_state_dict: keys {sorted(storage)} do not match the buffer's {sorted(self._keys)}")
        for key, dst in self._columns.items():
            src = storage[key]
            if src.shape != (self.num_envs, size, *dst.shape[2:]):
                raise ValueError(
                    f"load_state_dict: {key} has shape {tuple(src.shape)}, expected {(self.num_envs, size, *dst.shape[2:])}"
                )
            dst[:, :size].copy_(src)
            dst[:, size:].zero_()
        self._size, self._cursor = size, cursor
