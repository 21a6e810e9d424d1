"""How long does one FastTD3 update (critic + actor) take per critic kind, precision and compile mode, and how
close is it to the bare matmuls of the same shapes?

One `FastTD3.update(batch, update_actor=True)` (target actions from the online actor, twin target critic,
critic step, projection, target EMA, actor step, projection) with the recipe of configs/ (algo=fasttd3, task
Isaac-Velocity-Rough-G1-v0: obs 310, act 37, batch 8192, 251 atoms, actor 256 x 1) at two critic scales:
`large` (1024 x 4 blocks, the paper's) and `base` (512 x 2), for the dense (simbav2), sparse and lora critics, in
fp32 eager, bf16-autocast eager and bf16 compiled (`compile_mode=default`, Inductor).

The floor is the update's matmuls alone, on preallocated tensors of the same dtype (benchmarks/update_floor.py
lists them).

Prints markdown tables of medians (wall and process CPU), the LoRA / dense ratio per mode (target <= 1.05 at batch
8192) and bf16 / fp32 per kind. CPU only here; GPU numbers are "not measured".

    .venv/bin/python benchmarks/fasttd3_update.py [--scales large base] [--kinds simbav2 sparse lora]
        [--modes fp32 bf16 bf16-compile] [--reps 3] [--interleave] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import platform
import statistics
import time

import torch
from hydra import compose, initialize_config_module
from tensordict import TensorDict

from fasttd3_lora.fasttd3 import FastTD3, FastTD3Config
from fasttd3_lora.precision import choose_precision
from update_floor import layer_shapes, matmul_floor

TASK, OBS, ACT = "Isaac-Velocity-Rough-G1-v0", 310, 37
MODES = ("fp32", "bf16", "bf16-compile")


def recipe(kind: str, scale: str, mode: str = "fp32") -> FastTD3Config:
    """The FastTD3 recipe from configs/ for one critic kind, scale and mode."""
    with initialize_config_module("fasttd3_lora.configs", version_base=None):
        cfg = compose("config", overrides=["algo=fasttd3", f"task={TASK}", f"critic={kind}", f"scale={scale}"])
    cfg = FastTD3Config.from_hydra(cfg)
    return dataclasses.replace(
        cfg, amp_bf16=mode.startswith("bf16"), compile_mode="default" if mode.endswith("compile") else None
    )


def batch(n: int, g: torch.Generator) -> TensorDict:
    """A sampled n-step batch as `NStepReplayBuffer.sample` returns it."""
    return TensorDict(
        observation=torch.randn(n, OBS, generator=g),
        action=torch.rand(n, ACT, generator=g) * 2 - 1,
        reward=torch.randn(n, generator=g),
        next_observation=torch.randn(n, OBS, generator=g),
        discount=torch.full((n,), 0.99**8),
        batch_size=[n],
    )


def time_updates(cfgs: list[FastTD3Config], reps: int, warmup: int) -> list[tuple[float, float, float]]:
    """Per config: (median wall ms, median process-CPU ms of one update, seconds of the first `warmup` updates).
    With several configs their timed updates alternate (rep 1 of each, rep 2 of each, ...), so load that drifts
    over the run hits them alike."""
    # Dynamo compiles `Optimizer.step` once per optimiser object and stops compiling that frame after
    # `recompile_limit` (8) entries, i.e. after 4 agents in one process; start each group from a clean cache.
    torch._dynamo.reset()
    agents, batches, firsts = [], [], []
    for cfg in cfgs:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        agent = FastTD3(cfg, OBS, ACT, None, cfg.num_envs, 1_000_000, "cpu", g)
        agent.record(torch.randn(1024, OBS, generator=g))
        batches.append([batch(cfg.batch_size, g) for _ in range(2)])
        t0 = time.perf_counter()
        for i in range(warmup):
            agent.update(batches[-1][i % 2], update_actor=True)
        firsts.append(time.perf_counter() - t0)
        agents.append(agent)
    wall: list[list[float]] = [[] for _ in cfgs]
    cpu: list[list[float]] = [[] for _ in cfgs]
    for i in range(reps):
        for j, agent in enumerate(agents):
            t0, c0 = time.perf_counter(), time.process_time()
            agent.update(batches[j][i % 2], update_actor=True)
            wall[j].append(time.perf_counter() - t0)
            cpu[j].append(time.process_time() - c0)
    del agents, batches
    gc.collect()
    return [(statistics.median(w) * 1e3, statistics.median(c) * 1e3, f) for w, c, f in zip(wall, cpu, firsts)]


def time_floor(cfg: FastTD3Config, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    """Median (wall, process-CPU) ms of the update's matmuls alone (update_floor.py)."""
    critic, actor = layer_shapes(OBS, ACT, cfg.critic_hidden_dim, cfg.critic_num_blocks, cfg.num_atoms,
                                 cfg.actor_hidden_dim, cfg.actor_num_blocks, actor_heads=1)  # fmt: skip
    return matmul_floor(critic, actor, cfg.batch_size, cfg.num_critics, dtype, reps)


