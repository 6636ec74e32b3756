from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    lb = groups["leaderboard"]
    p = lb.add_parser("build", help="render README.md and index.html from the records")
    p.add_argument("board", type=Path, help="leaderboard folder (holds leaderboard.yaml and records/)")
    p.set_defaults(func=cmd_build)

    p = lb.add_parser(
        "key",
        help="write the leaderboard's answer key from the real manifest",
        description="The answer key holds the label, site, split and subgroups of every test and external case "
        "(ids salted with the leaderboard's id_salt); scoring reads them there, never from a submission. The key "
        "holds evaluation labels: keep it where only the host can read it unless the data are public. A "
        "segmentation board's key also holds every case's truth label map (answer_key.masks.npz beside the key).",
    )
    p.add_argument("board", type=Path, help="leaderboard folder (holds leaderboard.yaml)")
    p.add_argument(
        "--real", required=True, type=Path, help="the real manifest the evaluation cases come from"
    )
    p.add_argument("--out", type=Path, help="key file (default: answer_key.parquet beside leaderboard.yaml)")
    p.add_argument(
        "--private-fraction", type=float, default=0.0, help="share of patients per site kept private"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the private draw")
    p.add_argument(
        "--image-size",
        help="segmentation boards: side (pixels, or a task size preset) of the truth masks submissions are scored "
        "at (default: leaderboard.yaml's image_size, else the task's image.size)",
    )
    p.set_defaults(func=cmd_key)

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


def cmd_key(args: argparse.Namespace) -> int:
    from bench.leaderboard.config import board_image_size, board_spec, load_config, set_answer_key
    from bench.leaderboard.key import AnswerKey, masks_path

    cfg = load_config(args.board)
    task = board_spec(cfg)[0]
    size = board_image_size(cfg, task, args.image_size) if task.is_segmentation else None
    key = AnswerKey.build_from_manifest(
        args.real, task, cfg.id_salt, args.private_fraction, args.seed, image_size=size
    )
    path = set_answer_key(args.board, key, args.out)
    parts = key.df["part"].value_counts().to_dict()
    masks = f" and its {size}x{size} truth masks ({masks_path(path).name})" if key.is_segmentation else ""
    print(f"wrote {path}{masks}: {len(key.df)} evaluation cases ({parts}); leaderboard.yaml points to it")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from bench.leaderboard.push import push

    run_dir = push(
        args.board, args.wandb_project, mode=args.mode, directory=args.dir, entity=args.wandb_entity
    )
    hint = f" (upload later with: wandb sync {run_dir})" if args.mode == "offline" else ""
    print(f"logged the leaderboard table to {run_dir}{hint}")
    return 0
