"""CPU threads per process, set deliberately.

The thread count is fixed by the cores this process may use and how many worker processes share them, never by the
load of the moment: CPU predictions depend on it (reductions split differently), so a run must not change its
numbers because a neighbour was busy when it started.

How waiting threads behave is another matter, and is chosen from the load. OpenMP's default is to spin briefly at
each barrier: on a quiet machine that is what makes a second thread pay (resnet10t at 32 px, batch 32, on 2 cores:
80 ms a step with 2 threads, 149 ms with 1). But a spinning thread that lost its core to another process stalls the
whole parallel region (the same step, next to one CPU-bound process: 378 ms spinning, 167 ms sleeping). Sleeping at
barriers costs about as much as it saves on a quiet machine (166 ms). So each command looks, once, before torch is
loaded: when other processes keep half a core or more busy, waiting threads sleep (OMP_WAIT_POLICY=PASSIVE);
otherwise OpenMP keeps its default. `scripts/perf_threads.py` measures both.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Read by OpenMP when it initialises (when torch is first imported): waiting threads yield their core.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")
# Other processes' load, in cores, from which waiting threads sleep rather than spin.
BUSY_THRESHOLD = 0.5
_chosen: dict[str, str] = {}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and `taskset` restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not every platform has affinity
        return max(1, os.cpu_count() or 1)


def threads_per_process(workers: int = 1) -> int:
    """Intra-op threads for each of `workers` processes sharing this machine's cores: cores // workers, at least 1."""
    return max(1, available_cores() // max(1, int(workers)))


def busy_cores(window_s: float = 0.2) -> float | None:
    """Cores kept busy by every process on this machine over the next `window_s` seconds (this one sleeps
    meanwhile), from two reads of /proc/stat; None where that cannot be read."""

    def read() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal: idle and iowait are the unused share.
        return sum(fields), fields[3] + fields[4]

    try:
        total0, idle0 = read()
        time.sleep(window_s)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return (1.0 - (idle1 - idle0) / total) * (os.cpu_count() or 1)


def choose_wait_policy() -> str:
    """Set how OpenMP threads wait, from the machine's load, before torch is imported; returns what is in effect.

    An OMP_WAIT_POLICY already in the environment wins (and is inherited by worker processes). Once torch is loaded
    OpenMP has read its settings and nothing is changed. Where the load cannot be read, threads sleep (the choice
    that never collapses)."""
    key, value = WAIT_POLICY
    if "policy" in _chosen:  # decided once per process: the demo calls the command line once per stage
        return _chosen["policy"]
    if key in os.environ:
        return _chosen.setdefault("policy", f"{os.environ[key]} (from the environment)")
    if "torch" in sys.modules:
        return _chosen.get("policy", "default (OpenMP already started)")
    busy = busy_cores()
    if busy is None or busy >= BUSY_THRESHOLD:
        os.environ[key] = value
        why = "load unknown" if busy is None else f"{busy:.1f} cores busy elsewhere"
        _chosen["policy"] = f"{value} ({why})"
    else:
        _chosen["policy"] = f"default ({busy:.1f} cores busy elsewhere)"
    return _chosen["policy"]


def wait_policy() -> str:
    """What `choose_wait_policy` chose in this process (or the environment's setting), for the records."""
    key = WAIT_POLICY[0]
    if "policy" in _chosen:
        return _chosen["policy"]
    return f"{os.environ[key]} (from the environment)" if key in os.environ else "default"


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run a block with `n` torch intra-op threads, restoring the caller's count afterwards."""
    import torch  # heavy; only the commands that train import it

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
