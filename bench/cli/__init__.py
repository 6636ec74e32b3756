"""The `medsynbench` command line.

Each command lives in its own module under `bench.cli` and registers itself through `register(sub, groups)`, so a
step's command sits next to nothing but its own arguments. Exit codes: 0 success, 2 bad input, 1 our fault.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import traceback

from bench import __version__
from bench.errors import BadInput
from bench.threads import choose_wait_policy

# Order is the order of `medsynbench --help`.
COMMAND_MODULES = [
    "tasks",
    "data",
    "data_phantom",
    "data_import",
    "generate",
    "run",
    "evaluate",
    "plan",
    "audit",
    "privacy",
    "privacy_model",
    "fidelity",
    "submit",
    "leaderboard",
    "serve",
    "host",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsynbench",
        description="Benchmark what synthetic medical images are worth downstream.",
    )
    parser.add_argument("--version", action="version", version=f"medsynbench {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data = sub.add_parser("data", help="write, build, validate and import datasets")
    lb = sub.add_parser("leaderboard", help="build and publish leaderboards")
    groups = {
        "data": data.add_subparsers(dest="data_command", metavar="DATA_COMMAND"),
        "leaderboard": lb.add_subparsers(dest="leaderboard_command", metavar="LEADERBOARD_COMMAND"),
    }
    data.set_defaults(func=lambda a: _help(data))
    lb.set_defaults(func=lambda a: _help(lb))
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"bench.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.cli.{name}":
                continue
            raise
        mod.register(sub, groups)
    return parser


# Errors of the user's disk or permissions, not of ours: a read-only or full output folder, a path under a file.
USER_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
}


def disk_error_message(e: OSError) -> str | None:
    """The exit-2 message for an OSError caused by the user's files or disk (naming the path), else None."""
    why = USER_ERRNOS.get(e.errno or -1)
    if why is None:
        return None
    where = e.filename if e.filename is not None else "a file"
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    hint = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = (
            "; free some space or choose another output folder (files already written are left as they were)"
        )
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose a folder you can write to (files already written are left as they were)"
    return f"{where}: {why}{hint}"


def _help(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # Before any command imports torch: on a shared machine OpenMP threads must sleep at barriers, not spin. Only
    # the commands that compute with torch (`loads_torch` in their parser's defaults) pay the 0.2 s load sample.
    if getattr(args, "loads_torch", False):
        choose_wait_policy()
    try:
        rc = args.func(args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        message = disk_error_message(e)
        if message is None:
            traceback.print_exc()
            print("internal error (exit 1): please report it with the traceback above", file=sys.stderr)
            return 1
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a fault of ours: show everything
        traceback.print_exc()
        print("internal error (exit 1): please report it with the traceback above", file=sys.stderr)
        return 1
    return int(rc or 0)
