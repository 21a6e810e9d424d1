"""Shared by the update benchmarks (sac_update.py, fasttd3_update.py, nstep_sampling.py): median timing of a
callable, and the bare-matmul floor of one actor-critic update.

The floor is the update's matmuls alone, on preallocated tensors of the benchmark's dtype: actor forward x2
(actor step, next actions) with one input- and one weight-gradient backward, critic forward x3 (target, critic
step, actor step), critic input-gradient backward x2 and weight-gradient backward x1, all with dense shapes. SAC
and FastTD3 differ only in the layer shapes (SAC's actor has mean and log-std heads), not in this list.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fasttd3_lora.simbav2 import EXPANSION

Shapes = list[tuple[int, int]]


def median_ms(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median wall ms, median process-CPU ms) of `reps` calls. With one torch thread the CPU time is the steadier
    number on a shared machine."""
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def layer_shapes(obs: int, act: int, critic_hidden: int, critic_blocks: int, num_atoms: int, actor_hidden: int,
                 actor_blocks: int, actor_heads: int) -> tuple[Shapes, Shapes]:  # fmt: skip
    """(in, out) of every matrix of one critic member and of the actor, as DESIGN §1 builds them (embedder with the
    shift input, blocks of EXPANSION-wide MLPs, a two-layer head per output)."""
    d, a = critic_hidden, actor_hidden
    critic = [(obs + act + 1, d)] + [(d, EXPANSION * d), (EXPANSION * d, d)] * critic_blocks + [(d, d), (d, num_atoms)]
    actor = [(obs + 1, a)] + [(a, EXPANSION * a), (EXPANSION * a, a)] * actor_blocks + [(a, a), (a, act)] * actor_heads
    return critic, actor


def matmul_floor(critic_shapes: Shapes, actor_shapes: Shapes, batch: int, critics: int, dtype: torch.dtype,
                 reps: int) -> tuple[float, float]:  # fmt: skip
    """Median (wall, process-CPU) ms of one update's matmuls (module docstring), `critics` critic members batched."""

    def tensors(shapes: Shapes, members: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [
            (torch.randn(members, o, i, dtype=dtype), torch.randn(members, batch, i, dtype=dtype),
             torch.randn(members, batch, o, dtype=dtype))
            for i, o in shapes
        ]  # fmt: skip

    critic, actor = tensors(critic_shapes, critics), tensors(actor_shapes, 1)

    def forward(layers) -> None:
        for w, x, _ in layers:
            torch.bmm(x, w.mT)

    def grad_input(layers) -> None:
        for w, _, gy in layers:
            torch.bmm(gy, w)

    def grad_weight(layers) -> None:
        for _, x, gy in layers:
            torch.bmm(gy.mT, x)

    def step() -> None:
        forward(actor), forward(critic), forward(critic), grad_input(critic), grad_weight(critic)  # critic step
        forward(actor), forward(critic), grad_input(critic), grad_input(actor), grad_weight(actor)  # actor step

    step()  # warm-up: first-touch allocation and the kernels' one-time setup
    return median_ms(step, reps)
