"""MLP policies and value functions for the on-policy algorithms (PPO, group-relative fine-tuning): the networks
Isaac Lab users know from rsl_rl (ELU MLPs, a Gaussian policy with a state-independent std), built so that any of
their linear maps can carry LoRA adapters (`fasttd3_lora.adapters`) and a batch can mix tasks row by row.

* `MLP`: `Linear -> ELU -> ... -> Linear`. `forward(x, adapter=idx)` hands `adapter` to every adapted layer
  (`LoRALinear`) and ignores it for plain ones, so one forward serves a batch whose rows use different adapters.
* `GaussianPolicy`: `mean = MLP(obs)`, one learnable log-std row per task (`num_tasks`, rsl_rl's scalar std).
  Actions are sampled unsquashed and clipped to [-1, 1] at the env boundary (rsl_rl's convention); the policy's
  log-probabilities, entropy and KL are those of the Gaussian. `deterministic_action` is the clipped mean
  (evaluation and export).
* `ValueFunction`: `MLP(obs)` with one output per task; row b reads its task's column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttd3_lora.adapters import add_adapters, adapted, dense_merged, linear_maps
from fasttd3_lora.hypersphere import check_positive_int

__all__ = ["MLP", "GaussianPolicy", "ValueFunction", "task_rows", "log_std_rows", "layer_shapes", "load_adapted", "merged_policy"]

Task = int | Tensor | None  # None: task 0 for every row; an int: one task for every row; (batch,) long: per row


def task_rows(task: Task, batch: int, device: torch.device) -> Tensor | int:
    """The per-row task index, or one int for the whole batch."""
    if task is None:
        return 0
    if isinstance(task, Tensor) and tuple(task.shape) != (batch,):
        raise ValueError(f"task must be an int or a ({batch},) long tensor, got shape {tuple(task.shape)}")
    return task.to(device) if isinstance(task, Tensor) else task


def log_std_rows(log_std: Tensor, rows: Tensor | int, mean: Tensor) -> Tensor:
    """Each row's log-std from a (num_tasks, act_dim) table, shaped like `mean`."""
    return log_std[rows] if isinstance(rows, Tensor) else log_std[rows].expand_as(mean)


def layer_shapes(state: Mapping[str, Tensor], mlp: str) -> list[tuple[int, ...]]:
    """(out, in) of each linear layer of the `MLP` named `mlp` in a state dict (its `weight`, or `base` where the
    layer carries adapters)."""
    shapes: list[tuple[int, ...]] = []
    while (w := state.get(f"{mlp}.layers.{len(shapes)}.weight", state.get(f"{mlp}.layers.{len(shapes)}.base"))) is not None:
        shapes.append(tuple(w.shape))
    return shapes


def load_adapted(policy: nn.Module, state: Mapping[str, Tensor], rank: int | None, alpha: float | None) -> nn.Module:
    """`policy` (built plain, sized from `state`) with adapters on every linear map where `state` holds them, then
    `state` loaded strictly. A state dict does not hold the rank and alpha asked for: rank None is the widest
    adapter's (narrow layers hold fewer: `add_adapters`), alpha None is alpha = rank."""
    factors = [a for key, a in state.items() if key.endswith("lora_A")]  # (num_adapters, rank, in)
    if factors:
        add_adapters(policy, linear_maps(policy), rank=rank or max(a.shape[1] for a in factors),
                     num_adapters=factors[0].shape[0], alpha=alpha)  # fmt: skip
    policy.load_state_dict(state)
    return policy


@torch.no_grad()
def merged_policy(policy: nn.Module, k: int) -> nn.Module:
    """A plain copy of a policy with per-row adapters and log-stds computing row index k's map: each adapted
    layer replaced by adapter k merged into an `nn.Linear`, log-std row k (export of one task's or agent's policy)."""
    merged = dense_merged(policy, k)
    merged.log_std = nn.Parameter(policy.log_std[k : k + 1].clone())
    return merged.eval()


class MLP(nn.Module):
    """`in -> hidden_dims... -> out` with ELU between the linear maps (none after the last)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> None:
        super().__init__()
        dims = [in_dim, *hidden_dims, out_dim]
        for d in dims:
            check_positive_int("MLP width", d)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor, adapter: int | Tensor = 0) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = adapted(layer, x, adapter)
            if i < last:
                x = F.elu(x)
        return x


class GaussianPolicy(nn.Module):
    """A diagonal Gaussian over actions: `MLP` mean, a learnable log-std per task (module docstring)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int], init_std: float = 1.0,
                 num_tasks: int = 1) -> None:  # fmt: skip
        super().__init__()
        check_positive_int("num_tasks", num_tasks)
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.obs_dim, self.act_dim, self.hidden_dims = obs_dim, act_dim, tuple(hidden_dims)
        self.mean_net = MLP(obs_dim, hidden_dims, act_dim)
        self.log_std = nn.Parameter(torch.full((num_tasks, act_dim), float(torch.log(torch.tensor(init_std)))))

    @property
    def num_tasks(self) -> int:
        return self.log_std.shape[0]

    def forward(self, obs: Tensor, task: Task = None) -> tuple[Tensor, Tensor]:
        """`(mean, log_std)`, both (batch, act_dim)."""
        rows = task_rows(task, obs.shape[0], obs.device)
        mean = self.mean_net(obs, adapter=rows)
        return mean, log_std_rows(self.log_std, rows, mean)

    def deterministic_action(self, obs: Tensor, task: Task = None) -> Tensor:
        """The clipped mean: evaluation's and export's action, in [-1, 1]."""
        return self.mean_net(obs, adapter=task_rows(task, obs.shape[0], obs.device)).clamp(-1.0, 1.0)

    def merged(self, k: int) -> "GaussianPolicy":
        """A plain policy computing row index k's map (`merged_policy`)."""
        return merged_policy(self, k)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], alpha: float | None = None,
                        rank: int | None = None) -> "GaussianPolicy":  # fmt: skip
        """The policy a `state_dict()` came from (sizes, and LoRA adapters where it has them: `load_adapted`),
        loaded strictly: export rebuilds a run's policy from its checkpoint and config alone."""
        dims = layer_shapes(state, "mean_net")
        if not dims:
            raise ValueError("not a GaussianPolicy state dict (no mean_net.layers.0)")
        policy = cls(dims[0][1], dims[-1][0], [d[0] for d in dims[:-1]], num_tasks=state["log_std"].shape[0])
        return load_adapted(policy, state, rank, alpha)


class ValueFunction(nn.Module):
    """`V(obs)` per task: an `MLP` with `num_tasks` outputs, row b reading its task's column."""

    def __init__(self, obs_dim: int, hidden_dims: Sequence[int], num_tasks: int = 1) -> None:
        super().__init__()
        check_positive_int("num_tasks", num_tasks)
        self.net = MLP(obs_dim, hidden_dims, num_tasks)

    def forward(self, obs: Tensor, task: Task = None) -> Tensor:
        values = self.net(obs)
        rows = task_rows(task, obs.shape[0], obs.device)
        if isinstance(rows, Tensor):
            return values.gather(-1, rows.unsqueeze(-1)).squeeze(-1)
        return values[:, rows]
