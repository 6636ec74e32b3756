from __future__ import annotations

import argparse
from pathlib import Path

from bench.errors import BadInput
from bench.runfolder import BASELINE

EPILOG = f"""\
regimes: real | synthetic | augment:R | replace:F | scarce:F | scarce:F+synthetic | pretrain
Each run is written to OUT/<generator>__<regime>__<backbone>__seed<k>/ with a DONE marker; running the same
command again skips finished runs. The real-only regimes (real, scarce:F) run once, as generator '{BASELINE}'.
"""


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "run",
        help="train the protocol matrix (task x generators x regimes x seeds), resumable",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, help="task name, folder or task.yaml")
    p.add_argument("--real", required=True, type=Path, help="the real manifest (.parquet or .csv)")
    p.add_argument(
        "--synthetic",
        action="append",
        default=[],
        metavar="NAME=MANIFEST",
        help="a generator's synthetic manifest (repeatable); its card.yaml/card.json beside it is checked",
    )
    p.add_argument("--out", required=True, type=Path, help="the run folder")
    p.add_argument("--protocol", help="protocol YAML (a path or a name in configs/protocols)")
    p.add_argument("--regimes", help="comma-separated regimes (overrides the protocol)")
    p.add_argument("--seeds", help="comma-separated seeds (overrides the protocol)")
    p.add_argument("--backbone", help="model name (see bench.models.list_models)")
    p.add_argument(
        "--preset", help="training preset: smoke, cpu, gpu or a YAML path (default: gpu with CUDA, else cpu)"
    )
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--tune", type=int, metavar="N", help="optuna trials per (generator, regime); 0 = no tuning"
    )
    p.add_argument("--storage", help="optuna storage URL (default: sqlite in OUT/tuning.db)")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--workers", type=int, default=1, help="runs at once (local: processes, one GPU each)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads per run (default: the available cores divided by --workers, at least 1); CPU "
        "predictions are reproducible for a given value",
    )
    p.add_argument("--ray-address", help="address of an existing Ray cluster (default: start a local one)")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    p.add_argument("--resume", action="store_true", help="continue the matrix in OUT (it must exist)")
    p.add_argument("--cache-dir", type=Path, help="image cache folder (default: ~/.cache/medsynbench)")
    p.add_argument(
        "--skip-corrupt", action="store_true", help="leave unreadable images out instead of failing"
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_run, loads_torch=True)


def _csv(value: str | None, what: str, cast=str) -> list | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise BadInput(f"--{what} {value!r}: empty list")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise BadInput(f"--{what} {value!r}: expected comma-separated {cast.__name__} values") from None


def cmd_run(args: argparse.Namespace) -> int:
    from bench.protocol import MatrixOptions, parse_synthetic_args, run_matrix

    options = MatrixOptions(
        task=args.task,
        real=args.real,
        out=args.out,
        synthetic=parse_synthetic_args(args.synthetic),
        protocol=args.protocol,
        regimes=_csv(args.regimes, "regimes"),
        seeds=_csv(args.seeds, "seeds", int),
        backbone=args.backbone,
        preset=args.preset,
        epochs=args.epochs,
        tune=args.tune,
        storage=args.storage,
        executor=args.executor,
        workers=args.workers,
        ray_address=args.ray_address,
        wandb=args.wandb,
        resume=args.resume,
        cache_dir=args.cache_dir,
        skip_corrupt=args.skip_corrupt,
        threads=args.threads,
        device=args.device,
        progress=not args.quiet,
    )
    res = run_matrix(options)
    print(
        f"{res.out}: {res.done}/{res.total} runs done ({res.skipped} were already done) in {res.seconds:.1f} s"
    )
    return 0
