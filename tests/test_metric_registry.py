"""A metric declared once in the registry reaches the metric table, comparisons, summary, report and leaderboard."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score
from test_leaderboard_support import make_board, make_run

from bench.cli import main
from bench.evaluation.report import Settings, build_report
from bench.evaluation.summary import summarize
from bench.leaderboard.render import columns
from bench.metrics import (
    METRICS,
    Metric,
    compare_to_baseline,
    evaluate_predictions,
    get_metric,
    metric_names,
    register_metric,
    reported,
)
from bench.metrics.simulate import simulate_predictions
from bench.tasks import Task
from tests.conftest import TINY_TASK

NAME = "toy_accuracy"


def _accuracy_kernel(y_true, y_score):
    hit = (np.asarray(y_score, dtype=float).argmax(axis=1) == np.asarray(y_true)).astype(float)

    def run(W: np.ndarray) -> np.ndarray:
        W = np.asarray(W, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (W @ hit) / W.sum(axis=1)

    return run


@pytest.fixture
def toy():
    m = register_metric(
        Metric(
            NAME,
            True,
            "multiclass",
            _accuracy_kernel,
            description="arg-max accuracy",
            order=95,
            label="toy accuracy",
            comparisons=True,
            headline=True,
            leaderboard="Toy accuracy",
            leaderboard_help="share of cases whose arg-max class is right",
        )
    )
    try:
        yield m
    finally:
        METRICS.unregister(NAME)
    assert NAME not in metric_names(["a", "b"])


@pytest.fixture
def task():
    return Task.model_validate(TINY_TASK)


def test_registry_lists_where_each_builtin_is_reported():
    assert [m.name for m in reported("headline")] == ["ece"]
    assert [m.name for m in reported("leaderboard")] == ["ece"]
    assert [m.name for m in reported("comparisons")] == [
        "auroc",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "ece",
        "brier",
    ]
    assert {m.name: m.kind for m in reported("fairness")} == {
        "auroc_macro": "multiclass",
        "auroc": "binary",
        "auroc_<class>": "per-class",
        "balanced_accuracy": "multiclass",
        "sensitivity": "threshold",
        "specificity": "threshold",
        "ece": "multiclass",
        "brier": "multiclass",
    }
    m = get_metric("auroc_disc", ["blank", "disc"])
    assert (m.name, m.params["k"], m.label) == ("auroc_disc", 1, "AUROC disc")


def test_a_registered_metric_reaches_table_comparisons_summary_and_report(toy, task):
    preds = simulate_predictions(task, seeds=[0, 1], patients_per_site=20)
    table = evaluate_predictions(preds, task, n_boot=30)
    assert metric_names(task.classes)[-1] == NAME  # order 95: after brier
    row = table[
        (table["metric"] == NAME)
        & (table["generator"] == "copycat")
        & (table["regime"] == "synthetic")
        & (table["scope"] == "overall")
        & (table["split"] == "test")
    ].iloc[0]
    # the value is the seed average of scikit-learn's accuracy on the same cases
    want = []
    for _, g in preds[
        (preds["generator"] == "copycat") & (preds["regime"] == "synthetic") & (preds["split"] == "test")
    ].groupby("seed"):
        P = g[[f"prob_{c}" for c in task.classes]].to_numpy()
        want.append(accuracy_score(g["y_true"], np.asarray(task.classes)[P.argmax(axis=1)]))
    assert row["value"] == pytest.approx(np.mean(want), abs=1e-12)
    assert row["ci_low"] <= row["value"] <= row["ci_high"]
    assert {f"{NAME}_worst", f"{NAME}_gap"} <= set(table["metric"])

    comps = compare_to_baseline(preds, task, n_boot=30)
    c = comps[(comps["metric"] == NAME) & (comps["scope"] == "overall")]
    assert len(c) and np.allclose(c["diff"], c["value"] - c["baseline_value"])

    summary = summarize(table, comps, task)
    run = next(r for r in summary["runs"] if (r["generator"], r["regime"]) == ("copycat", "synthetic"))
    split = summary["headline_split"]
    head = table[
        (table["metric"] == NAME)
        & (table["generator"] == "copycat")
        & (table["regime"] == "synthetic")
        & (table["scope"] == "overall")
        & (table["split"] == split)
    ].iloc[0]
    assert run[NAME]["value"] == pytest.approx(head["value"])

    md = build_report(table, comps, summary, task, Settings(30, 0, 1, 1)).markdown()
    assert f"toy accuracy {split}" in md
    assert f"{head['value']:.3f} [{head['ci_low']:.3f}, {head['ci_high']:.3f}]" in md


def test_a_registered_metric_is_a_leaderboard_column(toy, tmp_path):
    assert ("toy_accuracy", "Toy accuracy", "share of cases whose arg-max class is right") in columns()
    run = make_run(tmp_path / "run", {"good": 2.5})
    board = make_board(tmp_path / "board")
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    assert main(["leaderboard", "build", str(board)]) == 0
    rec = json.loads(next((board / "records").glob("*good*.json")).read_text())
    col = rec["metrics"]["columns"][NAME]
    assert col["metric"] == NAME and col["ci_low"] <= col["value"] <= col["ci_high"]
    # the record's value is the headline regime's accuracy, averaged over seeds, on the evaluation split
    preds = pd.read_parquet(board / rec["predictions"]["file"])
    p = preds[
        (preds["generator"] == "good")
        & (preds["regime"] == rec["metrics"]["headline_regime"])
        & (preds["split"] == rec["evaluation"]["split"])
    ]
    classes = TINY_TASK["labels"]["classes"]
    acc = [
        accuracy_score(
            g["y_true"], np.asarray(classes)[g[[f"prob_{c}" for c in classes]].to_numpy().argmax(1)]
        )
        for _, g in p.groupby("seed")
    ]
    assert col["value"] == pytest.approx(np.mean(acc), abs=1e-6)
    readme = (board / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| Rank"))
    assert "| Toy accuracy |" in header
    assert f"{col['value']:.3f} [{col['ci_low']:.3f}, {col['ci_high']:.3f}]" in readme
    html = (board / "index.html").read_text()
    assert '"key": "toy_accuracy"' in html and ">Toy accuracy</th>" in html
