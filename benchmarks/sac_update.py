"""How long does one full SAC update take per critic kind, and how close is it to its matmul floor?

One `SAC.update` (actor, temperature, critic, target EMA, with the projections) at the base scale of the
recipe (configs: critic 512 x 2 blocks, actor 128 x 1, batch 256, 101 atoms; obs 67, act 21 as humanoid),
for simbav2 (dense), sparse and lora, in fp32 and bf16 autocast, eager and `torch.compile` (SACConfig.compile).
The floor is the same update's matmuls alone, run bare on preallocated tensors in the same dtype
(benchmarks/update_floor.py lists them).

Prints a table of medians, the LoRA / dense ratio per mode (target <= 1.10) and the best mode's time over
the floor (target <= 2x).

    .venv/bin/python benchmarks/sac_update.py [--reps 20] [--kinds simbav2 sparse lora] [--modes fp32-eager ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import platform
import time

import torch
from hydra import compose, initialize_config_module
from tensordict import TensorDict

from fasttd3_lora.precision import choose_precision
from fasttd3_lora.sac import SAC, SACConfig
from update_floor import layer_shapes, matmul_floor, median_ms

OBS, ACT = 67, 21
MODES = ("fp32-eager", "bf16-eager", "fp32-compile", "bf16-compile")


def recipe(kind: str, mode: str) -> SACConfig:
    """The SAC recipe from configs/ (algo=sac, scale=base) for one critic kind and mode."""
    with initialize_config_module("fasttd3_lora.configs", version_base=None):
        cfg = compose("config", overrides=[f"critic={kind}", "scale=base"])
    sac = SACConfig.from_hydra(cfg)  # the default task, cheetah-run: 1000-step episodes
    return dataclasses.replace(sac, amp_bf16=mode.startswith("bf16"), compile=mode.endswith("compile"))


def batch(n: int, g: torch.Generator) -> TensorDict:
    return TensorDict(
        observation=torch.randn(n, OBS, generator=g),
        action=torch.rand(n, ACT, generator=g) * 2 - 1,
        reward=torch.randn(n, generator=g),
        next_observation=torch.randn(n, OBS, generator=g),
        terminated=torch.zeros(n, dtype=torch.bool),
        truncated=torch.zeros(n, dtype=torch.bool),
        batch_size=[n],
    )


def time_update(kind: str, mode: str, reps: int, warmup: int) -> tuple[float, float, float]:
    """(median wall ms of one update, median process-CPU ms of one update, seconds of the first `warmup`
    updates, i.e. compilation)."""
    cfg = recipe(kind, mode)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    agent = SAC(cfg, OBS, ACT, cfg.num_envs, 1_000_000, "cpu", g)
    agent.record(torch.randn(64, OBS, generator=g), torch.randn(cfg.num_envs, generator=g),
                 torch.zeros(cfg.num_envs, dtype=torch.bool))  # fmt: skip
    batches = iter(itertools.cycle([batch(cfg.batch_size, g) for _ in range(4)]))
    t0 = time.perf_counter()
    for _ in range(warmup):
        agent.update(next(batches))
    first = time.perf_counter() - t0
    return (*median_ms(lambda: agent.update(next(batches)), reps), first)


def time_floor(cfg: SACConfig, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    """Median (wall, process-CPU) ms of the update's matmuls alone (update_floor.py)."""
    critic, actor = layer_shapes(OBS, ACT, cfg.critic_hidden_dim, cfg.critic_num_blocks, cfg.num_atoms,
                                 cfg.actor_hidden_dim, cfg.actor_num_blocks, actor_heads=2)  # fmt: skip
    return matmul_floor(critic, actor, cfg.batch_size, cfg.num_critics, dtype, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kinds", nargs="+", default=["simbav2", "sparse", "lora"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    for mode in args.modes:
        for kind in args.kinds:
            results[kind, mode] = time_update(kind, mode, args.reps, args.warmup)
            wall, cpu, first = results[kind, mode]
            print(f"  {kind:8s} {mode:13s} {wall:8.1f} ms wall {cpu:8.1f} ms cpu  (first {args.warmup}: {first:.1f} s)",
                  flush=True)  # fmt: skip
    cfg = recipe("simbav2", "fp32-eager")
    floors = {dt: time_floor(cfg, dtype, args.reps) for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    for col, what in ((0, "wall"), (1, "process CPU")):
        table(args, {k: v[col] for k, v in results.items()}, {k: v[col] for k, v in floors.items()}, what, cfg)
    print("\n| kind | mode | first updates (compile) s |")
    print("|---|---|---|")
    for (kind, mode), (_, _, first) in results.items():
        print(f"| {kind} | {mode} | {first:.1f} |")


def table(args: argparse.Namespace, results: dict[tuple[str, str], float], floors: dict[str, float], what: str,
          cfg: SACConfig) -> None:  # fmt: skip
    """Markdown tables of medians (ms), LoRA / dense ratio per mode, best mode over the matmul floor."""
    print(f"\n# SAC update, batch {cfg.batch_size}, obs {OBS}, act {ACT}, {cfg.num_atoms} atoms, critic "
          f"{cfg.critic_hidden_dim}x{cfg.critic_num_blocks} (x{cfg.num_critics}), actor {cfg.actor_hidden_dim}x"
          f"{cfg.actor_num_blocks}; torch {torch.__version__}, {platform.machine()} "
          f"{torch.backends.cpu.get_cpu_capability()} (precision=auto picks {choose_precision('auto', 'cpu')[0]}), {torch.get_num_threads()} threads, "
          f"{datetime.date.today()}; median {what} time")  # fmt: skip
    print("| mode | " + " | ".join(f"{k} (ms)" for k in args.kinds) + " | lora / simbav2 | matmul floor (ms) |")
    print("|---" * (len(args.kinds) + 3) + "|")
    for mode in args.modes:
        cells = [f"{results[k, mode]:.1f}" for k in args.kinds]
        ratio = (f"{results['lora', mode] / results['simbav2', mode]:.2f}"
                 if {"lora", "simbav2"} <= set(args.kinds) else "-")  # fmt: skip
        print(f"| {mode} | " + " | ".join(cells) + f" | {ratio} | {floors[mode[:4]]:.1f} |")
    print("\n| kind | best mode | ms | best / fp32 floor | best / bf16 floor |")
    print("|---|---|---|---|---|")
    for k in args.kinds:
        mode = min(args.modes, key=lambda m: results[k, m])
        ms = results[k, mode]
        print(f"| {k} | {mode} | {ms:.1f} | {ms / floors['fp32']:.2f} | {ms / floors['bf16']:.2f} |")


if __name__ == "__main__":
    main()
