"""Group metrics of the evaluation against fairlearn's MetricFrame on seeded random predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, equalized_odds_difference, false_negative_rate, true_positive_rate
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from bench.metrics import choose_threshold, evaluate_predictions, fairness
from bench.metrics.core import auroc
from bench.metrics.simulate import simulate_predictions
from bench.tasks import Task
from tests.conftest import TINY_TASK


@pytest.fixture
def setup():
    task = Task.model_validate(
        {**TINY_TASK, "metrics": {**TINY_TASK["metrics"], "min_patients": 1, "min_positives": 1}}
    )
    preds = simulate_predictions(task, runs={("none", "real"): 1.0}, seeds=[0], patients_per_site=60, seed=4)
    table = evaluate_predictions(preds, task, n_boot=20, seed=0)
    return task, preds, table


def _test_rows(task, preds):
    t = preds[preds["split"] == "test"]
    y = pd.Categorical(t["y_true"], categories=task.classes).codes
    ybin = t["y_true"].isin(task.labels.binary_view.positive).to_numpy()
    sbin = t[[f"prob_{c}" for c in task.labels.binary_view.positive]].sum(axis=1).to_numpy()
    return t, y, ybin, sbin


@pytest.mark.parametrize("col", ["sex", "age_group"])
def test_subgroup_metrics_equal_metricframe(setup, col):
    task, preds, table = setup
    t, y, ybin, sbin = _test_rows(task, preds)
    val = preds[preds["split"] == "val"]
    thr = choose_threshold(
        val["y_true"].isin(["disc", "bar"]), val[["prob_disc", "prob_bar"]].sum(axis=1), 0.8
    )
    P = t[[f"prob_{c}" for c in task.classes]].to_numpy()
    mf = MetricFrame(
        metrics={
            "auroc": lambda yt, yp: roc_auc_score(yt[:, 0], yp[:, 0]),
            "balanced_accuracy": lambda yt, yp: balanced_accuracy_score(yt[:, 1], yp[:, 1]),
            "sensitivity": lambda yt, yp: true_positive_rate(yt[:, 0], yp[:, 2]),
        },
        y_true=np.column_stack([ybin, y]),
        y_pred=np.column_stack([sbin, P.argmax(1), sbin >= thr]),
        sensitive_features=t[col].to_numpy(),
    )
    rows = table[(table["scope"] == "subgroup") & (table["split"] == "test") & (table["group_by"] == col)]
    for metric in ("auroc", "balanced_accuracy", "sensitivity"):
        got = rows[rows["metric"] == metric].set_index("group")["value"]
        want = mf.by_group[metric]
        assert sorted(got.index) == sorted(map(str, want.index))
        for g, v in want.items():
            assert got[str(g)] == pytest.approx(v, abs=1e-12), (metric, g)
        gap = rows[rows["metric"] == f"{metric}_gap"]["value"].iloc[0]
        assert gap == pytest.approx(mf.difference()[metric], abs=1e-12)
        worst = rows[rows["metric"] == f"{metric}_worst"]
        assert worst["value"].iloc[0] == pytest.approx(mf.group_min()[metric], abs=1e-12)
        assert worst["group"].iloc[0] == str(mf.by_group[metric].idxmin())
    eod = rows[rows["metric"] == "equalized_odds_difference"]["value"].iloc[0]
    assert eod == pytest.approx(
        equalized_odds_difference(ybin, sbin >= thr, sensitive_features=t[col]), abs=1e-12
    )
    fnr = MetricFrame(metrics=false_negative_rate, y_true=ybin, y_pred=sbin >= thr, sensitive_features=t[col])
    assert rows[rows["metric"] == "fnr_gap"]["value"].iloc[0] == pytest.approx(fnr.difference(), abs=1e-12)


def test_array_helpers_equal_fairlearn():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 500)
    pred = rng.random(500) < 0.3 + 0.4 * y
    g = rng.choice(["a", "b", "c"], 500)
    assert fairness.equalized_odds_difference(y, pred, g) == pytest.approx(
        equalized_odds_difference(y, pred, sensitive_features=g), abs=1e-12
    )
    fnr = MetricFrame(metrics=false_negative_rate, y_true=y, y_pred=pred, sensitive_features=g)
    assert fairness.fnr_gap(y, pred, g) == pytest.approx(fnr.difference(), abs=1e-12)
    s = rng.random(500) + 0.3 * y
    vals = fairness.by_group(auroc, y, s, g)
    mf = MetricFrame(metrics=roc_auc_score, y_true=y, y_pred=s, sensitive_features=g)
    assert np.allclose(vals.to_numpy(), mf.by_group.to_numpy(), atol=1e-12)
    assert fairness.worst_group(vals, True) == (str(mf.by_group.idxmin()), pytest.approx(mf.group_min()))


def test_excluded_and_insufficient_groups_are_shown_but_not_ranked(setup):
    task, preds, _ = setup
    p = preds.copy()
    test_rows = p.index[p["split"] == "test"][:16]  # 8 test patients, 2 images each
    p.loc[test_rows, "sex"] = "unknown"  # excluded from gaps by the task default
    table = evaluate_predictions(p, task, n_boot=20, seed=0, min_patients=1, min_positives=1)
    rows = table[(table["scope"] == "subgroup") & (table["split"] == "test") & (table["group_by"] == "sex")]
    unknown = rows[(rows["group"] == "unknown") & (rows["metric"] == "auroc")]
    assert unknown["status"].iloc[0] == "ok" and unknown["n_patients"].iloc[0] == 8
    assert "over 2 eligible groups" in rows[rows["metric"] == "auroc_gap"]["reason"].iloc[0]
    others = rows[(rows["metric"] == "auroc") & (rows["group"] != "unknown")]
    assert rows[rows["metric"] == "auroc_worst"]["value"].iloc[0] == pytest.approx(others["value"].min())
    big = evaluate_predictions(p, task, n_boot=20, seed=0, min_patients=10, min_positives=1)
    r = big[(big["scope"] == "subgroup") & (big["split"] == "test") & (big["group_by"] == "sex")]
    small = r[(r["group"] == "unknown") & (r["metric"] == "auroc")]
    assert small["status"].iloc[0] == "insufficient"
    assert "8 patients < min_patients 10" in small["reason"].iloc[0]
    # a value, never an interval, for a group below a minimum
    assert np.isfinite(small["value"].iloc[0]) and np.isnan(small[["ci_low", "ci_high"]].to_numpy()).all()
