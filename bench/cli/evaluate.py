from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.show import run_lines


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metric tables with patient-bootstrap intervals, comparisons with the real-only baseline, report",
        description="Score every finished run of RUN (sub-folders with DONE): tidy metric table, paired comparisons "
        "with the real-only baseline, summary.json, report.md and a self-contained report.html.",
    )
    p.add_argument("run", type=Path, help="run folder (holds task.yaml and one folder per run)")
    p.add_argument("--out", type=Path, help="output folder (default RUN/evaluation; replaced atomically)")
    p.add_argument("--n-boot", type=int, help="bootstrap replicates (default: the task's metrics.bootstrap)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--min-patients", type=int, help="smaller groups are 'insufficient' (default: the task's)")
    p.add_argument("--min-positives", type=int, help="groups with fewer positive patients are 'insufficient'")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bench.errors import BadInput
    from bench.evaluation.run import evaluate_run

    for name in ("n_boot", "min_patients", "min_positives"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    out = args.out or args.run / "evaluation"
    summary = evaluate_run(
        args.run,
        out,
        n_boot=args.n_boot,
        seed=args.seed,
        min_patients=args.min_patients,
        min_positives=args.min_positives,
    )
    print(
        f"wrote {out} ({len(summary['runs'])} run keys; primary {summary['primary_metric']} on {summary['headline_split']})"
    )
    for line in run_lines(summary):
        print(line)
    return 0
