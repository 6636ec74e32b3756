"""Patient-level scoring reaches the leaderboard: the record's `patient_level` and the page's column."""

from __future__ import annotations

import numpy as np
import yaml
from conftest import TINY_TASK
from sklearn.metrics import roc_auc_score

from bench.leaderboard.render import columns
from bench.leaderboard.score import score_submission
from bench.metrics.simulate import simulate_predictions
from bench.tasks import load_task


def _task(tmp_path, aggregation: str):
    spec = {**TINY_TASK, "metrics": {**TINY_TASK["metrics"], "patient_aggregation": aggregation}}
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_task(p)


def _macro_auroc(y: np.ndarray, p: np.ndarray, k: int) -> float:
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in range(k)]))


def test_record_carries_patient_level_primary_equal_to_a_direct_computation(tmp_path):
    task = _task(tmp_path, "mean")
    preds = simulate_predictions(task, runs={("none", "real"): 2.0}, seeds=(0,), images_per_patient=3)
    metrics, split = score_submission(preds, task, generator="none", primary="auroc_macro", n_boot=50, seed=0)
    got = metrics["patient_level"]
    assert got["aggregation"] == "mean" and got["metric"] == "auroc_macro"

    ev = preds[preds["split"] == split]
    probs = [f"prob_{c}" for c in task.classes]
    per = ev.groupby("patient_id")[probs].mean()
    label = ev.groupby("patient_id")["y_true"].agg(lambda s: s.mode().iloc[0])
    y = label.map({c: i for i, c in enumerate(task.classes)}).to_numpy()
    want = _macro_auroc(y, per.to_numpy(), len(task.classes))
    assert got["n_patients"] == len(per)
    assert abs(got["value"] - want) < 1e-6
    assert got["ci_low"] <= got["value"] <= got["ci_high"]


def test_tasks_without_aggregation_have_no_patient_level(tmp_path):
    task = _task(tmp_path, "none")
    preds = simulate_predictions(task, runs={("none", "real"): 2.0}, seeds=(0,), images_per_patient=3)
    metrics, _ = score_submission(preds, task, generator="none", primary="auroc_macro", n_boot=20, seed=0)
    assert "patient_level" not in metrics


def test_page_has_a_patient_level_column():
    keys = [k for k, _, _ in columns()]
    assert "patient" in keys and keys.index("patient") == keys.index("utility") + 1
