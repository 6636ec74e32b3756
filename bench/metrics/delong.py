"""DeLong's test for AUROC (DeLong, DeLong & Clarke-Pearson 1988), in O(n log n) via mid-ranks (Sun & Xu 2014),
with one sort per score.

`delong_test(..., cluster=patient_id)` is Obuchowski's (1997) clustered form: structural components are summed
per patient, so several images of one patient are not counted as independent evidence; with one case per cluster
it equals DeLong's. `delong_seeds` compares two training procedures, each with several training seeds: the AUROC
of an arm is the mean over its seeds (as in the metric table), its components are the seed-averaged components,
and the seed-to-seed variance of each arm's mean (sample variance / seeds) is added to the clustered variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm


def midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    x = np.asarray(x, dtype=float)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values
    new = np.empty(n, dtype=bool)
    if n:
        new[0] = True
        new[1:] = xs[1:] != xs[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n)
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    run_of = np.cumsum(new) - 1
    out = np.empty(n)
    out[order] = avg[run_of]
    return out


def _components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROCs and the structural components V10 (per positive) and V01 (per negative) for each score row.

    One sort per score: within a block of tied scores holding P_b positives and N_b negatives, with CP_b and CN_b
    positives and negatives in earlier blocks, a positive's component is (CN_b + N_b / 2) / n and a negative's is
    1 - (CP_b + P_b / 2) / m. This is the mid-rank formulation (combined rank minus within-class rank) without
    ranking three times.
    """
    m, n = int(y.sum()), int((~y).sum())
    k = scores.shape[0]
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    aucs = np.empty(k)
    for r in range(k):
        s = scores[r]
        order = np.argsort(s)  # tied scores form one block, so the sort need not be stable
        ss = s[order]
        new = np.empty(len(ss), dtype=bool)
        new[0] = True
        np.not_equal(ss[1:], ss[:-1], out=new[1:])
        block = np.cumsum(new) - 1  # tie block of each sorted case
        yo = y[order]
        nb = block[-1] + 1
        P = np.bincount(block, weights=yo, minlength=nb)
        N = np.bincount(block, weights=~yo, minlength=nb)
        CP = np.cumsum(P) - P
        CN = np.cumsum(N) - N
        pos_block = np.empty(len(s), dtype=np.int64)
        pos_block[order] = block
        v10[r] = (CN + N / 2)[pos_block[y]] / n
        v01[r] = 1.0 - (CP + P / 2)[pos_block[~y]] / m
        aucs[r] = v10[r].mean()
    return aucs, v10, v01


@dataclass(frozen=True)
class DeLongResult:
    auc1: float
    auc2: float
    diff: float  # auc1 - auc2
    se: float
    z: float
    p_value: float
    n_pos: int
    n_neg: int


def delong_variance(y_true: Any, score: Any) -> tuple[float, float]:
    """(AUROC, DeLong variance) of a single score."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=float)[None, :]
    if y.all() or not y.any():
        return float("nan"), float("nan")
    aucs, v10, v01 = _components(y, s)
    var = np.var(v10[0], ddof=1) / v10.shape[1] + np.var(v01[0], ddof=1) / v01.shape[1]
    return float(aucs[0]), float(var)


def clustered_covariance(
    y: np.ndarray, aucs: np.ndarray, v10: np.ndarray, v01: np.ndarray, cluster: Any
) -> np.ndarray:
    """Obuchowski's (1997) covariance matrix of the AUROCs from per-case structural components and cluster ids."""
    codes = np.unique(np.asarray(cluster), return_inverse=True)[1].ravel()
    n_cl = int(codes.max()) + 1
    pos, neg = codes[y], codes[~y]
    m, n = len(pos), len(neg)
    mi = np.bincount(pos, minlength=n_cl).astype(float)
    ni = np.bincount(neg, minlength=n_cl).astype(float)
    X = np.vstack([np.bincount(pos, weights=v, minlength=n_cl) for v in v10]) - aucs[:, None] * mi
    Y = np.vstack([np.bincount(neg, weights=v, minlength=n_cl) for v in v01]) - aucs[:, None] * ni
    i10, i01, i_all = int((mi > 0).sum()), int((ni > 0).sum()), int(((mi + ni) > 0).sum())
    if i10 < 2 or i01 < 2:
        return np.full((len(aucs), len(aucs)), np.nan)
    s10 = i10 / ((i10 - 1) * m) * (X @ X.T)
    s01 = i01 / ((i01 - 1) * n) * (Y @ Y.T)
    s11 = i_all / (i_all - 1) * (X @ Y.T)
    return s10 / m + s01 / n + (s11 + s11.T) / (m * n)


def _result(aucs: np.ndarray, var: float, m: int, n: int) -> DeLongResult:
    diff = float(aucs[0] - aucs[1])
    if not np.isfinite(var):
        nan = float("nan")
        return DeLongResult(float(aucs[0]), float(aucs[1]), diff, nan, nan, nan, m, n)
    if var <= 0:
        # identical rankings: no evidence of a difference
        z = 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
        se = 0.0
    else:
        se = float(np.sqrt(var))
        z = diff / se
    p = float(2 * norm.sf(abs(z)))
    return DeLongResult(float(aucs[0]), float(aucs[1]), diff, se, z, p, m, n)


def delong_test(y_true: Any, score1: Any, score2: Any, cluster: Any = None) -> DeLongResult:
    """Paired two-sided test of AUROC(score1) == AUROC(score2) on the same cases. Undefined cases give NaN.

    `cluster` (e.g. patient ids, one per case) gives Obuchowski's clustered variance.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.vstack([np.asarray(score1, dtype=float), np.asarray(score2, dtype=float)])
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        nan = float("nan")
        return DeLongResult(nan, nan, nan, nan, nan, nan, m, n)
    aucs, v10, v01 = _components(y, s)
    if cluster is None:
        cov = np.cov(v10) / m + np.cov(v01) / n
    else:
        cov = clustered_covariance(y, aucs, v10, v01, cluster)
    return _result(aucs, float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), m, n)


def delong_seeds(y_true: Any, scores1: Any, scores2: Any, cluster: Any) -> DeLongResult:
    """Clustered DeLong test of two training procedures given (seeds, cases) score matrices of each arm.

    Each arm's AUROC is its mean over seeds; the variance is Obuchowski's clustered variance of the seed-averaged
    components plus var_seeds(AUROC) / seeds for each arm (zero for an arm with one seed: flag such comparisons).
    """
    y = np.asarray(y_true).astype(bool)
    a = np.atleast_2d(np.asarray(scores1, dtype=float))
    b = np.atleast_2d(np.asarray(scores2, dtype=float))
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        nan = float("nan")
        return DeLongResult(nan, nan, nan, nan, nan, nan, m, n)
    auc_a, v10_a, v01_a = _components(y, a)
    auc_b, v10_b, v01_b = _components(y, b)
    aucs = np.array([auc_a.mean(), auc_b.mean()])
    v10 = np.vstack([v10_a.mean(axis=0), v10_b.mean(axis=0)])
    v01 = np.vstack([v01_a.mean(axis=0), v01_b.mean(axis=0)])
    cov = clustered_covariance(y, aucs, v10, v01, cluster)
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    for arm in (auc_a, auc_b):
        if len(arm) > 1:
            var += float(np.var(arm, ddof=1)) / len(arm)
    return _result(aucs, var, m, n)
