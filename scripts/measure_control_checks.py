"""How often do the control checks fail a working pipeline, and how often do they catch a broken one?

Both under the engine's calibration model (`bench.metrics.simulate.simulate_clustered`: 150 patients with 2-4
images, seed noise, three seeds per arm), scored by `bench.evaluation.controls` as a run's evaluation scores them.

    .venv/bin/python scripts/measure_control_checks.py family --draws 300 --start 41000
    .venv/bin/python scripts/measure_control_checks.py power --leak 0.6 --gain 0.6 --draws 30

`family`: the draws of `tests/test_controls_family.py` (copycat no gain, label-shuffle at chance, real-holdout off
by a draw of training patients); prints how many draws failed some check, by check. `power`: label-shuffle with
`--leak` signal on the logit and copycat gaining `--gain`; prints how often each check catches it, with this
version's checks and with the widening they replaced (t quantiles of the Satterthwaite df throughout). About 2 s a
draw on one quiet core.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_controls_family import DRAW_SD, GENS, PRIVACY, TASK  # noqa: E402

import bench.evaluation.controls as C  # noqa: E402
from bench.metrics.compare import compare_to_baseline  # noqa: E402
from bench.metrics.evaluate import evaluate_predictions  # noqa: E402
from bench.metrics.simulate import clustered_auroc, simulate_clustered  # noqa: E402


def family(draws: int, start: int) -> None:
    bad, which = 0, Counter()
    for sim in range(draws):
        rng = np.random.default_rng(start + sim)
        arms = {
            ("none", "real"): 1.2,
            ("copycat", "augment:1"): 1.2,
            ("label-shuffle", "synthetic"): 0.0,
            ("real-holdout", "synthetic"): 1.2 + rng.normal(0, DRAW_SD),
        }
        preds = simulate_clustered(rng, arms, 150, (2, 4), 3)
        res = C.controls_from_predictions(preds, TASK, GENS, PRIVACY, n_boot=200, seed=sim)
        failed = [r.check for r in res if r.status == C.FAIL]
        which.update(failed)
        bad += bool(failed)
    print(f"{bad}/{draws} draws failed some check ({100 * bad / draws:.1f}%); by check: {dict(which)}")


def _old_widening() -> tuple[Callable, Callable]:
    saved = (C._comparison_at, C._seed_count)
    C._comparison_at = lambda r, lo, hi, v, level: C.widen(lo, hi, level, C.number(r["df"]))
    C._seed_count = lambda *a: None
    return saved


def power(leak: float, gain: float, draws: int, start: int) -> None:
    print(
        f"label-shuffle AUROC {clustered_auroc(leak):.3f} (0.5 at chance); copycat augment:1 AUROC "
        f"{clustered_auroc(1.2 + gain):.3f} against real-only {clustered_auroc(1.2):.3f}"
    )
    gens = {"copycat": "copycat", "label-shuffle": "label-shuffle"}
    caught = {"now": Counter(), "before": Counter()}
    for sim in range(draws):
        rng = np.random.default_rng(start + sim)
        arms = {
            ("none", "real"): 1.2,
            ("copycat", "augment:1"): 1.2 + gain,
            ("label-shuffle", "synthetic"): leak,
        }
        preds = simulate_clustered(rng, arms, 150, (2, 4), 3)
        table = evaluate_predictions(preds, TASK, n_boot=200, seed=sim, subgroup_columns=[], intersections=[])
        comps = compare_to_baseline(preds, TASK, n_boot=200, seed=sim, metrics=[TASK.metrics.primary])
        for key in ("now", "before"):
            saved = _old_widening() if key == "before" else None
            try:
                res = C.check_controls(table, comps, PRIVACY, TASK, gens)
            finally:
                if saved:
                    C._comparison_at, C._seed_count = saved
            caught[key].update(r.check for r in res if r.status == C.FAIL)
    for key, c in caught.items():
        print(f"{key}: chance caught {c['chance']}/{draws}, gain caught {c['gain_contains_zero']}/{draws}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("family", help="false failures of a working pipeline")
    f.add_argument("--draws", type=int, default=300)
    f.add_argument("--start", type=int, default=41000)
    p = sub.add_parser("power", help="how often the checks catch a broken pipeline")
    p.add_argument("--leak", type=float, default=0.6, help="label-shuffle's signal on the logit")
    p.add_argument("--gain", type=float, default=0.6, help="copycat's gain over real-only on the logit")
    p.add_argument("--draws", type=int, default=30)
    p.add_argument("--start", type=int, default=77000)
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.what == "family":
        family(args.draws, args.start)
    else:
        power(args.leak, args.gain, args.draws, args.start)
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
