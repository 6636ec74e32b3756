"""DeLong's test against a direct O(n^2) implementation of its definition."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from bench.metrics.delong import delong_test, delong_variance, midrank


def _psi(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])


def direct_delong(y, s1, s2):
    """DeLong et al. (1988) written out with the pairwise kernel matrix."""
    y = np.asarray(y, bool)
    out_v10, out_v01, aucs = [], [], []
    for s in (np.asarray(s1, float), np.asarray(s2, float)):
        K = _psi(s[y], s[~y])  # positives x negatives
        aucs.append(K.mean())
        out_v10.append(K.mean(axis=1))
        out_v01.append(K.mean(axis=0))
    m, n = y.sum(), (~y).sum()
    S10 = np.cov(np.vstack(out_v10))
    S01 = np.cov(np.vstack(out_v01))
    var = (S10[0, 0] + S10[1, 1] - 2 * S10[0, 1]) / m + (S01[0, 0] + S01[1, 1] - 2 * S01[0, 1]) / n
    z = (aucs[0] - aucs[1]) / np.sqrt(var)
    single_var = S10[0, 0] / m + S01[0, 0] / n
    return aucs[0], aucs[1], z, 2 * norm.sf(abs(z)), single_var


@pytest.mark.parametrize("seed", range(6))
def test_delong_equals_quadratic_definition(seed):
    rng = np.random.default_rng(seed)
    n = 150
    y = rng.random(n) < 0.35
    s1 = np.round(rng.normal(size=n) + 1.0 * y, 1)  # ties within and across classes
    s2 = np.round(s1 * 0.5 + rng.normal(size=n) + 0.6 * y, 1)
    a1, a2, z, p, v1 = direct_delong(y, s1, s2)
    res = delong_test(y, s1, s2)
    assert res.auc1 == pytest.approx(a1, abs=1e-12)
    assert res.auc2 == pytest.approx(a2, abs=1e-12)
    assert res.auc1 == pytest.approx(roc_auc_score(y, s1), abs=1e-12)
    assert res.z == pytest.approx(z, rel=1e-9)
    assert res.p_value == pytest.approx(p, rel=1e-9)
    auc, var = delong_variance(y, s1)
    assert auc == pytest.approx(a1) and var == pytest.approx(v1, rel=1e-9)


def test_identical_scores_give_p_one_and_undefined_gives_nan():
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.9, 0.3, 0.7, 0.2, 0.4])
    assert delong_test(y, s, s).p_value == 1.0
    assert np.isnan(delong_test(np.ones(5), s[:5], s[:5]).p_value)


def test_midrank_hand_worked():
    assert midrank(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
