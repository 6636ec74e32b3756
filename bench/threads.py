"""CPU threads per process, set deliberately.

torch's default is one intra-op thread per core, each spinning at OpenMP barriers while it waits for the others.
On a machine shared with other CPU-bound jobs that collapses: a thread that loses its core stalls every parallel
region, and the waiting threads burn the cores the late one needs (measured in CHANGELOG.md: the tiny ddpm fit
about 6x slower with one competing process). So every command sets its thread count once, from the cores this
process may use and how many worker processes share them, and asks OpenMP to sleep rather than spin while waiting.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Read by OpenMP when it initialises (when torch is first imported): waiting threads yield their core.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and `taskset` restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not every platform has affinity
        return max(1, os.cpu_count() or 1)


def threads_per_process(workers: int = 1) -> int:
    """Intra-op threads for each of `workers` processes sharing this machine's cores: cores // workers, at least 1."""
    return max(1, available_cores() // max(1, int(workers)))


def prefer_passive_wait() -> bool:
    """Ask OpenMP to sleep, not spin, at barriers (inherited by worker processes). Effective only before torch is
    imported; an explicit OMP_WAIT_POLICY in the environment wins. Returns whether the policy is in effect."""
    key, value = WAIT_POLICY
    if "torch" not in sys.modules:
        os.environ.setdefault(key, value)
    return os.environ.get(key, "").upper() == value


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
