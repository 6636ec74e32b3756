"""Metric functions against scikit-learn and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, brier_score_loss, roc_auc_score

from bench.metrics import (
    REGISTRY,
    auroc,
    auroc_macro,
    balanced_accuracy,
    brier,
    choose_threshold,
    ece,
    get_metric,
    sensitivity,
    specificity,
)


def _probs(rng, n, k):
    P = rng.random((n, k)) ** 2
    return P / P.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties_and_weights(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    w = rng.integers(0, 4, 300).astype(float)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 400)
    P = _probs(rng, 400, 4)
    P[np.arange(400), y] += 0.3
    P /= P.sum(axis=1, keepdims=True)
    assert auroc_macro(y, P) == pytest.approx(
        roc_auc_score(y, P, multi_class="ovr", average="macro"), abs=1e-12
    )
    for k in range(4):
        m = get_metric(f"auroc_c{k}", classes=["c0", "c1", "c2", "c3"])
        assert m(y, P) == pytest.approx(roc_auc_score(y == k, P[:, k]), abs=1e-12)
    assert balanced_accuracy(y, P) == pytest.approx(balanced_accuracy_score(y, P.argmax(1)), abs=1e-12)
    assert brier(y, P) == pytest.approx(brier_score_loss(y, P, labels=[0, 1, 2, 3]), abs=1e-12)
    w = rng.random(400)
    assert brier(y, P, w) == pytest.approx(
        brier_score_loss(y, P, sample_weight=w, labels=[0, 1, 2, 3]), abs=1e-12
    )


def test_binary_brier_matches_sklearn_positive_class_form():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = rng.random(200)
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert brier(y, np.column_stack([1 - p, p])) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def test_hand_worked_auroc_with_tie():
    # positives 0.8, 0.4 ; negatives 0.4, 0.1 -> pairs: (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=0.5, (0.4>0.1)=1
    assert auroc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)


def test_hand_worked_sensitivity_specificity():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.5, 0.2, 0.6, 0.3, 0.1, 0.5])
    # called positive: s >= 0.5 -> TP 2 of 3, TN: 0.3, 0.1 -> 2 of 4
    assert sensitivity(y, s, threshold=0.5) == pytest.approx(2 / 3)
    assert specificity(y, s, threshold=0.5) == pytest.approx(2 / 4)
    assert np.isnan(sensitivity(y, s, threshold=float("nan")))


def test_hand_worked_ece_two_bins():
    # two bins: (0, 0.5] and (0.5, 1]; top-label confidences 0.9, 0.8 (bin 2), 0.5 (bin 1)
    P = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    y = np.array([0, 0, 0])  # correct, wrong, correct (argmax ties pick class 0)
    # bin 2: conf mean 0.85, acc 0.5 -> |0.35| * 2/3 ; bin 1: conf 0.5, acc 1 -> 0.5 * 1/3
    assert ece(y, P, n_bins=2) == pytest.approx(0.35 * 2 / 3 + 0.5 / 3)


def test_choose_threshold_reaches_target_specificity_with_most_sensitivity():
    y = np.array([0] * 10 + [1] * 5)
    s = np.array([0.1 * i for i in range(10)] + [0.05, 0.75, 0.85, 0.95, 0.99])
    t = choose_threshold(y, s, 0.8)
    # 8 of 10 negatives below t needs t > 0.7 ; the smallest attained score above 0.7 is 0.75
    assert t == pytest.approx(0.75)
    assert specificity(y, s, threshold=t) >= 0.8
    assert sensitivity(y, s, threshold=t) == pytest.approx(4 / 5)
    assert np.isnan(choose_threshold(np.ones(3), [0.1, 0.2, 0.3], 0.9))


def test_undefined_cases_give_nan_and_reason_never_raise():
    assert np.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert auroc.undefined_reason([1, 1, 1]) == "no negative cases (binary view)"
    assert auroc.undefined_reason([0, 0]) == "no positive cases (binary view)"
    assert np.isnan(auroc_macro([2, 2], np.full((2, 3), 1 / 3)))
    assert auroc_macro.undefined_reason([2, 2]) == "only one class present"
    assert np.isnan(auroc([], []))
    assert np.isnan(balanced_accuracy([], np.zeros((0, 3))))
    assert auroc.undefined_reason([]) == "no cases"


def test_registry_directions_and_unknown_names():
    assert {n: m.higher_is_better for n, m in REGISTRY.items()} == {
        "auroc": True,
        "auroc_<class>": True,
        "auroc_macro": True,
        "balanced_accuracy": True,
        "sensitivity": True,
        "specificity": True,
        "ece": False,
        "brier": False,
        "dice_macro": True,
        "dice_<class>": True,
        "lesion_f1_macro": True,
        "lesion_f1_<class>": True,
        "instance_dice": True,
        "hd95_macro": False,
    }
    assert get_metric("auroc_disc", classes=["blank", "disc"]).higher_is_better
    with pytest.raises(KeyError, match="unknown metric"):
        get_metric("f1")


def test_macro_auroc_is_over_the_fixed_class_set():
    # class 2 has no cases: the macro AUROC over the task's three classes is undefined, not a mean over two
    y = np.array([0, 0, 1, 1])
    P = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    assert np.isnan(auroc_macro(y, P))
    y3 = np.array([0, 0, 1, 1, 2, 2])
    P3 = np.vstack([P, [[0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]])
    assert auroc_macro(y3, P3) == pytest.approx(roc_auc_score(y3, P3, multi_class="ovr", average="macro"))
    # in a bootstrap replicate that loses class 2 the value is undefined (and counted), never a 2-class mean
    kern = auroc_macro.kernel(y3, P3)
    W = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=float)
    out = kern(W)
    assert np.isfinite(out[0]) and np.isnan(out[1])
