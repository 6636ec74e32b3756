"""Patient bootstrap: weighted AUROC equals scikit-learn on the expanded resample; stratification; coverage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from bench.metrics.bootstrap import (
    bootstrap_group_auroc,
    bootstrap_p_value,
    holm,
    patient_weights,
    percentile_interval,
)
from bench.metrics.core import AurocKernel


def test_weighted_auroc_equals_sklearn_on_expanded_resample():
    rng = np.random.default_rng(0)
    n_pat = 60
    pid = np.repeat(np.arange(n_pat), 3)
    y = np.repeat(rng.integers(0, 2, n_pat), 3)
    s = np.round(rng.random(len(pid)) + 0.4 * y, 2)
    strata = np.zeros(n_pat, dtype=int)
    W = patient_weights(strata, 20, seed=3)
    kern = AurocKernel(y, s)
    got = kern(W[:, pid])
    for r in range(20):
        picks = np.repeat(np.arange(n_pat), W[r].astype(int))  # the resampled patients, with repeats
        rows = np.concatenate([np.flatnonzero(pid == p) for p in picks])
        assert got[r] == pytest.approx(roc_auc_score(y[rows], s[rows]), abs=1e-12)


def test_patient_weights_keep_every_stratum_size_and_are_reproducible_by_chunk():
    strata = np.array([0] * 7 + [1] * 3 + [2] * 12)
    W = patient_weights(strata, 50, seed=11)
    assert W.shape == (50, 22)
    for k, size in enumerate([7, 3, 12]):
        assert np.all(W[:, strata == k].sum(axis=1) == size)
    assert np.array_equal(W[10:30], patient_weights(strata, 50, seed=11, start=10, stop=30))
    assert not np.array_equal(W, patient_weights(strata, 50, seed=12))


def test_holm_hand_worked():
    # sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04); NaN stays out of the family
    assert np.allclose(holm([0.04, 0.01, np.nan, 0.02])[[0, 1, 3]], [0.04, 0.03, 0.04])
    assert np.isnan(holm([0.04, 0.01, np.nan, 0.02])[2])
    assert np.allclose(holm([0.5, 0.6]), [1.0, 1.0])


def test_bootstrap_p_value_and_interval():
    assert bootstrap_p_value(np.ones(99)) == pytest.approx(2 / 100)
    assert bootstrap_p_value(np.r_[np.ones(50), -np.ones(50)]) == 1.0
    lo, hi, used = percentile_interval(np.r_[np.arange(101.0), np.nan])
    assert (lo, hi, used) == (2.5, 97.5, 101)


def test_group_auroc_point_estimates_equal_sklearn():
    rng = np.random.default_rng(5)
    n = 800
    pid = rng.integers(0, 300, n)
    y = rng.integers(0, 2, n)
    s = rng.random(n) + 0.5 * y
    g = rng.integers(0, 4, n)
    out = bootstrap_group_auroc(y, s, pid, g, n_boot=50, seed=0)
    for row in out.itertuples():
        m = g.astype(str) == row.group
        assert row.value == pytest.approx(roc_auc_score(y[m], s[m]), abs=1e-12)
        assert row.ci_low <= row.value <= row.ci_high
        assert row.n_patients == len(np.unique(pid[m]))


def test_image_level_resampling_would_be_wrong_here():
    # The same data resampled by patient gives a wider interval than pretending the images are independent.
    rng = np.random.default_rng(2)
    n_pat, per = 120, 6
    yp = rng.random(n_pat) < 0.5
    pid = np.repeat(np.arange(n_pat), per)
    y = np.repeat(yp, per)
    s = 0.8 * y + np.repeat(rng.normal(0, 1, n_pat), per) + rng.normal(0, 0.2, len(pid))
    by_patient = bootstrap_group_auroc(y, s, pid, np.zeros(len(pid)), n_boot=300, seed=0)
    by_image = bootstrap_group_auroc(y, s, np.arange(len(pid)), np.zeros(len(pid)), n_boot=300, seed=0)
    width = lambda r: float(r.ci_high[0] - r.ci_low[0])  # noqa: E731
    assert width(by_patient) > 1.5 * width(by_image)
    assert isinstance(by_patient, pd.DataFrame)


def test_seed_stage_variance_is_the_unbiased_variance_of_a_seed_mean():
    from bench.metrics.bootstrap import combine_seeds, seed_note, seed_weights

    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        x = rng.normal(0, 1, n)
        reps = np.repeat(x[:, None], 20000, axis=1)  # the same value on every patient replicate
        out = combine_seeds(reps, seed_weights(n, 20000, 0, 7))
        assert out.mean() == pytest.approx(x.mean(), abs=0.02)
        assert out.var() == pytest.approx(np.var(x, ddof=1) / n, rel=0.05)
    # one seed, or no seed stage: the plain mean over seeds
    assert np.allclose(combine_seeds(np.array([[0.3, 0.4]]), seed_weights(1, 2, 0, 1)), [0.3, 0.4])
    assert np.allclose(combine_seeds(np.array([[0.0, 1.0], [1.0, np.nan]]), None), [0.5, 1.0])
    assert seed_note(3, 5) == "" and seed_note(2, 5).startswith("few_seeds: 2 and 5")
    assert "not estimable" in seed_note(1, 3)


def test_bca_interval_hand_worked_cases():
    from scipy.stats import skew
    from scipy.stats import t as t_dist

    from bench.metrics.bootstrap import acceleration, bca_interval, expanded_z, jackknife_weights

    # expansion: sqrt(n / (n - 1)) t_{n-1}; none without a sample size
    assert expanded_z(10)[1] == pytest.approx(np.sqrt(10 / 9) * t_dist.ppf(0.975, 9))
    assert expanded_z(None)[1] == pytest.approx(norm.ppf(0.975))
    # no bias (point at the median), no skewness: the percentile interval at the expanded levels
    reps = np.linspace(0, 1, 10001)
    lo, hi, used = bca_interval(reps, 0.5, np.array([-1.0, 0.0, 1.0]), None)
    assert (lo, hi, used) == (pytest.approx(0.025), pytest.approx(0.975), 10001)
    # bias only: point at the 30th percentile of uniform replicates -> z0 = Phi^-1(0.3)
    z0 = norm.ppf(0.3)
    lo, hi, _ = bca_interval(reps, 0.3, np.zeros(5), None)
    assert (lo, hi) == (
        pytest.approx(norm.cdf(2 * z0 - 1.959964), abs=1e-4),
        pytest.approx(norm.cdf(2 * z0 + 1.959964), abs=1e-4),
    )
    # the point outside the replicates' central 95%: the percentile interval, not both limits at one end
    assert bca_interval(reps, 0.01, np.zeros(5), None)[:2] == (pytest.approx(0.025), pytest.approx(0.975))
    # acceleration of the mean from the leave-one-out jackknife is skewness / (6 sqrt(n)) (biased skewness)
    x = np.random.default_rng(0).exponential(size=50)
    jack = (x.sum() - x) / (len(x) - 1)
    assert acceleration(jack) == pytest.approx(skew(x) / (6 * np.sqrt(len(x))), rel=1e-9)
    # delete-a-group jackknife: leave-one-out below the block count, each patient left out exactly once
    W = jackknife_weights(np.array([0, 1, 0, 1, 1]), blocks=100)
    assert W.shape == (5, 5) and np.all((1 - W).sum(axis=0) == 1) and np.all((1 - W).sum(axis=1) == 1)
    W = jackknife_weights(np.repeat([0, 1], [300, 100]), blocks=100)
    assert W.shape == (100, 400) and np.all((1 - W).sum(axis=0) == 1)
    assert np.all((1 - W)[:, :300].sum(axis=1) == 3)  # every group draws from every stratum
