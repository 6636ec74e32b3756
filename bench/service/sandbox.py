"""One job in a child process under resource limits, so that one team's submission cannot starve the others.

The child sets its own limits (`resource.setrlimit`) before it runs anything: address space (memory), CPU seconds
and the size of any file it writes; the parent also stops it past a wall-clock limit, or when its job was taken
over by another worker. A child that dies of a limit is reported as `Outcome("limit", <which>)`, never as a
crash of the worker. Children are started with `spawn`: nothing of the worker (database connections, the
heartbeat thread) is shared with them.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing as mp
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.errors import BadInput


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None
    cpu_s: int | None = None
    file_bytes: int | None = None
    wall_s: float | None = None


@dataclass(frozen=True)
class Outcome:
    """`kind`: ok (value = the function's result), bad (value = (message, problems) of a BadInput), limit (value =
    which limit), error (value = the child's traceback), stopped (the caller asked it to stop)."""

    kind: str
    value: Any


LIMIT_NAMES = {
    "memory": "the memory limit",
    "cpu": "the CPU-time limit",
    "file": "the file-size limit",
    "wall": "the time limit",
}


def _set_limits(lim: Limits) -> None:
    import resource

    if lim.memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
    if lim.cpu_s:
        # SIGXCPU at the soft limit; the hard one, a little later, is SIGKILL for a child that ignores it.
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 5))
    if lim.file_bytes:
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))


def _die_with_parent() -> None:
    # A worker killed with SIGKILL cannot stop its child: Linux can, on the parent's death.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], lim: Limits) -> None:
    _die_with_parent()
    try:
        _set_limits(lim)
        out: tuple[str, Any] = ("ok", fn(*args))
    except BadInput as e:
        out = ("bad", (e.args[0] if e.args else "", list(e.problems)))
    except MemoryError:
        out = ("limit", "memory")
    except BaseException as e:  # noqa: BLE001 - everything else is the host's to read, in its log
        # Python ignores SIGXFSZ: a write past the file-size limit is an OSError (EFBIG), maybe wrapped.
        out = ("limit", "file") if _caused_by_efbig(e) else ("error", traceback.format_exc())
    try:
        conn.send(out)
    except MemoryError:
        conn.send(("limit", "memory"))
    conn.close()


def _caused_by_efbig(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError) and e.errno == errno.EFBIG:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _from_exit(code: int | None) -> Outcome:
    if code is not None and code < 0:
        sig = -code
        if sig == signal.SIGXCPU or sig == signal.SIGKILL:
            # SIGKILL without our asking: the CPU hard limit, or the kernel's out-of-memory killer.
            return Outcome("limit", "cpu" if sig == signal.SIGXCPU else "memory")
        if sig == signal.SIGXFSZ:
            return Outcome("limit", "file")
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
            # What a native library does when an allocation fails under the address-space limit.
            return Outcome("limit", "memory")
    return Outcome("error", f"the job's process ended with exit code {code} and no result")


def run_limited(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    limits: Limits,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    poll_s: float = 0.2,
) -> Outcome:
    """`fn(*args)` in a child process under `limits`; `fn` and its result must pickle (a module-level function)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, limits), daemon=True)
    proc.start()
    send.close()
    deadline = None if limits.wall_s is None else time.monotonic() + limits.wall_s
    try:
        while True:
            if recv.poll(poll_s):
                try:
                    kind, value = recv.recv()
                except EOFError:  # died without a word
                    proc.join()
                    return _from_exit(proc.exitcode)
                proc.join()
                return Outcome(kind, value)
            if not proc.is_alive():
                proc.join()
                if recv.poll(0):
                    continue
                return _from_exit(proc.exitcode)
            if should_stop():
                return Outcome("stopped", None)
            if deadline is not None and time.monotonic() > deadline:
                return Outcome("limit", "wall")
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
