from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    lb = groups["leaderboard"]
    p = lb.add_parser("build", help="render README.md and index.html from the records")
    p.add_argument("board", type=Path, help="leaderboard folder (holds leaderboard.yaml and records/)")
    p.set_defaults(func=cmd_build)

    p = lb.add_parser("push", help="log the leaderboard as a Weights & Biases Table (offline by default)")
    p.add_argument("board", type=Path)
    p.add_argument("--wandb-project", required=True, help="W&B project name")
    p.add_argument("--wandb-entity", help="W&B entity (team or user)")
    p.add_argument(
        "--mode",
        choices=["offline", "online"],
        default="offline",
        help="offline (default): write a run directory that `wandb sync` uploads later",
    )
    p.add_argument(
        "--dir", type=Path, default=Path("."), help="where the wandb/ run folder is written (default: .)"
    )
    p.set_defaults(func=cmd_push)


def cmd_build(args: argparse.Namespace) -> int:
    from bench.leaderboard.build import build

    readme, index = build(args.board)
    print(f"wrote {readme} and {index}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from bench.leaderboard.push import push

    run_dir = push(
        args.board, args.wandb_project, mode=args.mode, directory=args.dir, entity=args.wandb_entity
    )
    hint = f" (upload later with: wandb sync {run_dir})" if args.mode == "offline" else ""
    print(f"logged the leaderboard table to {run_dir}{hint}")
    return 0
