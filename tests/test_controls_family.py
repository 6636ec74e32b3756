"""A working pipeline fails some control check in at most 5% of draws (family-wise level, by simulation).

Working pipeline under the engine's calibration model (`bench.metrics.simulate.simulate_clustered`: seed noise,
clustered images, 3 seeds per arm): copycat's augment:1 run is the baseline's procedure (no gain), label-shuffle's
synthetic-only model has no signal (chance), real-holdout's is the baseline's procedure on another draw of
training patients (its AUROC off by a draw effect with the sd measured by scripts/measure_holdout_draws.py, 0.036
of the ratio). The privacy audit is taken as flagging (it has its own tests).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.evaluation.controls import FAIL, PASS, controls_from_predictions
from bench.metrics.simulate import simulate_clustered, simulation_task

TASK = simulation_task(splits={"reserve": 0.2, "train": 0.4, "val": 0.2, "test": 0.2})
GENS = {"copycat": "copycat", "label-shuffle": "label-shuffle", "real-holdout": "real-holdout"}
PRIVACY = {"copycat": {"memorization_rate": 0.9, "ci_low": 0.85, "ci_high": 0.95, "flagged": True}}
DRAW_SD = 0.17  # signal sd of a draw of training patients: about 0.029 AUROC, 0.036 of the ratio at 0.81


def false_failures(sims: int, start: int) -> tuple[int, int]:
    """(draws with some failed check, draws where every interval check ran)."""
    bad = ran = 0
    for sim in range(sims):
        rng = np.random.default_rng(start + sim)
        arms = {
            ("none", "real"): 1.2,
            ("copycat", "augment:1"): 1.2,
            ("label-shuffle", "synthetic"): 0.0,
            ("real-holdout", "synthetic"): 1.2 + rng.normal(0, DRAW_SD),
        }
        preds = simulate_clustered(rng, arms, 150, (2, 4), 3)
        res = controls_from_predictions(preds, TASK, GENS, PRIVACY, n_boot=200, seed=sim)
        status = [r.status for r in res]
        ran += all(s in (PASS, FAIL) for s in status)
        bad += FAIL in status
    return bad, ran


def test_family_wise_false_failures_few_draws():
    # 20 draws: at a 5% family-wise rate P(4 or more failures) = 1.6%; at the old per-check 95% (up to 19%
    # family-wise with four checks) about 0.5.
    bad, ran = false_failures(20, 31000)
    assert ran == 20
    assert bad <= 3, bad


@pytest.mark.slow
def test_family_wise_false_failure_rate_is_at_most_five_percent():
    # 200 draws (CI time); Monte-Carlo sd of a 5% rate 1.5 points. Measured on draws 41000-41299: 4 of 300 (1.3%,
    # every one the chance check) with the seed stage on t quantiles of its seeds; 35 of 300 with the widening it
    # replaced (docs/STATISTICS.md, scripts/measure_control_checks.py).
    bad, ran = false_failures(200, 41000)
    print(f"family-wise false failures {bad}/{ran}")
    assert ran == 200
    assert bad / ran <= 0.05 + 0.015
