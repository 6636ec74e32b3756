"""DeLong's test for AUROC (DeLong, DeLong & Clarke-Pearson 1988), in O(n log n) via mid-ranks (Sun & Xu 2014),
with one sort per score.

Cases are taken as independent here; the patient-clustered paired bootstrap in `compare` is the clustered
counterpart, and reports use both.
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


def delong_test(y_true: Any, score1: Any, score2: Any) -> DeLongResult:
    """Paired two-sided test of AUROC(score1) == AUROC(score2) on the same cases. Undefined cases give NaN."""
    y = np.asarray(y_true).astype(bool)
    s = np.vstack([np.asarray(score1, dtype=float), np.asarray(score2, dtype=float)])
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        nan = float("nan")
        return DeLongResult(nan, nan, nan, nan, nan, nan, m, n)
    aucs, v10, v01 = _components(y, s)
    s10 = np.cov(v10)
    s01 = np.cov(v01)
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    if var <= 0:
        # identical rankings: no evidence of a difference
        z = 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
        se = 0.0
    else:
        se = float(np.sqrt(var))
        z = diff / se
    p = float(2 * norm.sf(abs(z)))
    return DeLongResult(float(aucs[0]), float(aucs[1]), diff, se, z, p, m, n)
