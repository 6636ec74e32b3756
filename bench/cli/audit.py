from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.show import estimate


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "audit",
        help="fairness audit of any predictions file (subgroup metrics, gaps, equalized odds, FNR gap)",
        description="Audit a predictions file (Parquet or CSV) by subgroup: per-group metrics with patient-bootstrap "
        "intervals, worst group, gaps, equalized-odds difference and FNR gap at a validation-chosen threshold. "
        "Invalid files exit 2 naming the rows.",
    )
    p.add_argument("predictions", type=Path)
    p.add_argument("--by", required=True, help="comma-separated subgroup columns, e.g. sex,age_group")
    p.add_argument("--task", help="task name, folder or task.yaml (default: classes from the prob_ columns)")
    p.add_argument(
        "--threshold-from",
        default="val",
        metavar="val|NUMBER",
        help="choose the operating point on the val split (default) or fix it at a number",
    )
    p.add_argument(
        "--map",
        dest="mapping",
        metavar="NAME=COLUMN,...",
        help="rename file columns to contract names, e.g. y_true=label,prob_=p_ (a trailing _ maps a prefix)",
    )
    p.add_argument("--positive", help="comma-separated positive classes for the binary view (without --task)")
    p.add_argument("--intersect", action="store_true", help="also audit the intersection of all --by columns")
    p.add_argument("--age-bins", help="inner age edges for age_group, e.g. 40,60 (default: the task's)")
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    p.add_argument(
        "--n-boot", type=int, help="bootstrap replicates (default: the task's, 1000 without --task)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-patients", type=int)
    p.add_argument("--min-positives", type=int)
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from bench.errors import BadInput
    from bench.evaluation.audit import audit_predictions

    for name in ("n_boot", "min_patients", "min_positives"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    age_bins = None
    if args.age_bins:
        try:
            age_bins = [float(x) for x in args.age_bins.split(",") if x.strip()]
        except ValueError:
            raise BadInput(f"--age-bins {args.age_bins!r}: expected numbers separated by commas") from None
    positive = [c.strip() for c in args.positive.split(",") if c.strip()] if args.positive else None
    summary = audit_predictions(
        args.predictions,
        args.out,
        by=args.by.split(","),
        task=args.task,
        threshold_from=args.threshold_from,
        mapping=args.mapping,
        positive=positive,
        intersect=args.intersect,
        n_boot=args.n_boot,
        seed=args.seed,
        min_patients=args.min_patients,
        min_positives=args.min_positives,
        age_bins=age_bins,
    )
    print(f"wrote {args.out} ({len(summary['runs'])} model(s); headline split {summary['headline_split']})")
    for line in _lines(summary, args.by.split(",")):
        print(line)
    return 0


def _lines(summary: dict, by: list[str]) -> list[str]:
    """Per model and subgroup column: the worst group and the largest gap of the primary metric."""
    m = summary["primary_metric"]
    out = []
    for r in summary["runs"]:
        for col in by:
            fam = r.get(col) or {}
            out.append(
                f"  {r['generator']}/{r['regime']}/{r['backbone']} by {col}: {m}_worst {estimate(fam.get(f'{m}_worst'))}; "
                f"{m}_gap {estimate(fam.get(f'{m}_gap'))}"
            )
    return out