def table(scale: str, kinds: list[str], modes: list[str], results: dict, floors: dict, col: int, what: str,
          cfg: FastTD3Config, reps: int) -> None:  # fmt: skip
    print(f"\n# FastTD3 update (critic + actor), scale {scale}: critic {cfg.critic_hidden_dim}x{cfg.critic_num_blocks}"
          f" (x{cfg.num_critics}), actor {cfg.actor_hidden_dim}x{cfg.actor_num_blocks}, batch {cfg.batch_size}, obs "
          f"{OBS}, act {ACT}, {cfg.num_atoms} atoms; torch {torch.__version__}, {platform.machine()} "
          f"{torch.backends.cpu.get_cpu_capability()} (precision=auto picks {choose_precision('auto', 'cpu')[0]}), {torch.get_num_threads()} threads, {datetime.date.today()}; "
          f"median {what} time of {reps} updates")  # fmt: skip
    print("| mode | " + " | ".join(f"{k} (ms)" for k in kinds) + " | lora / simbav2 | matmul floor (ms) | best / floor |")
    print("|---" * (len(kinds) + 4) + "|")
    for mode in modes:
        cells = [results[scale, k, mode][col] for k in kinds]
        ratio = (f"{results[scale, 'lora', mode][col] / results[scale, 'simbav2', mode][col]:.3f}"
                 if {"lora", "simbav2"} <= set(kinds) else "-")  # fmt: skip
        floor = floors[scale, mode[:4]][col]
        print(f"| {mode} | " + " | ".join(f"{c:.0f}" for c in cells) + f" | {ratio} | {floor:.0f} | "
              f"{min(cells) / floor:.2f} |")  # fmt: skip
    if "fp32" in modes:
        print("\n| kind | " + " | ".join(f"{m} / fp32" for m in modes if m != "fp32") + " |")
        print("|---" * len(modes) + "|")
        for k in kinds:
            base = results[scale, k, "fp32"][col]
            print(f"| {k} | " + " | ".join(f"{results[scale, k, m][col] / base:.2f}" for m in modes if m != "fp32") + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", nargs="+", default=["large", "base"], choices=["large", "base"])
    p.add_argument("--kinds", nargs="+", default=["simbav2", "sparse", "lora"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--reps", type=int, default=3, help="timed updates per cell (paper scale: ~1 min each in fp32)")
    p.add_argument("--interleave", action="store_true",
                   help="build every kind of a scale and mode together and alternate their timed updates")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    results, floors = {}, {}
    for scale in args.scales:
        cfg = recipe("simbav2", scale)
        # only the floors of the requested modes: on a CPU without native bf16 the bf16 floor alone takes many
        # minutes (every product emulated)
        wanted = {mode.split("-")[0] for mode in args.modes}
        for prec, dtype in (p for p in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if p[0] in wanted):
            floors[scale, prec] = time_floor(cfg, dtype, args.reps)
            print(f"  {scale} floor {prec}: {floors[scale, prec][0]:.0f} ms wall {floors[scale, prec][1]:.0f} ms cpu",
                  flush=True)  # fmt: skip
        for mode in args.modes:
            # one untimed update first (in the compiled mode it compiles both steps)
            groups = [args.kinds] if args.interleave else [[kind] for kind in args.kinds]
            for kinds in groups:
                timed = time_updates([recipe(kind, scale, mode) for kind in kinds], args.reps, warmup=1)
                for kind, (wall, cpu, first) in zip(kinds, timed):
                    results[scale, kind, mode] = wall, cpu, first
                    print(f"  {scale} {kind:8s} {mode:13s} {wall:9.0f} ms wall {cpu:9.0f} ms cpu "
                          f"(first: {first:.1f} s)", flush=True)  # fmt: skip
    for scale in args.scales:
        cfg = recipe("simbav2", scale)
        for col, what in ((0, "wall"), (1, "process CPU")):
            table(scale, args.kinds, args.modes, results, floors, col, what, cfg, args.reps)
    print("\n| scale | kind | mode | first updates (incl. compile) s |")
    print("|---|---|---|---|")
    for (scale, kind, mode), (_, _, first) in results.items():
        print(f"| {scale} | {kind} | {mode} | {first:.1f} |")


if __name__ == "__main__":
    main()
