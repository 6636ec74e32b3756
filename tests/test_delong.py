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


def test_clustered_delong_equals_delong_with_one_case_per_cluster():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.4
    s1 = y + rng.normal(0, 1, 300)
    s2 = 0.5 * y + rng.normal(0, 1, 300)
    plain = delong_test(y, s1, s2)
    clus = delong_test(y, s1, s2, cluster=np.arange(300))
    assert clus.se == pytest.approx(plain.se, rel=1e-12) and clus.p_value == pytest.approx(plain.p_value)


def test_clustered_delong_widens_with_shared_patient_errors():
    # Four images per patient share the patient's error: the clustered standard error is larger than DeLong's,
    # which counts every image as an independent case.
    rng = np.random.default_rng(4)
    n_pat, per = 150, 4
    yp = rng.random(n_pat) < 0.5
    pid = np.repeat(np.arange(n_pat), per)
    y = yp[pid]
    u1, u2 = rng.normal(0, 1, n_pat), rng.normal(0, 1, n_pat)
    s1 = y + u1[pid] + rng.normal(0, 0.2, len(y))
    s2 = y + u2[pid] + rng.normal(0, 0.2, len(y))
    plain = delong_test(y, s1, s2)
    clus = delong_test(y, s1, s2, cluster=pid)
    assert clus.se > 1.5 * plain.se


def test_delong_seeds_adds_seed_variance():
    from bench.metrics.delong import delong_seeds

    rng = np.random.default_rng(5)
    y = rng.random(400) < 0.5
    A = np.vstack([y + rng.normal(0, 1, 400) for _ in range(3)])
    B = np.vstack([y + rng.normal(0, 1, 400) for _ in range(3)])
    pid = np.arange(400)
    res = delong_seeds(y, A, B, pid)
    aucs = [roc_auc_score(y, a) for a in A], [roc_auc_score(y, b) for b in B]
    assert res.auc1 == pytest.approx(np.mean(aucs[0])) and res.auc2 == pytest.approx(np.mean(aucs[1]))
    seed_var = np.var(aucs[0], ddof=1) / 3 + np.var(aucs[1], ddof=1) / 3
    # by hand from the definition: DeLong's variance of the difference of the seed-averaged components
    n, m = (~y).sum(), y.sum()
    v10 = [np.mean([_psi(a[y], a[~y]).mean(axis=1) for a in X], axis=0) for X in (A, B)]
    v01 = [np.mean([_psi(a[y], a[~y]).mean(axis=0) for a in X], axis=0) for X in (A, B)]
    test_var = np.var(v10[0] - v10[1], ddof=1) / m + np.var(v01[0] - v01[1], ddof=1) / n
    assert res.se**2 == pytest.approx(test_var + seed_var, rel=1e-9)
