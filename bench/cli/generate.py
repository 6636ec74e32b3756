from __future__ import annotations

import argparse
from pathlib import Path

from bench.errors import BadInput


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "generate",
        help="train a reference generator on the real training rows -> synthetic images, manifest and card",
        description=(
            "Train a reference generator (copycat, pca-gmm, ddpm) on the real manifest's split=train rows of the "
            "task's training sites, then write OUT/images/*.png, OUT/manifest.parquet, OUT/train_manifest.parquet "
            "and OUT/card.yaml. Samples per class follow the training class distribution unless --n or "
            "--per-class say otherwise."
        ),
    )
    p.add_argument("--task", required=True, help="task name, folder or task.yaml")
    p.add_argument(
        "--generator",
        required=True,
        help="a registered generator: copycat, pca-gmm, ddpm or a plug-in's name",
    )
    p.add_argument("--real", required=True, type=Path, help="the real manifest")
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)"
    )
    p.add_argument(
        "--n", type=int, help="total number of images, split across classes like the training data"
    )
    p.add_argument("--per-class", type=int, help="this many images of every class")
    p.add_argument("--seed", type=int, default=0)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, help="image side in pixels the generator works at")
    size.add_argument("--preset", help="the task's named image size (e.g. smoke, cpu, gpu)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="train and sample only this subgroup (e.g. sex=M); repeatable (all must hold)",
    )
    p.add_argument("--config", default=None, help="generator preset: tiny (CPU) or full (GPU); default tiny")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one preset value (repeatable)",
    )
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads of a torch generator (default: every core this process may use); CPU samples are "
        "reproducible for a given value",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_generate, loads_torch=True)


def _config(args: argparse.Namespace) -> str | dict | None:
    if not args.set:
        return args.config
    import yaml

    cfg: dict = {"preset": args.config or "tiny"}
    for item in args.set:
        if "=" not in item:
            raise BadInput(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        cfg[k.strip()] = yaml.safe_load(v)
    return cfg


def cmd_generate(args: argparse.Namespace) -> int:
    from bench.generators.pipeline import generate, parse_only

    out = generate(
        args.task,
        args.generator,
        args.real,
        args.out,
        n=args.n,
        per_class=args.per_class,
        seed=args.seed,
        size=args.size,
        preset=args.preset,
        only=parse_only(args.only),
        config=_config(args),
        device=args.device,
        overwrite=args.overwrite,
        threads=args.threads,
    )
    print(f"wrote {out}/manifest.parquet, {out}/card.yaml")
    return 0
