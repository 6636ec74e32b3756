"""Group metrics on plain arrays: per-group values, worst group, gaps, equalized odds.

The evaluation computes the same quantities on bootstrap replicates (`evaluate`); these helpers serve scripts and
users who hold arrays rather than a predictions table. Equalized-odds difference follows the usual definition: the
larger of the between-group range of the true-positive rate and that of the false-positive rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bench.metrics.core import Metric


def by_group(metric: Metric, y_true: Any, y_score: Any, groups: Any, sample_weight: Any = None) -> pd.Series:
    """The metric within each group (sorted by group), NaN where undefined."""
    y = np.asarray(y_true)
    s = np.asarray(y_score)
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
    g = pd.Series(np.asarray(groups)).astype(str)
    out = {}
    for name, idx in g.groupby(g, sort=True).indices.items():
        out[name] = metric(y[idx], s[idx], None if w is None else w[idx])
    return pd.Series(out, dtype=float)


def worst_group(values: pd.Series, higher_is_better: bool) -> tuple[str, float]:
    v = values.dropna()
    if v.empty:
        return "", float("nan")
    name = v.idxmin() if higher_is_better else v.idxmax()
    return str(name), float(v[name])


def gap(values: pd.Series) -> float:
    v = values.dropna()
    return float(v.max() - v.min()) if len(v) else float("nan")


def _rates(y_true: Any, y_pred: Any, groups: Any) -> pd.DataFrame:
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    g = pd.Series(np.asarray(groups)).astype(str)
    rows = {}
    for name, idx in g.groupby(g, sort=True).indices.items():
        yy, pp = y[idx], p[idx]
        tpr = (yy & pp).sum() / yy.sum() if yy.any() else np.nan
        fpr = (~yy & pp).sum() / (~yy).sum() if (~yy).any() else np.nan
        rows[name] = {"tpr": tpr, "fpr": fpr, "fnr": 1 - tpr}
    return pd.DataFrame.from_dict(rows, orient="index")


def equalized_odds_difference(y_true: Any, y_pred: Any, sensitive_features: Any) -> float:
    """max(TPR range, FPR range) across groups of hard 0/1 predictions."""
    r = _rates(y_true, y_pred, sensitive_features)
    return float(max(gap(r["tpr"]), gap(r["fpr"])))


def fnr_gap(y_true: Any, y_pred: Any, sensitive_features: Any) -> float:
    """Range of the false-negative rate across groups (underdiagnosis)."""
    return gap(_rates(y_true, y_pred, sensitive_features)["fnr"])
