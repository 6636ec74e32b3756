from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "plan",
        help="seeds and evaluation patients needed to detect a difference, from a pilot run",
        description="Read a pilot run's predictions, measure the variance components of each comparison with the "
        "real-only baseline (patients, training seeds) on the primary metric and headline split, and print the "
        "power at --detect, the seeds and evaluation patients needed for 80% power, and the smallest "
        "difference the current design detects (MDE).",
    )
    p.add_argument("run", type=Path, help="pilot run folder (holds task.yaml and finished runs)")
    p.add_argument("--detect", type=float, required=True, help="difference to detect (e.g. 0.02 AUROC)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates for the components (200)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from bench.errors import BadInput
    from bench.evaluation.run import load_run_predictions
    from bench.metrics.compare import compare_to_baseline, comparison_inputs
    from bench.metrics.power import TARGET_POWER, components, plan, site_spread
    from bench.metrics.table import MetricTable

    if not args.detect > 0:
        raise BadInput(f"--detect must be a positive difference, got {args.detect}")
    if args.n_boot < 20:
        raise BadInput(f"--n-boot must be at least 20, got {args.n_boot}")
    task, preds = load_run_predictions(args.run)
    inputs = comparison_inputs(preds, task, n_boot=args.n_boot, seed=args.seed, source=str(args.run))
    if not inputs:
        raise BadInput(
            f"{args.run}: no comparison to plan: no real-only baseline (generator 'none', regime 'real') "
            "sharing evaluation cases with another run"
        )
    print(
        f"{args.run}: {task.metrics.primary} on the {inputs[0]['split']} split, detect {args.detect:g} at 5% "
        f"two-sided with {100 * TARGET_POWER:.0f}% power"
    )
    by_site = MetricTable(
        compare_to_baseline(preds, task, n_boot=args.n_boot, seed=args.seed, metrics=[task.metrics.primary])
    ).select(scope="site", split=inputs[0]["split"], metric=task.metrics.primary, status="ok")
    for x in inputs:
        comp = components(x["xa"], x["xb"], x["pa"], x["pb"], paired=x["paired"], patients=x["n_patients"])
        pl = plan(comp, args.detect)
        name = f"{x['generator']}/{x['regime']}/{x['backbone']}"
        both = f"{pl.both[0]} seeds x {pl.both[1]} patients" if pl.both else "out of reach"
        print(
            f"  {name} vs real-only (diff {x['diff']:+.3f}; {comp.seeds} seeds{' paired' if comp.paired else ''}, "
            f"{comp.patients} patients): power {pl.current_power:.2f}, MDE {pl.current_mde:.3f}; "
            f"seeds needed {pl.seeds_needed or 'more than 50'} (at {comp.patients} patients), "
            f"patients needed {pl.patients_needed or 'out of reach'} (at {comp.seeds} seeds), or {both}"
        )
        print(
            f"    components: common patients {comp.common:.2e}, seed-to-seed {_fmt(comp.tau2)}, "
            f"models' own errors {_fmt(comp.within)}"
        )
        rows = MetricTable(by_site).select(
            generator=x["generator"], regime=x["regime"], backbone=x["backbone"]
        )
        spread = site_spread(list(rows["group"]), list(rows["diff"]), list(rows["se"])) if len(rows) else None
        if spread is not None:
            each = ", ".join(f"{s} {d:+.3f}" for s, d in zip(spread.sites, spread.diffs, strict=True))
            print(
                f"    between sites ({len(spread.sites)}): {each}; Q {spread.q:.2f} on {len(spread.sites) - 1} df "
                f"(p {spread.p:.2f}), between-site sd {spread.sd:.3f}: the plan is for these hospitals; at a "
                "new one the difference also varies by that sd, which only more sites measure"
            )
        else:
            print(
                f"    between sites: {len(rows)} hospital(s) with a difference on this split; how much a new "
                "hospital's difference varies is not measured"
            )
    return 0


def _fmt(xs: tuple[float, ...]) -> str:
    return " / ".join(f"{x:.2e}" for x in xs)
