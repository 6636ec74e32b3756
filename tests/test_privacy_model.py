"""Membership inference against trained models: the attack's metrics against references, and its known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from bench.privacy.attack import (
    attack_loop_reference,
    attack_metrics,
    confidence_from_proba,
    lira_offline,
    logit_confidence,
    patient_weights,
)
from bench.privacy.model import match_class_mix, membership_attack, model_confidence


def _sk_metrics(scores, member, fpr_max=0.01):
    fpr, tpr, _ = roc_curve(member, scores)
    return roc_auc_score(member, scores), tpr[fpr <= fpr_max + 1e-12].max(), np.max(tpr - fpr)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_with_ties_and_under_bootstrap_weights(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    member = rng.random(n) < 0.4
    scores = np.round(rng.normal(size=n) + 0.4 * member, 1)  # rounded: many ties
    m = attack_metrics(scores, member)
    auc, tpr, adv = _sk_metrics(scores, member)
    assert m["auroc"][0] == pytest.approx(auc, abs=1e-12)
    assert m["tpr_at_1pct_fpr"][0] == pytest.approx(tpr, abs=1e-12)
    assert m["advantage"][0] == pytest.approx(adv, abs=1e-12)
    # A weighted replicate equals the metrics of the images repeated by their weights.
    w, _ = patient_weights(np.arange(n) // 3, 4, rng)
    mb = attack_metrics(scores, member, w)
    for b in range(4):
        rep = np.repeat(np.arange(n), w[b].astype(int))
        auc, tpr, adv = _sk_metrics(scores[rep], member[rep])
        assert mb["auroc"][b] == pytest.approx(auc, abs=1e-10)
        assert mb["tpr_at_1pct_fpr"][b] == pytest.approx(tpr, abs=1e-10)
        assert mb["advantage"][b] == pytest.approx(adv, abs=1e-10)


def test_vectorised_attack_equals_the_loop_reference():
    rng = np.random.default_rng(3)
    n = 500
    member = rng.random(n) < 0.5
    ref = rng.normal(size=(3, n)) + rng.normal(size=n)
    target = ref.mean(0) + 0.5 * rng.normal(size=n) + 0.5 * member
    scores, info = lira_offline(target, ref)
    m = attack_metrics(scores, member)
    assert info == {"calibrated": True, "n_reference": 3, "variance": "fixed"}
    got = (m["auroc"][0], m["tpr_at_1pct_fpr"][0], m["advantage"][0])
    assert got == pytest.approx(attack_loop_reference(target, ref, member), abs=1e-12)


def test_patient_weights_draw_whole_patients():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.array(["a", "b", "c", "d"]), [1, 2, 3, 4])
    w, uniq = patient_weights(patients, 50, rng)
    assert list(uniq) == ["a", "b", "c", "d"]
    # Every image of a patient carries the patient's draw count; each replicate draws four patients.
    for p in uniq:
        cols = w[:, patients == p]
        assert (cols == cols[:, :1]).all()
    assert (w[:, [0, 1, 3, 6]].sum(axis=1) == 4).all()


def test_logit_confidence_matches_the_probability_form_and_does_not_saturate():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 4)) * 3
    y = rng.integers(0, 4, 200)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(logit_confidence(z, y), confidence_from_proba(p, y), atol=1e-9)
    big = np.array([[60.0, 0.0, 0.0]])
    assert logit_confidence(big, np.array([0]))[0] == pytest.approx(60 - np.log(2), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_calibration_removes_per_example_difficulty(seed):
    # Examples differ in difficulty far more than members differ from non-members: the bare confidence barely
    # separates them, the reference-calibrated score does.
    rng = np.random.default_rng(seed)
    n = 2000
    member = rng.random(n) < 0.5
    difficulty = rng.normal(0, 3, n)
    refs = difficulty + rng.normal(0, 0.3, (8, n))
    target = difficulty + rng.normal(0, 0.3, n) + 0.6 * member
    raw = attack_metrics(lira_offline(target, None)[0], member)["auroc"][0]
    cal = attack_metrics(lira_offline(target, refs)[0], member)["auroc"][0]
    assert raw < 0.6 < 0.85 < cal


def test_non_members_take_the_members_class_mix():
    rng = np.random.default_rng(0)
    label_of = pd.Series(
        ["a"] * 30 + ["b"] * 10 + ["a"] * 20 + ["b"] * 40, index=[f"p{i}" for i in range(100)]
    )
    members = [f"p{i}" for i in range(40)]  # 3:1
    cand = [f"p{i}" for i in range(40, 100)]  # 20 a, 40 b
    chosen = match_class_mix(members, cand, label_of, rng)
    counts = label_of.reindex(chosen).value_counts()
    assert counts["a"] == 20 and counts["b"] == 6
    assert set(chosen) <= set(cand)


# -- known answers with trained models ----------------------------------------------------------------------------


def _patients(rng, n_patients, per_patient=2, size=16):
    """Noise images with random labels: a model can only fit them by memorizing its training patients."""
    x = rng.integers(0, 256, (n_patients * per_patient, 1, size, size), dtype=np.uint8)
    y = np.repeat(rng.integers(0, 2, n_patients), per_patient)
    pid = np.repeat(np.arange(n_patients), per_patient)
    return x, y, pid


def memorizer_settings(backbone: str, num_classes: int, seed: int, epochs: int):
    """Training settings under which a small network fits noise only by memorizing it (no augmentation, no decay)."""
    from bench.train import FitSettings

    return FitSettings(
        backbone=backbone,
        num_classes=num_classes,
        epochs=epochs,
        lr=0.003,
        weight_decay=0.0,
        batch_size=50,
        aug_strength=0.0,
        seed=seed,
        device="cpu",
    )


def _fit(x, y, seed, epochs):
    from bench.train import fit

    model, _ = fit(memorizer_settings("resnet10t", 2, seed, epochs), x, y, x[:8], y[:8])
    return model


def _known_answers(seed, epochs=25, n=50):
    """Attack AUROC intervals of a model trained on 50 patients (A) and of one trained on disjoint patients (D),
    members A, non-members B, the reference model trained on C: the product's scoring and attack."""
    rng = np.random.default_rng(seed)
    x, y, pid = _patients(rng, 4 * n)
    group = pid // n  # 0 A, 1 B, 2 C, 3 D
    target = _fit(x[group == 0], y[group == 0], seed, epochs)
    disjoint = _fit(x[group == 3], y[group == 3], seed + 100, epochs)
    ref = _fit(x[group == 2], y[group == 2], seed + 200, epochs)
    # Non-members from B with A's class mix, as the audit picks them (a model's class bias cannot then pass for
    # membership).
    label_of = pd.Series(y[::2].astype(str), index=[str(p) for p in pid[::2]])
    members = [str(p) for p in np.unique(pid[group == 0])]
    cand = [str(p) for p in np.unique(pid[group == 1])]
    chosen = set(members) | set(match_class_mix(members, cand, label_of, rng))
    ab = np.isin(pid.astype(str), list(chosen))
    phi_ref = model_confidence(ref, x[ab], y[ab])[None]
    member = group[ab] == 0
    out = []
    for model in (target, disjoint):
        r = membership_attack(
            model_confidence(model, x[ab], y[ab]), phi_ref, member, pid[ab], n_boot=400, seed=seed
        )
        out.append(r["metrics"]["auroc"])
    return out


