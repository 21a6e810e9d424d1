"""The recurrent Gaussian actor (MAPPO's `algo.recurrent=true`; docs/mappo.md): the MAPPO code base's recurrent
policy, `obs -> MLP (ELU) -> GRU -> MLP (the layers after the GRU, ELU) -> linear mean head`, with one learnable
log-std row per task or agent.

The GRU is written out (`gru_step`, PyTorch's `nn.GRUCell` equations) over two plain linear maps, the input map
`x -> 3H` and the hidden map `h -> 3H`, so that LoRASA's adapters sit on them as on every other linear map of the
actor (`fasttd3_lora.adapters.add_adapters`), and a mixed batch sends each row through its own agent's adapters.

A hidden state is zeroed where an episode starts (`reset_hidden`), in the rollout and when a chunk of the rollout
is recomputed for truncated backpropagation through time (`unroll`), so both see the same sequence of states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttd3_lora.adapters import adapted
from fasttd3_lora.hypersphere import check_positive_int
from fasttd3_lora.mlp_policy import MLP, Task, layer_shapes, load_adapted, log_std_rows, merged_policy, task_rows

__all__ = ["gru_step", "reset_hidden", "GRUCell", "RecurrentGaussianPolicy", "unroll"]


def gru_step(x_gates: Tensor, h_gates: Tensor, h: Tensor) -> Tensor:
    """The next hidden state from the input map's `x W_i^T + b_i` and the hidden map's `h W_h^T + b_h` (each
    3H wide, gates in the order reset r, update z, candidate n, as `nn.GRUCell`):
    r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + r ⊙ h_n), h' = (1 - z) ⊙ n + z ⊙ h."""
    xr, xz, xn = x_gates.chunk(3, -1)
    hr, hz, hn = h_gates.chunk(3, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return n + z * (h - n)


def reset_hidden(hidden: Tensor, first: Tensor) -> Tensor:
    """`hidden` zeroed on the rows whose episode starts (`first`, a bool per row, broadcast over the rest)."""
    return hidden * (~first).reshape(*first.shape, *[1] * (hidden.dim() - first.dim())).to(hidden.dtype)


class GRUCell(nn.Module):
    """A GRU cell over two linear maps (`input_map`, `hidden_map`), drawn as `nn.GRUCell` draws its weights
    (uniform in ±1/√H); `forward(x, h, adapter)` hands `adapter` to whichever map carries adapters."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        check_positive_int("GRU input width", in_dim)
        check_positive_int("GRU hidden width", hidden_dim)
        self.input_map = nn.Linear(in_dim, 3 * hidden_dim)
        self.hidden_map = nn.Linear(hidden_dim, 3 * hidden_dim)
        bound = 1.0 / math.sqrt(hidden_dim)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, h: Tensor, adapter: int | Tensor = 0) -> Tensor:
        return gru_step(adapted(self.input_map, x, adapter), adapted(self.hidden_map, h, adapter), h)


class RecurrentGaussianPolicy(nn.Module):
    """A diagonal Gaussian over actions whose mean reads the observation through an MLP (`hidden_dims`), a GRU
    (`rnn_dim`) and a head MLP (`after_dims`, then the action mean; module docstring); `forward(obs, task, hidden)
    -> (mean, log_std, next hidden)`, one step of a batch."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int], rnn_dim: int, init_std: float = 1.0,
                 num_tasks: int = 1, after_dims: Sequence[int] = ()) -> None:  # fmt: skip
        super().__init__()
        if not hidden_dims:
            raise ValueError("a recurrent actor needs at least one MLP layer before its GRU (hidden_dims is empty)")
        check_positive_int("num_tasks", num_tasks)
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.obs_dim, self.act_dim, self.hidden_dims, self.rnn_dim = obs_dim, act_dim, tuple(hidden_dims), rnn_dim
        self.after_dims = tuple(after_dims)
        self.trunk = MLP(obs_dim, hidden_dims[:-1], hidden_dims[-1])  # ELU after its last layer too (`_mean`)
        self.gru = GRUCell(hidden_dims[-1], rnn_dim)
        self.head = MLP(rnn_dim, after_dims, act_dim)
        self.log_std = nn.Parameter(torch.full((num_tasks, act_dim), math.log(init_std)))

    @property
    def num_tasks(self) -> int:
        return self.log_std.shape[0]

    def initial_hidden(self, batch: int, device: torch.device | None = None) -> Tensor:
        """The state every episode starts from: zeros (batch, rnn_dim)."""
        return torch.zeros(batch, self.rnn_dim, device=device if device is not None else self.log_std.device)

    def _mean(self, obs: Tensor, hidden: Tensor, rows: int | Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.gru(F.elu(self.trunk(obs, adapter=rows)), hidden, rows)
        return self.head(hidden, adapter=rows), hidden

    def forward(self, obs: Tensor, task: Task = None, hidden: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`(mean, log_std, next hidden)`: (batch, act_dim) twice and (batch, rnn_dim); `hidden=None` starts
        episodes."""
        rows = task_rows(task, obs.shape[0], obs.device)
        hidden = self.initial_hidden(obs.shape[0], obs.device) if hidden is None else hidden
        mean, hidden = self._mean(obs, hidden.to(obs.dtype), rows)
        return mean, log_std_rows(self.log_std, rows, mean), hidden

    def deterministic_action(self, obs: Tensor, task: Task = None, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The clipped mean in [-1, 1] and the next hidden state (evaluation's and export's step)."""
        mean, _, hidden = self(obs, task, hidden)
        return mean.clamp(-1.0, 1.0), hidden

    def merged(self, k: int) -> "RecurrentGaussianPolicy":
        """A plain policy computing row index k's map (`merged_policy`)."""
        return merged_policy(self, k)

    @staticmethod
    def holds(state: Mapping[str, Tensor]) -> bool:
        """Whether a state dict is one of this class (it has a GRU)."""
        return any(key.startswith("gru.") for key in state)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], alpha: float | None = None,
                        rank: int | None = None) -> "RecurrentGaussianPolicy":  # fmt: skip
        """The policy a `state_dict()` came from, sized by its tensors, adapted where it holds adapters
        (`load_adapted`), loaded strictly."""
        trunk, head = layer_shapes(state, "trunk"), layer_shapes(state, "head")
        hidden_map = state.get("gru.hidden_map.weight", state.get("gru.hidden_map.base"))
        if not trunk or not head or hidden_map is None:
            raise ValueError("not a RecurrentGaussianPolicy state dict (no trunk.layers.0, gru.hidden_map or head.layers.0)")
        policy = cls(trunk[0][1], head[-1][0], [d[0] for d in trunk], hidden_map.shape[1],
                     num_tasks=state["log_std"].shape[0], after_dims=[d[0] for d in head[:-1]])  # fmt: skip
        return load_adapted(policy, state, rank, alpha)


def unroll(policy: Callable[..., tuple[Tensor, Tensor, Tensor]], obs: Tensor, first: Tensor, hidden: Tensor,
           task: Task = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A recurrent policy (or any `(obs, task, hidden) -> (mean, log_std, next hidden)` callable) over a chunk of
    steps from a stored start state: `obs` (L, B, D), `first` (L, B) (an
    episode starts at that step: the state is zeroed before it), `hidden` (B, H) the state before step 0 (as the
    rollout stored it). Returns the means and log-stds (L, B, act_dim), each step's as the rollout computed it."""
    means, log_stds = [], []
    for t in range(obs.shape[0]):
        mean, log_std, hidden = policy(obs[t], task, reset_hidden(hidden, first[t]))
        means.append(mean)
        log_stds.append(log_std)
    return torch.stack(means), torch.stack(log_stds)
