"""What the KL penalty costs in GRPO's update phase (docs/drift.md): the same rollout, rank-r LoRA or full
fine-tuning, with `kl_coef` 0 (KL-free: the reference is never evaluated) and > 0 (one more forward of the frozen
reference per minibatch).

    python benchmarks/grpo_update.py [--rows 16000 --epochs 4 --minibatches 8 --ranks 4 full --threads 1 --reps 5]

The policy is the walker library's PPO actor (24 observations -> 512, 256, 128 -> 6 actions) and the rollout is
synthetic (the cost does not depend on its values); the defaults are one iteration of the drift experiment (64 envs
x 250 steps, 4 epochs x 8 minibatches). Prints one table: median seconds per update phase over `--reps` (after one
warm-up), and the ratio of the penalised to the KL-free phase at each rank.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fasttd3_lora.grpo import GRPO, GaussianView, GRPOConfig
from fasttd3_lora.mlp_policy import GaussianPolicy
from fasttd3_lora.normalization import RunningMeanStd

OBS, ACT, HIDDEN = 24, 6, [512, 256, 128]


def _agent(rank: int | None, kl_coef: float, epochs: int, minibatches: int) -> GRPO:
    cfg = GRPOConfig(num_envs=64, action_repeat=1, amp_bf16=False, from_run="-", rank=rank, alpha=None,
                     kl_coef=kl_coef, group_size=8, num_epochs=epochs, num_minibatches=minibatches, clip=0.2,
                     lr=1e-4, max_grad_norm=1.0, init_std=0.2, drift_states=2048)  # fmt: skip
    torch.manual_seed(0)
    view = GaussianView(GaussianPolicy(OBS, ACT, HIDDEN), init_std=0.2)
    return GRPO(cfg, view, RunningMeanStd(OBS), torch.device("cpu"), torch.Generator().manual_seed(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=8)
    parser.add_argument("--ranks", nargs="+", default=["4", "full"])
    parser.add_argument("--kl-coef", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    obs = torch.randn(args.rows, OBS, generator=gen)
    print(f"GRPO update phase: {args.rows} rows, {args.epochs} epochs x {args.minibatches} minibatches, policy {OBS} -> "
          f"{HIDDEN} -> {ACT}, {args.threads} thread(s), fp32, median of {args.reps}\n")  # fmt: skip
    print(f"| what trains | KL-free (s) | kl_coef {args.kl_coef:g} (s) | penalised / KL-free |")
    print("|---|---:|---:|---:|")
    for rank_text in args.ranks:
        rank = None if rank_text == "full" else int(rank_text)
        medians = []
        for coef in (0.0, args.kl_coef):
            agent = _agent(rank, coef, args.epochs, args.minibatches)
            batch = agent.explore(obs)
            batch["advantage"] = torch.randn(args.rows, generator=gen)
            agent.update(batch.clone())  # warm-up
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                agent.update(batch.clone())
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
        label = "full fine-tuning" if rank is None else f"rank {rank}"
        print(f"| {label} | {medians[0]:.3f} | {medians[1]:.3f} | {medians[1] / medians[0]:.2f}x |")


if __name__ == "__main__":
    main()