def test_memorizing_model_leaks_and_a_disjoint_model_does_not():
    mem, dis = _known_answers(seed=0)
    assert mem["ci_low"] > 0.5, mem
    assert dis["ci_low"] <= 0.5 <= dis["ci_high"], dis


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_memorizing_model_leaks_and_a_disjoint_model_does_not_across_draws(seed):
    mem, dis = _known_answers(seed=seed)
    assert mem["ci_low"] > 0.5, mem
    assert dis["ci_low"] <= 0.5 <= dis["ci_high"], dis


def test_the_board_figure_places_each_record_by_leakage_and_utility():
    from bench.leaderboard.model_privacy import model_privacy_svg

    est = lambda v, lo, hi: {"value": v, "ci_low": lo, "ci_high": hi}  # noqa: E731
    rows = [
        {"name": "real-only", "model_leak": est(0.69, 0.62, 0.76), "utility": est(0.75, 0.72, 0.78)},
        {"name": "pca-gmm", "model_leak": est(0.65, 0.58, 0.72), "utility": est(0.72, 0.69, 0.75)},
        {"name": "no-audit", "model_leak": None, "utility": est(0.70, 0.66, 0.74)},
    ]
    svg = model_privacy_svg(rows, {"primary_metric": "auroc_macro", "split": "external"})
    assert svg.count("<circle") == 2  # a record without an audit is not placed
    assert "real-only: attack AUROC 0.690, utility 0.750" in svg
    assert "pca-gmm: attack AUROC 0.650, utility 0.720" in svg
    # Higher utility is drawn higher (smaller y), less leakage further left (smaller x).
    import re

    pos = {
        n: (float(x), float(y))
        for x, y, n in re.findall(r'cx="([\d.]+)" cy="([\d.]+)" r="5".*?<title>(\S+):', svg)
    }
    assert pos["real-only"][1] < pos["pca-gmm"][1] and pos["pca-gmm"][0] < pos["real-only"][0]
    assert "No record carries" in model_privacy_svg(rows[2:], {})
