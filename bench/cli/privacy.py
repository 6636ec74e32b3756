from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.show import estimate, number


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from bench.privacy import NEAR_DUPLICATE

    p = sub.add_parser(
        "privacy",
        help="memorization and contamination audit of a synthetic set",
        description=(
            "For every synthetic image, the distance to its nearest generator-training image, calibrated against "
            "real holdout images the generator never saw. Memorization rate = share of synthetic images closer "
            "than the holdout's --percentile-th percentile (nominal rate = percentile/100). Flagged if rate >= 2x "
            "nominal and the 95%% bootstrap interval's lower bound exceeds nominal. Also checks the card's training "
            "sites and patients against the task's test/external data and lists synthetic images duplicating "
            "validation, test or external images. Writes OUT/privacy.json, OUT/distances.parquet, "
            "OUT/closest_pairs.png."
        ),
    )
    p.add_argument("--task", required=True, help="task name, folder or task.yaml")
    p.add_argument("--synthetic", required=True, type=Path, help="synthetic manifest")
    p.add_argument(
        "--train", required=True, type=Path, help="the generator's training manifest (its card's hash)"
    )
    p.add_argument(
        "--holdout",
        required=True,
        type=Path,
        help="real manifest; its rows of training sites whose patients are not in --train calibrate the audit",
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--card", type=Path, help="generator card (default: beside the synthetic manifest)")
    p.add_argument("--features", default="pixel,classifier", help="comma-separated: pixel, classifier")
    p.add_argument("--checkpoint", type=Path, help="a run's checkpoint.pt for classifier features")
    p.add_argument(
        "--percentile", type=float, default=5.0, help="holdout percentile of the threshold (default 5)"
    )
    p.add_argument(
        "--test", type=Path, help="another real manifest with test/external rows to check for contamination"
    )
    p.add_argument("--size", type=int, help="image side for the audit (default: the synthetic images' size)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument(
        "--near-duplicate",
        type=float,
        default=NEAR_DUPLICATE,
        help=f"pixel-feature distance below which an image counts as a near duplicate (default {NEAR_DUPLICATE})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.set_defaults(func=cmd_privacy, loads_torch=True)


def cmd_privacy(args: argparse.Namespace) -> int:
    from bench.privacy import audit

    feats = tuple(f.strip() for f in args.features.split(",") if f.strip())
    r = audit(
        args.task,
        args.synthetic,
        args.train,
        args.holdout,
        args.out,
        card=args.card,
        features=feats,
        checkpoint=args.checkpoint,
        percentile=args.percentile,
        test=args.test,
        size=args.size,
        n_boot=args.bootstrap,
        near_duplicate=args.near_duplicate,
        seed=args.seed,
        device=args.device,
    )
    print(summary_line(r))
    for prob in r["contamination"]["problems"]:
        print(f"  - {prob}")
    print(f"wrote {args.out}/privacy.json")
    return 0


def summary_line(r: dict) -> str:
    """The audit's verdict in one line; a rate the audit could not estimate prints as undefined."""
    verdict = "FLAGGED" if r.get("flagged") else "not flagged"
    return (
        f"{r['generator']}: memorization rate {estimate(r, value='memorization_rate')} "
        f"({r['feature']} features; nominal {number(r.get('nominal_rate'))}, "
        f"fresh holdout {number(r.get('holdout_rate'))}): "
        f"{verdict}; contamination {r['contamination']['status']}"
    )
