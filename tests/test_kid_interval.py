"""KID's subsets are smaller than the sets, so its interval has width wherever the images vary."""

from __future__ import annotations

import numpy as np

from bench.metrics import fidelity as F


def test_subset_size_rule():
    assert F.kid_subset_size(5000, 4000) == 1000
    assert F.kid_subset_size(342, 342) == 171  # the demo's set: half of it, not all 342
    assert F.kid_subset_size(342, 900, subset_size=50) == 50
    assert F.kid_subset_size(3, 10) == 2


def test_interval_has_positive_width_below_the_default_subset_size():
    # 342 images per set, as in the demo: with whole-set subsets every draw was the same MMD and the interval
    # had zero width. Several draws of the data, not one lucky seed.
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(342, 8)), rng.normal(0.3, 1.0, size=(342, 8))
        est, sd, size = F.kid(x, y, n_subsets=20, seed=seed)
        assert size == 171
        assert sd > 0 and est.ci_high - est.ci_low > 0.1 * abs(est.value) > 0
        assert est.ci_low <= est.value <= est.ci_high
