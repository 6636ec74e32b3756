from __future__ import annotations

import argparse
import getpass
from pathlib import Path

from bench.cli.show import estimate


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "submit",
        help="validate a run, re-score it from its predictions, add its records to a leaderboard",
        description="Checks the run against the leaderboard (task and version, required regimes and seeds, "
        "prediction coverage and probabilities, pinned manifest hashes), re-scores every generator from its "
        "predictions and writes records/<id>.json and predictions/<id>.parquet. Any problem: exit 2, all "
        "problems listed, the leaderboard unchanged.",
    )
    p.add_argument(
        "run",
        type=Path,
        help="run folder, or a .zip / .tar.gz bundle of one; with --server: a synthetic bundle or predictions file",
    )
    p.add_argument("--leaderboard", type=Path, help="leaderboard folder (holds leaderboard.yaml)")
    hosted = p.add_argument_group(
        "hosted service", "send the file to a hosted evaluation service instead of a leaderboard folder"
    )
    hosted.add_argument("--server", metavar="URL", help="the service's address, e.g. https://host.example/")
    hosted.add_argument("--token", help="the team's API token (default: $MEDSYNBENCH_TOKEN)")
    hosted.add_argument(
        "--kind",
        choices=["synthetic", "predictions"],
        help="what the file is (default: predictions for .csv/.parquet/.npz, else synthetic)",
    )
    hosted.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS for the score (default: 0)",
    )
    p.add_argument("--submitter", help="name shown on the leaderboard (default: the current user)")
    p.add_argument("--contact", help="e-mail or URL for questions about the submission")
    p.add_argument(
        "--generator",
        action="append",
        default=None,
        metavar="NAME",
        help="submit only this generator of the run (repeatable; default: every generator)",
    )
    p.add_argument(
        "--max-archive-bytes", type=int, help="unpacked size limit of a bundle (default: the leaderboard's)"
    )
    p.add_argument("--dry-run", action="store_true", help="check and score, write nothing")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    from bench.errors import BadInput
    from bench.leaderboard.submit import submit

    if args.server:
        return _submit_hosted(args)
    if args.leaderboard is None:
        raise BadInput(
            "give --leaderboard FOLDER (a leaderboard in a repository) or --server URL (a hosted service)"
        )
    if args.max_archive_bytes is not None and args.max_archive_bytes <= 0:
        raise BadInput(f"--max-archive-bytes {args.max_archive_bytes}: must be positive")
    submitter = args.submitter or _user()
    records = submit(
        args.run,
        args.leaderboard,
        submitter=submitter,
        contact=args.contact,
        generators=args.generator,
        dry_run=args.dry_run,
        max_archive_bytes=args.max_archive_bytes,
    )
    verb = "would add" if args.dry_run else "added"
    for r in records:
        m = r["metrics"]
        head = m["regimes"][m["headline_regime"]]
        name = "real-only" if r["kind"] == "reference" else r["generator"]["name"]
        where = f"records/{r['id']}.json" if not args.dry_run else "(dry run)"
        print(
            f"{verb} {where}: {name}, {r['evaluation']['primary_metric']} ({m['headline_regime']}, "
            f"{r['evaluation']['split']}) = {estimate(head)}"
        )
    return 0


def _submit_hosted(args: argparse.Namespace) -> int:
    import os

    from bench.errors import BadInput
    from bench.service.client import submit_to_server

    if args.leaderboard is not None:
        raise BadInput("--server and --leaderboard: choose one")
    token = args.token or os.environ.get("MEDSYNBENCH_TOKEN")
    if not token:
        raise BadInput("--server: an API token is needed (--token or $MEDSYNBENCH_TOKEN)")
    sub = submit_to_server(args.run, args.server, token, kind=args.kind, wait=args.wait)
    line = f"submission {sub['id']}: {sub['status']}"
    if sub.get("score"):
        sc = sub["score"]
        line += f", {sc['metric']} ({sc['part']} part) = {estimate(sc)}"
    if sub.get("reason"):
        line += f": {sub['reason']}"
    print(line)
    return 2 if sub["status"] == "failed" else 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "anonymous"
