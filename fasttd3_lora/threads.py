"""How many torch CPU threads a training run uses (the `threads` config key; docs/training.md).

torch's default, one OpenMP thread per core, is a trap on a shared machine: a parallel region waits for its
slowest thread, and a thread whose core another process holds keeps the others spinning. On the 2-core
development VM, with a training run on the other core, one SAC update took 4.6 s with two threads and 0.22 s
with one. `auto` therefore counts only the cores that other processes leave free.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

__all__ = ["AUTO", "auto_threads", "choose_threads", "apply_threads"]

AUTO = "auto"


def auto_threads(usable_cores: int, load: float) -> int:
    """The usable cores that the system's load (runnable processes, the 1-minute average) leaves idle, at
    least one."""
    busy = int(load + 0.5)  # a core counts as taken once it is busy more than half the time
    return max(1, usable_cores - busy)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset and container cpusets
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(setting: int | str, environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """The thread count for `setting` (a count, or `auto`) and a few words on why, for the run's first line.

    With `auto`, a user's OMP_NUM_THREADS wins (torch already follows it; torchrun sets it to 1 for several
    ranks per machine); otherwise `auto_threads` of this process's cores and the load average."""
    if setting != AUTO:
        return int(setting), f"threads={setting}"
    if environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    cores, load = _usable_cores(), os.getloadavg()[0]
    return auto_threads(cores, load), f"auto: {cores} cores, load {load:.1f}"


def apply_threads(setting: int | str) -> tuple[int, str]:
    """Set torch's intra-op thread count from `setting`; returns what `choose_threads` chose."""
    threads, why = choose_threads(setting)
    torch.set_num_threads(threads)
    return threads, why
