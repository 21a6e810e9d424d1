"""Inference of a whole policy library on a mixed batch (docs/library.md): one forward in which every row uses its
task's adapter (`LoRALinear`'s masked dense form, docs/library.md) against a loop over tasks (each task's rows through its
adapter, or through its merged dense copy), and the agreement of the three.

    python benchmarks/library_inference.py [--rows 4096 --tasks 16 --rank 4 --threads 1 --reps 50]

Prints one table: median milliseconds per batch over `--reps` timed calls (after warm-up), the ratio to the mixed
forward, and the largest difference from the loop of merged copies. Adapters are random (B ~ N(0, 0.01)); the cost
does not depend on their values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fasttd3_lora.library_store import attach_adapters
from fasttd3_lora.mlp_policy import GaussianPolicy


def _median_ms(fn, reps: int) -> float:  # noqa: ANN001
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--obs", type=int, default=24)
    parser.add_argument("--act", type=int, default=6)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256, 128])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = GaussianPolicy(args.obs, args.act, args.hidden, num_tasks=args.tasks)
    attach_adapters(policy, args.rank, args.tasks)
    for layer in policy.mean_net.layers:
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    merged = [policy.merged(k) for k in range(args.tasks)]
    obs = torch.randn(args.rows, args.obs)
    task = torch.randint(0, args.tasks, (args.rows,))
    rows_of = [torch.nonzero(task == k).squeeze(-1) for k in range(args.tasks)]

    def mixed() -> torch.Tensor:
        return policy.deterministic_action(obs, task)

    def loop_adapters() -> torch.Tensor:
        out = torch.empty(args.rows, args.act)
        for k, rows in enumerate(rows_of):
            out[rows] = policy.deterministic_action(obs[rows], k)
        return out

    def loop_merged() -> torch.Tensor:
        out = torch.empty(args.rows, args.act)
        for k, rows in enumerate(rows_of):
            out[rows] = merged[k].deterministic_action(obs[rows])
        return out

    with torch.no_grad():
        reference = loop_merged()
        results = [(name, fn, _median_ms(fn, args.reps), (fn() - reference).abs().max().item())
                   for name, fn in (("one mixed-batch forward", mixed), ("loop over tasks, adapters", loop_adapters),
                                    ("loop over tasks, merged copies", loop_merged))]  # fmt: skip
    base_ms = results[0][2]
    print(f"{args.rows} rows over {args.tasks} tasks, rank {args.rank}, policy {args.obs} -> {args.hidden} -> "
          f"{args.act}, {args.threads} thread(s), median of {args.reps}\n")  # fmt: skip
    print("| forward | ms per batch | vs mixed | max abs diff vs merged loop |")
    print("|---|---:|---:|---:|")
    for name, _, ms, diff in results:
        print(f"| {name} | {ms:.2f} | {ms / base_ms:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
