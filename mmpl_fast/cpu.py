"""CPU cores as the scheduler's devices.

On a CPU the pipeline runs one worker per idle core, each with one intra-op thread, and takes its parallelism
from segments (as it does across GPUs). Two reasons:

* speed on a busy machine: OpenMP threads spin while they wait for each other, so a second intra-op thread
  on a core that another process holds makes every op wait for a time slice (a 10x slowdown was measured);
  a worker that finds no idle core is simply not started;
* determinism: a matmul's rounding depends on how many threads split it. With one thread per worker the
  frames do not depend on the thread count, the worker count or the machine's load (workers exchange KV
  pages and latents exactly, as devices do).

`MMPL_FAST_CPU_WORKERS` fixes the worker count (it changes speed, never the frames).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

WORKERS_ENV = "MMPL_FAST_CPU_WORKERS"


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity mask; every core where the OS has no such mask)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _core_times() -> dict[int, tuple[int, int]]:
    """Per core (busy, total) jiffies since boot, from /proc/stat (user, nice, system, idle, iowait, irq,
    softirq, steal); empty where it cannot be read."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                t = [int(x) for x in fields[:8]]
                free = t[3] + t[4]  # idle + iowait; niced work counts as busy (autogroups share cores fairly)
                out[int(name[3:])] = (sum(t) - free, sum(t))
    except (OSError, ValueError):
        return {}
    return out


def idle_cores(sample_s: float = 0.05) -> int | None:
    """How many of the usable cores were mostly idle (under half busy) over `sample_s` seconds; None where the
    OS does not say (then every usable core counts as idle)."""
    before = _core_times()
    if not before:
        return None
    time.sleep(sample_s)  # a measurement window, not synchronisation
    after = _core_times()
    idle = 0
    for core in usable_cores():
        if core not in before or core not in after:
            continue
        busy = after[core][0] - before[core][0]
        total = after[core][1] - before[core][1]
        idle += total <= 0 or busy / total < 0.5
    return idle


def cpu_workers(limit: int | None = None) -> int:
    """Workers for a CPU run: `MMPL_FAST_CPU_WORKERS` when set, else the idle usable cores (at least 1), at most
    `limit` (e.g. the segments that could ever run at once)."""
    env = os.environ.get(WORKERS_ENV)
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV} must be a whole number >= 1, got {env!r}") from None
        if n < 1:
            raise ValueError(f"{WORKERS_ENV} must be a whole number >= 1, got {env!r}")
    else:
        idle = idle_cores()
        n = len(usable_cores()) if idle is None else idle
    return max(1, min(n, limit) if limit is not None else n)


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Runs the block with one intra-op thread (the CPU workers' setting), restoring the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
