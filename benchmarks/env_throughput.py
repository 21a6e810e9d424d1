"""How many simulator steps per second does `DMCEnv` give, against a plain dm_control loop? (DESIGN §9)

For each task and env count N (action repeat 1, so one agent step is one simulator step), with uniform random
actions and resets at episode ends:

* ``plain``: N dm_control envs stepped in a Python loop in this process (the baseline; ratio 1.00);
* ``ours``: `DMCEnv(task, N)` with its defaults (in-process for N = 1, else one worker per core), driven by
  ``step_and_maybe_reset`` like a training loop;
* ``ours-inproc``: `DMCEnv(task, N, num_workers=0)`: the TorchRL wrapper's own cost, no workers;
* ``raw-workers``: the same worker processes (`ProcessPool` of `DMCSlice`, one per core, at most N) driven with
  numpy, without TorchRL: what the process design gives before any TensorDict is built;
* ``torchrl``: TorchRL's ``ParallelEnv(N, DMControlEnv)`` (capped to a few seconds per repeat: it is slow);
* ``envpool``: EnvPool 1.2.5's C++ port (``envpool.make_dm``, one thread per core, at most N), stepped with numpy and
  its own auto-reset: the raw speed of the simulator backend;
* ``ours-envpool``: `DMCEnv(task, N, backend="envpool")` through ``step_and_maybe_reset``, the same EnvPool behind
  our TorchRL interface (its ratio to ``envpool`` is the interface's cost).

Each repeat runs about ``--seconds`` of steps; the table shows the median steps/s over ``--repeats`` and the
ratio to ``plain``. The load average is printed before, after each row and at the end: run it on a machine as
quiet as you can.

    .venv/bin/python benchmarks/env_throughput.py [--tasks cheetah-run humanoid-walk] [--num-envs 1 2 8]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from dm_control import suite

from fasttd3_lora.tasks.dmc import DMCEnv, parse_dmc_task
from fasttd3_lora.tasks.dmc_slice import DMCSlice, result_views, slice_bounds
from fasttd3_lora.tasks.vector_workers import ProcessPool


def steps_per_s(step_block: Callable[[int], None], n_envs: int, repeats: int, seconds: float) -> float:
    """Median over repeats of n_envs * steps / time, each repeat sized to last about `seconds`."""
    step_block(10)  # warm-up
    t0 = time.perf_counter()
    step_block(10)
    per_step = (time.perf_counter() - t0) / 10
    block = max(10, int(seconds / per_step))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step_block(block)
        rates.append(n_envs * block / (time.perf_counter() - t0))
    return statistics.median(rates)


def plain(task: str, n: int, repeats: int, seconds: float) -> float:
    domain, name = parse_dmc_task(task)
    envs = [suite.load(domain, name, task_kwargs={"random": i}) for i in range(n)]
    for env in envs:
        env.reset()
    spec = envs[0].action_spec()
    rng = np.random.default_rng(0)
    actions = rng.uniform(spec.minimum, spec.maximum, size=(256, n, spec.shape[0]))

    def block(k: int) -> None:
        for t in range(k):
            a = actions[t % 256]
            for i, env in enumerate(envs):
                if env.step(a[i]).last():
                    env.reset()

    return steps_per_s(block, n, repeats, seconds)


def drive(env, actions: torch.Tensor, repeats: int, seconds: float) -> float:
    """Steps a TorchRL env the way a collector does: step_and_maybe_reset with precomputed actions."""
    state = {"td": env.reset()}

    def block(k: int) -> None:
        td = state["td"]
        for t in range(k):
            td.set("action", actions[t % len(actions)])
            _, td = env.step_and_maybe_reset(td)
        state["td"] = td

    try:
        return steps_per_s(block, env.batch_size.numel(), repeats, seconds)
    finally:
        env.close()


def ours(task: str, n: int, repeats: int, seconds: float, num_workers: int | None, backend: str = "dm_control") -> float:
    env = DMCEnv(task, n, seed=0, num_workers=num_workers, backend=backend)
    actions = torch.rand(256, *env.action_spec.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return drive(env, actions, repeats, seconds)


def raw_workers(task: str, n: int, repeats: int, seconds: float) -> float:
    domain, name = parse_dmc_task(task)
    bounds = slice_bounds(n, min(n, os.cpu_count() or 1))
    factories = [functools.partial(DMCSlice, [(domain, name)] * (hi - lo), 0, lo, 1, None) for lo, hi in bounds]
    pool = ProcessPool(factories, methods=("step", "reset"), name=task)
    info = pool.infos[0]
    rng = np.random.default_rng(0)
    actions = rng.uniform(info["action_low"], info["action_high"], size=(256, n, len(info["action_low"])))
    pool.call("reset", [np.ones(hi - lo, dtype=bool) for lo, hi in bounds])

    def block(k: int) -> None:
        for t in range(k):
            replies = pool.call("step", [actions[t % 256, lo:hi] for lo, hi in bounds])
            over = [result_views(r, hi - lo, info["obs_dim"])[3].copy() for r, (lo, hi) in zip(replies, bounds)]
            if any(m.any() for m in over):
                pool.call("reset", over)

    try:
        return steps_per_s(block, n, repeats, seconds)
    finally:
        pool.close()


def envpool_raw(task: str, n: int, repeats: int, seconds: float) -> float:
    import envpool

    from fasttd3_lora.tasks.dmc_envpool import envpool_id

    env = envpool.make_dm(envpool_id(*parse_dmc_task(task)), num_envs=n, batch_size=n, seed=0,
                          num_threads=min(n, os.cpu_count() or 1))  # fmt: skip
    env.reset()
    low, high = env.action_spec().minimum, env.action_spec().maximum
    actions = np.random.default_rng(0).uniform(low, high, size=(256, n, env.action_spec().shape[0]))
    ids = np.arange(n, dtype=np.int32)

    def block(k: int) -> None:
        for t in range(k):
            env.step(actions[t % 256], ids)  # a finished episode restarts on its next step (EnvPool's auto-reset)

    try:
        return steps_per_s(block, n, repeats, seconds)
    finally:
        env.close()


def torchrl_parallel(task: str, n: int, repeats: int, seconds: float) -> float:
    from torchrl.envs import DMControlEnv, ParallelEnv

    domain, name = parse_dmc_task(task)
    env = ParallelEnv(n, functools.partial(DMControlEnv, domain, name))
    actions = torch.stack([env.action_spec.rand() for _ in range(256)])
    return drive(env, actions, repeats, seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["cheetah-run", "humanoid-walk"])
    p.add_argument("--num-envs", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="duration of one repeat (torchrl: capped at this)")
    p.add_argument("--skip-torchrl", action="store_true")
    p.add_argument("--skip-envpool", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)  # the parent only builds TensorDicts; leave the cores to the workers

    load_before = os.getloadavg()
    print(f"# {datetime.date.today()}  {platform.processor() or platform.machine()}  {os.cpu_count()} cores  "
          f"python {platform.python_version()}  torch {torch.__version__}")
    print(f"# load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
          f"median of {args.repeats} repeats of ~{args.seconds:g} s, action repeat 1")
    cols = ["plain", "ours", "ours-inproc", "raw-workers"] + ([] if args.skip_torchrl else ["torchrl"])
    cols += [] if args.skip_envpool else ["envpool", "ours-envpool"]
    print("| task | N | " + " | ".join(f"{c} steps/s" for c in cols) + " | " + " | ".join(
        f"{c} / plain" for c in cols[1:]) + " | load after row |")
    print("|---|---:|" + "---:|" * (2 * len(cols) - 1) + "---:|")
    for short in args.tasks:
        task = f"dmc/{short}"
        for n in args.num_envs:
            rates = {"plain": plain(task, n, args.repeats, args.seconds),
                     "ours": ours(task, n, args.repeats, args.seconds, None),
                     "ours-inproc": ours(task, n, args.repeats, args.seconds, 0),
                     "raw-workers": raw_workers(task, n, args.repeats, args.seconds)}
            if not args.skip_torchrl:
                rates["torchrl"] = torchrl_parallel(task, n, args.repeats, args.seconds)
            if not args.skip_envpool:
                rates["envpool"] = envpool_raw(task, n, args.repeats, args.seconds)
                rates["ours-envpool"] = ours(task, n, args.repeats, args.seconds, None, backend="envpool")
            base = rates["plain"]
            extra = f" | ours-envpool / envpool {rates['ours-envpool'] / rates['envpool']:.2f}x" if not args.skip_envpool else ""
            print(f"| {short} | {n} | " + " | ".join(f"{rates[c]:,.0f}" for c in cols) + " | "
                  + " | ".join(f"{rates[c] / base:.2f}x" for c in cols[1:]) + f" | {os.getloadavg()[0]:.1f}{extra} |",
                  flush=True)
    load_after = os.getloadavg()
    print(f"# load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")


if __name__ == "__main__":
    main()
