"""Data-parallel FastTD3 over several processes (`torchrun --nproc_per_node=N -m fasttd3_lora.train ...`;
docs/fasttd3.md, "Multi-GPU").

Every rank runs the whole loop on its own envs and its own replay buffer. The replicas stay identical because
(1) rank 0's initial parameters are broadcast, (2) every gradient is averaged over the ranks before each
optimiser step (FastTD3's `grad_sync` seam), and (3) everything after the gradient is deterministic given
identical parameters and gradients: AdamW, the hyperspherical projection, the target EMA, and the observation
normaliser, which folds in the observations of all ranks (`gather_rows`). Ranks differ only in their env seeds
(`rank_seed`) and in the random draws of their own generator (exploration noise, sampling, target-policy noise).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["RANK_SEED_OFFSET", "Distributed", "rank_seed", "init_from_env"]

RANK_SEED_OFFSET = 10_007  # rank r's envs and generator use seed + r * offset (a prime, far from small seeds)
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s envs and generator (rank 0 keeps `seed`, so one process reproduces a plain run)."""
    return (seed + rank * RANK_SEED_OFFSET) % 2**32  # stays in numpy's (and every env's) seed range


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in an initialised process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def lead(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    def broadcast_(self, modules: Sequence[nn.Module]) -> None:
        """Copy rank 0's parameters and buffers into every rank's `modules` (in place)."""
        with torch.no_grad():
            for module in modules:
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=0)

    def average_grads(self, params: Sequence[nn.Parameter]) -> None:
        """All-reduce the gradients of `params` to their mean over ranks; one flat collective per call."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def average(self, values: Tensor) -> Tensor:
        """The mean of `values` over ranks (a new tensor)."""
        out = values.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.div_(self.world_size)

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's `rows` (same shape on all ranks) concatenated in rank order along dim 0."""
        parts = [torch.empty_like(rows) for _ in range(self.world_size)]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str) -> Distributed | None:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL when `device` is CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU. None when this process
    was not started by torchrun (or WORLD_SIZE is 1): a plain single-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: start with torchrun")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(local)
        backend, rank_device = "nccl", torch.device("cuda", local)
    elif kind == "cpu":
        backend, rank_device = "gloo", torch.device("cpu")
    else:
        raise ValueError(f"device={device!r}: multi-process training allows cpu (gloo) or cuda (nccl)")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return Distributed(rank, world, local, rank_device)
