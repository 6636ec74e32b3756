from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser("demo", help="the whole benchmark end to end on the built-in phantom task")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        help="output folder (default: demo-out; an earlier demo there is replaced)",
    )
    p.add_argument(
        "--preset",
        choices=["smoke", "cpu", "gpu"],
        help="smoke: ~2 min; cpu: <10 min on 2 cores (default without a GPU); gpu: full size (default with one)",
    )
    p.add_argument(
        "--task",
        help="mediastinal-neoplasm (default: classifiers) or mediastinal-neoplasm-seg (segmenters on image-mask "
        "pairs, scored by Dice and lesion detection)",
    )
    p.set_defaults(func=cmd_demo, loads_torch=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from bench.cli import main
    from bench.demo import run_demo

    run_demo(args.out, main, args.preset, task=args.task)
    return 0
