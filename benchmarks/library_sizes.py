"""How much a policy library stores (docs/library.md): per-task adapter bytes against a full fine-tuned copy of the
policy at several ranks, and a whole library of N tasks against N full copies.

    python benchmarks/library_sizes.py [--obs 24 --act 6 --hidden 512 256 128 --ranks 1 4 16 --tasks 10]

Sizes depend on shapes only, so the adapters here are random (not trained): a real library of these shapes holds
files of exactly these sizes. Bytes on disk are the files the library writes (torch's zip container included),
tensor bytes the numbers alone. The defaults are the walker family's policy (24 observations, 6 actions) at
rsl_rl's widths.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from fasttd3_lora.library_store import Library, adapter_tensors, attach_adapters, create_library
from fasttd3_lora.mlp_policy import GaussianPolicy, ValueFunction
from fasttd3_lora.normalization import RunningMeanStd


def _base_state(obs: int, act: int, hidden: list[int]) -> dict:
    policy, value = GaussianPolicy(obs, act, hidden), ValueFunction(obs, hidden)
    config = {"algo": {"name": "ppo", "action_repeat": 2, "actor_hidden_dims": hidden, "critic_hidden_dims": hidden,
                       "init_std": 1.0}, "task": {"name": "bench", "family": "dmc", "max_episode_steps": 1000}}  # fmt: skip
    return {"meta": {"config": config, "counters": {}},
            "agent": {"actor": policy.state_dict(), "value": value.state_dict(), "obs_rms": RunningMeanStd(obs).state_dict()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--obs", type=int, default=24)
    parser.add_argument("--act", type=int, default=6)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256, 128])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tasks", type=int, default=10, help="tasks of the whole-library row")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for rank in args.ranks:
            library = create_library(Path(tmp) / f"r{rank}", _base_state(args.obs, args.act, args.hidden), "benchmark")
            policy = GaussianPolicy(args.obs, args.act, args.hidden, num_tasks=args.tasks)
            attach_adapters(policy, rank, args.tasks)
            for layer in policy.mean_net.layers:  # non-zero B, as after training
                torch.nn.init.normal_(layer.lora_B, std=0.01)
            for k in range(args.tasks):
                library.add_adapter(f"task{k}", adapter_tensors(policy, k), {"rank": rank})
            library = Library(library.path)
            entry, base = library.entries["task0"], library.base
            total = base["bytes_on_disk"] + sum(e["bytes_on_disk"] for e in library.entries.values())
            rows.append((rank, entry["trainable"], base["policy_numel"], entry["tensor_bytes"], entry["bytes_on_disk"],
                         base["policy_tensor_bytes"], base["bytes_on_disk"], total, args.tasks * base["bytes_on_disk"]))  # fmt: skip
    print(f"policy {args.obs} -> {args.hidden} -> {args.act} (float32), {args.tasks} tasks in the library row\n")
    print("| rank | adapter numbers | full copy numbers | adapter B (tensors / on disk) | full copy B (tensors / on disk) "
          "| x smaller on disk | library of {n} | {n} full copies | library / copies |".format(n=args.tasks))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rank, numel, full_numel, tb, disk, full_tb, full_disk, total, copies in rows:
        print(f"| {rank} | {numel:,} | {full_numel:,} | {tb:,} / {disk:,} | {full_tb:,} / {full_disk:,} | "
              f"{full_disk / disk:.1f}x | {total:,} B | {copies:,} B | {100 * total / copies:.1f}% |")


if __name__ == "__main__":
    main()
