from __future__ import annotations

import argparse
from pathlib import Path

from bench.errors import BadInput


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    data = groups["data"]
    p = data.add_parser("validate", help="check a manifest against a task; exit 2 listing every problem")
    p.add_argument("manifest", type=Path)
    p.add_argument("--task", required=True, help="task name, folder or task.yaml")
    p.add_argument("--no-images", action="store_true", help="skip opening every image file")
    p.set_defaults(func=cmd_validate)

    p = data.add_parser("manifest", help="build a real manifest from a task's source")
    p.add_argument("--task", required=True)
    p.add_argument("--root", type=Path, help="the dataset folder (default: the task's configured source)")
    p.add_argument("--out", type=Path, help="manifest file (.parquet or .csv); default ROOT/manifest.parquet")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a source option (repeatable)",
    )
    p.set_defaults(func=cmd_manifest)


def cmd_validate(args: argparse.Namespace) -> int:
    from bench.manifest import read_manifest, summary, validate_manifest
    from bench.tasks import load_task

    task = load_task(args.task)
    m = read_manifest(args.manifest)
    problems = validate_manifest(m, task, check_images=not args.no_images)
    if problems:
        raise BadInput(f"{args.manifest}: {len(problems)} problem(s)", problems)
    print(f"{args.manifest}: ok: {summary(m)}")
    return 0


def parse_options(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise BadInput(f"--option {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_manifest(args: argparse.Namespace) -> int:
    from bench.manifest import Manifest, summary, validate_manifest, write_manifest
    from bench.sources import build_manifest, default_root
    from bench.tasks import load_task

    task = load_task(args.task)
    root = args.root or default_root(task)
    df = build_manifest(task, root, parse_options(args.option))
    # A root may be a single data file (a MedMNIST .npz): the default manifest then goes beside it.
    base = Path(root).parent if Path(root).is_file() else Path(root)
    out = args.out or base / "manifest.parquet"
    m = Manifest(df, "/")
    problems = validate_manifest(m, task, check_images=False)
    if problems:
        raise BadInput(f"{root}: the built manifest has {len(problems)} problem(s)", problems)
    write_manifest(df, out)
    print(f"wrote {out}: {summary(m)}")
    return 0
