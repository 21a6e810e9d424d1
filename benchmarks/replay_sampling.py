"""Is our preallocated TensorDict ring faster than TorchRL's replay buffers for SAC? (DESIGN §9)

One iteration = add N env transitions + sample a batch of 256 (obs 67, act 21, 1M capacity, 100k filled
first), for: ours (`fasttd3_lora.replay.ReplayBuffer`), `TensorDictReplayBuffer(LazyTensorStorage)` and
`TensorDictReplayBuffer(LazyMemmapStorage)`. Prints medians over blocks of iterations and the ratio to ours.

    .venv/bin/python benchmarks/replay_sampling.py [--capacity 1000000] [--blocks 30] [--iters 100] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from tensordict import TensorDict
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer

from fasttd3_lora.replay import ReplayBuffer

OBS, ACT, BATCH = 67, 21, 256


def make_transitions(n: int) -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(n, OBS),
            "action": torch.rand(n, ACT) * 2 - 1,
            "reward": torch.randn(n),
            "next_observation": torch.randn(n, OBS),
            "terminated": torch.zeros(n, dtype=torch.bool),
            "truncated": torch.zeros(n, dtype=torch.bool),
        },
        batch_size=[n],
    )


def median_us(step: Callable[[], object], blocks: int, iters: int) -> float:
    for _ in range(max(10, iters // 5)):
        step()
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity", type=int, default=1_000_000)
    p.add_argument("--prefill", type=int, default=100_000)
    p.add_argument("--blocks", type=int, default=30)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--num-envs", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prefill = make_transitions(args.prefill)
    g = torch.Generator().manual_seed(0)

    def ours() -> tuple[Callable[[TensorDict], None], Callable[[], TensorDict]]:
        rb = ReplayBuffer(args.capacity, OBS, ACT)
        rb.add(prefill)
        return rb.add, lambda: rb.sample(BATCH, g)

    def torchrl(storage) -> tuple[Callable[[TensorDict], None], Callable[[], TensorDict]]:
        rb = TensorDictReplayBuffer(storage=storage, batch_size=BATCH)
        rb.extend(prefill)
        return rb.extend, rb.sample

    with tempfile.TemporaryDirectory() as scratch:
        impls = {
            "ours (TensorDict ring)": ours,
            "TorchRL LazyTensorStorage": lambda: torchrl(LazyTensorStorage(args.capacity)),
            "TorchRL LazyMemmapStorage": lambda: torchrl(LazyMemmapStorage(args.capacity, scratch_dir=scratch)),
        }
        rows = []
        for name, build in impls.items():
            add, sample = build()
            res = {"sample": median_us(sample, args.blocks, args.iters)}
            for n in args.num_envs:
                chunk = make_transitions(n)
                res[f"add{n}"] = median_us(lambda: add(chunk), args.blocks, args.iters)
                res[f"add{n}+sample"] = median_us(lambda: (add(chunk), sample()), args.blocks, args.iters)
            rows.append((name, res))
            del add, sample

    cols = list(rows[0][1])
    base = rows[0][1]
    print(f"# replay add+sample, batch {BATCH}, obs {OBS}, act {ACT}, capacity {args.capacity:,}, "
          f"prefill {args.prefill:,}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print("| buffer | " + " | ".join(f"{c} (us)" for c in cols) + " | " + " | ".join(f"{c} / ours" for c in cols if "sample" in c) + " |")
    print("|---" * (1 + len(cols) + sum("sample" in c for c in cols)) + "|")
    for name, res in rows:
        ratios = [f"{res[c] / base[c]:.2f}" for c in cols if "sample" in c]
        print(f"| {name} | " + " | ".join(f"{res[c]:.1f}" for c in cols) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
