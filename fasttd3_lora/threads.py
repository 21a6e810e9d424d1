"""How many torch CPU threads a training run uses (the `threads` config key; docs/training.md).

torch's default, one OpenMP thread per core, is a trap on a shared machine: a parallel region waits for its
slowest thread, and a thread whose core another process holds keeps the others spinning. On the 2-core
development VM, with a training run on the other core, one SAC update took 4.6 s with two threads and 0.22 s
with one. `auto` therefore counts only the cores that other processes leave free.

Busy cores are measured, not read from the load average: the load average lags by a minute (a test suite that
just ended still counts) and counts threads in uninterruptible sleep (a kernel thread kept the development
VM's at ~1.0 while it sat idle). It stays the fallback where /proc/stat does not exist.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Set

import torch

__all__ = ["AUTO", "auto_threads", "busy_cores", "choose_threads", "apply_threads"]

AUTO = "auto"
SAMPLE_SECONDS = 0.5  # long enough to see a CPU-bound process, short next to any run


def auto_threads(usable_cores: int, busy: float) -> int:
    """The usable cores that `busy` (cores' worth of other work) leaves idle, at least one."""
    taken = int(busy + 0.5)  # a core counts as taken once it is busy more than half the time
    return max(1, usable_cores - taken)


def _cpu_times(stat: str, cpus: Set[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each of `cpus` from the text of /proc/stat."""
    times = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            # user nice system idle iowait irq softirq steal (guest time is already in user)
            ticks = [int(f) for f in fields[:8]]
            times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def busy_cores(before: str, after: str, cpus: Set[int]) -> float:
    """Cores' worth of busy time on `cpus` between two readings of /proc/stat (steal counts as busy: the
    hypervisor gave that time to someone else)."""
    start, end = _cpu_times(before, cpus), _cpu_times(after, cpus)
    busy = 0.0
    for cpu in start.keys() & end.keys():
        total = end[cpu][1] - start[cpu][1]
        if total > 0:
            busy += (end[cpu][0] - start[cpu][0]) / total
    return busy


def _measure_busy(cpus: Set[int]) -> tuple[float, str]:
    """Busy cores among `cpus` over SAMPLE_SECONDS (this process sleeps meanwhile), or the 1-minute load
    average where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            before = f.read()
        time.sleep(SAMPLE_SECONDS)
        with open("/proc/stat") as f:
            after = f.read()
    except OSError:
        load = os.getloadavg()[0]
        return load, f"load average {load:.1f}"
    busy = busy_cores(before, after, cpus)
    return busy, f"{busy:.1f} busy"


def _usable_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)  # honours taskset and container cpusets
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def choose_threads(setting: int | str, environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """The thread count for `setting` (a count, or `auto`) and a few words on why, for the run's first line.

    With `auto`, a user's OMP_NUM_THREADS wins (torch already follows it; torchrun sets it to 1 for several
    ranks per machine, joblib to cores // jobs in its workers); otherwise `auto_threads` of this process's
    cores and the busy cores measured among them."""
    if setting != AUTO:
        return int(setting), f"threads={setting}"
    if environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    cpus = _usable_cpus()
    busy, how = _measure_busy(cpus)
    return auto_threads(len(cpus), busy), f"auto: {len(cpus)} cores, {how}"


def apply_threads(setting: int | str) -> tuple[int, str]:
    """Set torch's intra-op thread count from `setting`; returns what `choose_threads` chose."""
    threads, why = choose_threads(setting)
    torch.set_num_threads(threads)
    return threads, why
