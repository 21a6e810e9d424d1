"""How long does n-step replay sampling take at FastTD3's sizes, next to one update?

`NStepReplayBuffer.sample(8192)` over 4096 envs (obs 310, act 37: Isaac-Velocity-Rough-G1) with n = 8 (the
locomotion recipe) and n = 1, every ring full, random terminations and time-outs (1 in 200 steps each, so windows
get cut), against the process-CPU time of one FastTD3 update (critic + actor, paper-scale LoRA critic 1024 x 4, bf16
autocast, eager; measured with benchmarks/fasttd3_update.py's `time_updates`, or given with --update-ms).

The capacity per env defaults to 128 steps (1.3 GiB per buffer here; the recipe's 10,240 would need 103 GiB):
every sample is a random gather from a buffer far larger than the CPU caches either way, so the time per sample
should not depend on the capacity; --capacity changes it.

    .venv/bin/python benchmarks/nstep_sampling.py [--capacity 128] [--reps 30] [--update-ms MS] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform

import torch
from tensordict import TensorDict

from fasttd3_lora.replay import NStepReplayBuffer
from update_floor import median_ms

ENVS, OBS, ACT, BATCH = 4096, 310, 37, 8192


def filled_buffer(capacity: int, n_step: int, g: torch.Generator) -> NStepReplayBuffer:
    rb = NStepReplayBuffer(ENVS, capacity, OBS, ACT, n_step=n_step, gamma=0.99)
    obs = torch.randn(ENVS, OBS, generator=g)
    for _ in range(capacity):
        nxt = torch.randn(ENVS, OBS, generator=g)
        rb.add(TensorDict(
            observation=obs, action=torch.rand(ENVS, ACT, generator=g) * 2 - 1, reward=torch.randn(ENVS, generator=g),
            next_observation=nxt, terminated=torch.rand(ENVS, generator=g) < 1 / 200,
            truncated=torch.rand(ENVS, generator=g) < 1 / 200, batch_size=[ENVS],
        ))  # fmt: skip
        obs = nxt
    return rb


def time_sampling(rb: NStepReplayBuffer, reps: int, g: torch.Generator) -> tuple[float, float]:
    """Median (wall, process-CPU) ms of one `sample(BATCH)`."""
    for _ in range(3):
        rb.sample(BATCH, g)
    return median_ms(lambda: rb.sample(BATCH, g), reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity", type=int, default=128, help="steps per env ring")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--update-ms", type=float, default=None,
                   help="skip measuring the update: process-CPU ms of one update (e.g. from fasttd3_update.py)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    rows = []
    for n in (8, 1):
        rb = filled_buffer(args.capacity, n, g)
        wall, cpu = time_sampling(rb, args.reps, g)
        rows.append((n, rb.nbytes / 2**30, wall, cpu))
        print(f"  n={n}: {wall:.1f} ms wall, {cpu:.1f} ms cpu", flush=True)
        del rb
        gc.collect()
    recipe_gib = NStepReplayBuffer(1, 1, OBS, ACT).bytes_per_transition * ENVS * 10_240 / 2**30

    if args.update_ms is None:
        from fasttd3_update import recipe, time_updates  # the same directory: run as a script

        update_ms = time_updates([recipe("lora", "large", "bf16")], reps=2, warmup=1)[0][1]
        how = "measured here (LoRA 1024x4, bf16 eager, median of 2)"
    else:
        update_ms, how = args.update_ms, "given with --update-ms"
    print(f"\n# n-step sampling, {ENVS} envs x {args.capacity} steps, batch {BATCH}, obs {OBS}, act {ACT}; torch "
          f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, {datetime.date.today()}; "
          f"median of {args.reps} samples; one update {update_ms:.0f} ms CPU ({how}); the recipe's 10,240 steps per env "
          f"would take {recipe_gib:.0f} GiB")  # fmt: skip
    print("| n | buffer (GiB) | sample wall (ms) | sample CPU (ms) | sample CPU / update CPU |")
    print("|---|---|---|---|---|")
    for n, gib, wall, cpu in rows:
        print(f"| {n} | {gib:.2f} | {wall:.1f} | {cpu:.1f} | {cpu / update_ms:.4f} |")


if __name__ == "__main__":
    main()
