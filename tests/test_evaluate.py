"""The tidy metric table, comparisons, summary and the `evaluate` command on a fake RUN folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from bench.cli import main
from bench.evaluation.summary import summarize
from bench.metrics import (
    COMPARISON_COLUMNS,
    TABLE_COLUMNS,
    choose_threshold,
    compare_to_baseline,
    evaluate_predictions,
)
from bench.metrics.simulate import simulate_predictions
from bench.tasks import Task
from tests.conftest import TINY_TASK

SPEC = {**TINY_TASK, "subgroups": {**TINY_TASK["subgroups"], "intersections": [["sex", "age_group"]]}}
RUNS = {("none", "real"): 2.0, ("copycat", "synthetic"): 0.8, ("copycat", "augment:1"): 2.2}


@pytest.fixture(scope="module")
def task():
    return Task.model_validate(SPEC)


@pytest.fixture(scope="module")
def preds(task):
    return simulate_predictions(task, runs=RUNS, seeds=[0, 1, 2], patients_per_site=30)


@pytest.fixture(scope="module")
def table(preds, task):
    return evaluate_predictions(preds, task, n_boot=100, seed=0)


def _binary(task, f):
    pos = task.labels.binary_view.positive
    return f["y_true"].isin(pos).to_numpy(), f[[f"prob_{c}" for c in pos]].sum(axis=1).to_numpy()


def test_columns_scopes_and_keys(table):
    assert list(table.columns) == TABLE_COLUMNS
    assert set(table["scope"]) == {"overall", "site", "subgroup", "intersection"}
    assert set(table["status"]) <= {"ok", "insufficient", "undefined"}
    ov = table[table["scope"] == "overall"]
    assert set(ov["split"]) == {"test", "external"} and set(ov["group"]) == {"all"}
    assert set(table.loc[(table["scope"] == "site") & (table["split"] == "external"), "group"]) >= {"x1"}
    assert set(table.loc[table["scope"] == "intersection", "group_by"]) == {"sex&age_group"}
    assert {"auroc_macro_worst", "auroc_macro_gap", "equalized_odds_difference", "fnr_gap"} <= set(
        table["metric"]
    )
    assert set(zip(table["generator"], table["regime"], strict=True)) == set(RUNS)
    assert (table["backbone"] == "resnet18").all()
    assert not table.duplicated(
        ["generator", "regime", "backbone", "metric", "scope", "split", "group_by", "group"]
    ).any()


def test_values_average_seeds_and_match_sklearn(table, preds, task):
    per_seed = []
    for _, f in preds[(preds["generator"] == "none") & (preds["split"] == "test")].groupby("seed"):
        y, s = _binary(task, f)
        per_seed.append(roc_auc_score(y, s))
    row = table[
        (table["generator"] == "none")
        & (table["metric"] == "auroc")
        & (table["scope"] == "overall")
        & (table["split"] == "test")
    ].iloc[0]
    assert row["value"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert row["seed_sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert row["ci_low"] < row["value"] < row["ci_high"]
    f = preds[(preds["generator"] == "none") & (preds["split"] == "test") & (preds["seed"] == 0)]
    assert row["n_cases"] == len(f) and row["n_patients"] == f["patient_id"].nunique()
    assert row["n_pos"] == int(_binary(task, f)[0].sum())


def test_threshold_is_chosen_on_validation_and_applied_unchanged(table, preds, task):
    sens = []
    for _, f in preds[preds["generator"] == "none"].groupby("seed"):
        v = f[f["split"] == "val"]
        t = choose_threshold(*_binary(task, v), task.metrics.target_specificity)
        y, s = _binary(task, f[f["split"] == "external"])
        sens.append(np.mean(s[y] >= t))
    row = table[
        (table["generator"] == "none")
        & (table["metric"] == "sensitivity")
        & (table["scope"] == "overall")
        & (table["split"] == "external")
    ]
    assert row["value"].iloc[0] == pytest.approx(np.mean(sens), abs=1e-12)


def test_worst_and_gap_agree_with_group_rows(table):
    t = table[
        (table["generator"] == "copycat")
        & (table["regime"] == "augment:1")
        & (table["split"] == "test")
        & (table["group_by"] == "age_group")
    ]
    groups = t[(t["metric"] == "auroc_macro") & (t["status"] == "ok")]
    assert len(groups) >= 2
    worst = t[t["metric"] == "auroc_macro_worst"].iloc[0]
    gap = t[t["metric"] == "auroc_macro_gap"].iloc[0]
    assert worst["value"] == pytest.approx(groups["value"].min())
    assert worst["group"] == groups.loc[groups["value"].idxmin(), "group"]
    assert gap["value"] == pytest.approx(groups["value"].max() - groups["value"].min())
    assert gap["ci_low"] >= 0
    # the groups are named in their own columns; `group` keeps the readable "best vs worst"
    lo, hi = groups.loc[groups["value"].idxmin(), "group"], groups.loc[groups["value"].idxmax(), "group"]
    assert (worst["worst_group"], worst["best_group"]) == (lo, "")
    assert (gap["worst_group"], gap["best_group"]) == (lo, hi)
    assert gap["group"] == f"{hi} vs {lo}"
    sens = t[(t["metric"] == "sensitivity") & (t["status"] == "ok")].set_index("group")["value"]
    fnr = t[t["metric"] == "fnr_gap"].iloc[0]
    assert fnr["worst_group"] == sens.idxmin() and fnr["best_group"] == sens.idxmax()
    plain = t[t["metric"] == "auroc_macro"]
    assert (plain["worst_group"] == "").all() and (plain["best_group"] == "").all()


def test_undefined_groups_do_not_raise(task, preds):
    p = preds[(preds["generator"] == "none") & (preds["seed"] == 0)].copy()
    ext = p["split"] == "external"
    p.loc[ext, "y_true"] = "blank"  # external site without positive cases
    table = evaluate_predictions(p, task, n_boot=20)
    row = table[
        (table["metric"] == "auroc") & (table["scope"] == "overall") & (table["split"] == "external")
    ].iloc[0]
    assert row["status"] == "undefined" and row["reason"] == "no positive cases (binary view)"
    assert np.isnan(row["value"]) and np.isnan(row["ci_low"])
    spec = table[
        (table["metric"] == "specificity") & (table["scope"] == "overall") & (table["split"] == "external")
    ].iloc[0]
    assert spec["status"] != "undefined"


def test_no_validation_rows_leaves_threshold_metrics_undefined(task, preds):
    p = preds[(preds["generator"] == "none") & (preds["split"] != "val")]
    table = evaluate_predictions(p, task, n_boot=10)
    s = table[table["metric"] == "sensitivity"]
    assert set(s["status"]) == {"undefined"}
    assert "no validation predictions" in s["reason"].iloc[0]


def test_same_seed_same_table_other_seed_other_intervals(task, preds, table):
    again = evaluate_predictions(preds, task, n_boot=100, seed=0)
    pd.testing.assert_frame_equal(again, table)
    other = evaluate_predictions(preds, task, n_boot=100, seed=1)
    assert np.allclose(other["value"], table["value"], equal_nan=True)
    assert not np.allclose(other["ci_low"], table["ci_low"], equal_nan=True)


def test_comparisons(task, preds):
    comp = compare_to_baseline(preds, task, n_boot=200, seed=0)
    assert list(comp.columns) == COMPARISON_COLUMNS
    assert set(zip(comp["generator"], comp["regime"], strict=True)) == {
        ("copycat", "synthetic"),
        ("copycat", "augment:1"),
    }
    syn = comp[
        (comp["regime"] == "synthetic")
        & (comp["metric"] == "auroc_macro")
        & (comp["split"] == "external")
        & (comp["scope"] == "overall")
    ].iloc[0]
    assert syn["diff"] < 0 and syn["ci_high"] < 0 and syn["p_boot"] < 0.05
    assert syn["ratio"] == pytest.approx(syn["value"] / syn["baseline_value"])
    assert syn["p_boot_holm"] >= syn["p_boot"]
    au = comp[comp["metric"] == "auroc"]
    assert au["p_delong"].notna().all() and comp.loc[comp["metric"] != "auroc", "p_delong"].isna().all()


def test_identical_candidate_has_zero_difference(task, preds):
    # One seed per arm: no seed stage, so identical predictions give an interval of exactly zero.
    base = preds[(preds["generator"] == "none") & (preds["seed"] == 0)]
    twin = base.assign(generator="twin", regime="synthetic")
    comp = compare_to_baseline(pd.concat([base, twin]), task, n_boot=50, seed=0)
    ok = comp[comp["metric"] == "auroc"]
    assert np.allclose(ok["diff"], 0) and np.allclose(ok["ci_low"], 0) and np.allclose(ok["ci_high"], 0)
    assert np.allclose(ok["p_boot"], 1.0) and np.allclose(ok["p_delong"], 1.0)
    assert ok["seed_note"].str.startswith("few_seeds").all()


def test_same_procedure_with_two_seeds_keeps_seed_variance_in_the_interval(task, preds):
    # The same two models under another name: the point difference is zero, but the interval must carry the
    # seed-to-seed variation (a rerun with new seeds would not reproduce these two models), so it is not [0, 0].
    # Seeds 10 and 11 under the other name: not the baseline's seed indices, so not pairs of common random numbers.
    base = preds[(preds["generator"] == "none") & (preds["seed"] < 2)]
    twin = base.assign(generator="twin", regime="synthetic", seed=base["seed"] + 10)
    comp = compare_to_baseline(pd.concat([base, twin]), task, n_boot=200, seed=0)
    ok = comp[(comp["metric"] == "auroc") & (comp["scope"] == "overall")]
    assert np.allclose(ok["diff"], 0)
    assert (ok["ci_low"] < 0).all() and (ok["ci_high"] > 0).all() and (ok["p_boot"] > 0.5).all()
    # The same seed indices are pairs (seed k: the same initialisation and batch order in both arms): identical
    # models in every pair differ by exactly 0 in every replicate, as a rerun of both arms would.
    paired = compare_to_baseline(pd.concat([base, base.assign(generator="twin", regime="synthetic")]), task,
                                 n_boot=200, seed=0)  # fmt: skip
    pk = paired[(paired["metric"] == "auroc") & (paired["scope"] == "overall")]
    assert np.allclose(pk["ci_low"], 0) and np.allclose(pk["ci_high"], 0)
    assert np.allclose(ok["p_delong"], 1.0)  # a zero difference is no evidence, whatever the variance
    assert ok["seed_note"].str.startswith("few_seeds: 2 and 2").all()


def test_summary_has_intervals_and_n(task, preds, table):
    comp = compare_to_baseline(preds, task, n_boot=100, seed=0)
    s = summarize(table, comp, task)
    assert s["primary_metric"] == "auroc_macro" and s["headline_split"] == "external"
    run = next(r for r in s["runs"] if r["regime"] == "synthetic")
    for k in (
        "external_primary",
        "test_primary",
        "worst_subgroup_auroc",
        "largest_subgroup_gap",
        "ece",
        "diff_vs_real",
        "utility_ratio",
    ):
        assert set(run[k]) >= {"value", "ci_low", "ci_high", "n_cases", "n_patients"}, k
    assert run["utility_ratio"]["value"] < 1
    json.dumps(s)


# ------------------------------------------------------------------------------------------------ command


def make_run(root: Path, task: Task, preds: pd.DataFrame) -> Path:
    run = root / "RUN"
    run.mkdir(parents=True)
    (run / "task.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    for (g, r, s), f in preds.groupby(["generator", "regime", "seed"]):
        d = run / f"{g}__{r}__resnet18__seed{s}"
        d.mkdir()
        f.to_parquet(d / "predictions.parquet", index=False)
        (d / "DONE").write_text("")
    (run / "half__real__resnet18__seed0").mkdir()  # unfinished: no DONE
    preds.head(3).to_parquet(run / "half__real__resnet18__seed0" / "predictions.parquet")
    return run


def test_evaluate_command_writes_everything(tmp_path, task, preds, capsys):
    run = make_run(tmp_path, task, preds[preds["seed"] < 2])
    assert main(["evaluate", str(run), "--n-boot", "50"]) == 0
    out = run / "evaluation"
    assert {p.name for p in out.iterdir()} == {
        "metrics.parquet",
        "metrics.csv",
        "comparisons.parquet",
        "comparisons.csv",
        "summary.json",
        "report.md",
        "report.html",
    }
    m = pd.read_parquet(out / "metrics.parquet")
    assert (
        list(m.columns) == TABLE_COLUMNS and list(pd.read_csv(out / "metrics.csv").columns) == TABLE_COLUMNS
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (
        "half__real__resnet18__seed0" not in summary["settings"]["runs"]
        and len(summary["settings"]["runs"]) == 6
    )
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "http://" not in html and "https://" not in html
    md = (out / "report.md").read_text()
    assert "3 patients" in md and "2 patients with a positive case" in md and "50 bootstrap replicates" in md


def test_evaluate_command_bad_predictions_exit_2_without_output(tmp_path, task, preds, capsys):
    run = make_run(tmp_path, task, preds[preds["seed"] == 0])
    bad = run / "copycat__synthetic__resnet18__seed0" / "predictions.parquet"
    f = pd.read_parquet(bad)
    f.loc[4, "prob_disc"] = np.nan
    f.to_parquet(bad, index=False)
    (run / "evaluation").mkdir()
    (run / "evaluation" / "old.txt").write_text("earlier evaluation")
    assert main(["evaluate", str(run), "--n-boot", "10"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "row 5" in err and "NaN" in err
    assert [p.name for p in (run / "evaluation").iterdir()] == ["old.txt"]
    assert not list(run.glob(".evaluation*"))


def test_evaluate_command_without_finished_runs_exit_2(tmp_path, capsys):
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "task.yaml").write_text(yaml.safe_dump(SPEC))
    assert main(["evaluate", str(run)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert not (run / "evaluation").exists()


def test_patient_in_two_splits_is_rejected(task, preds):
    from bench.errors import BadInput
    from bench.metrics import validate_predictions

    p = preds.copy()
    val_pid = p.loc[p["split"] == "val", "patient_id"].iloc[0]
    row = p.index[(p["patient_id"] == val_pid)][0]
    p.loc[row, "split"] = "test"
    problems = validate_predictions(p, task.classes, subgroup_columns=["sex", "age_group"])
    assert any(repr(val_pid) in m and "more than one split" in m for m in problems)
    with pytest.raises(BadInput, match="problem"):
        evaluate_predictions(p, task, n_boot=10)


def test_probability_problems_are_the_same_alone_and_in_a_predictions_table(task, preds):
    from bench.metrics import validate_predictions, validate_probabilities

    p = preds.reset_index(drop=True).copy()
    p.loc[4, "prob_disc"] = np.nan
    p.loc[9, "prob_bar"] = -0.3
    p.loc[[12, 20], "prob_blank"] += 0.05
    alone = validate_probabilities(p[["case_id", *[f"prob_{c}" for c in task.classes]]], task.classes)
    assert [m.split(":")[0].split(" (")[0] for m in alone] == ["row 5", "row 10", "rows 10, 13, 21"]
    assert "NaN" in alone[0] and "negative" in alone[1] and "do not sum to 1" in alone[2]
    full = validate_predictions(p, task.classes, subgroup_columns=["sex", "age_group"])
    assert full == alone  # the table has no other problem: the same messages, in the same order
    assert (
        validate_probabilities(p.drop(columns=["prob_bar"]), task.classes)[0] == "missing column(s): prob_bar"
    )
    assert validate_probabilities(preds, task.classes) == []


def test_group_below_min_negatives_is_insufficient_without_interval(task, preds):
    # the case: a group of 11 positive patients and 1 negative patient
    p = preds[(preds["generator"] == "none") & (preds["split"].isin(["val", "test"]))].copy()
    test_p = p[p["split"] == "test"].drop_duplicates("patient_id")
    pos = test_p[test_p["y_true"] != "blank"]["patient_id"].iloc[:11].tolist()
    neg = test_p[test_p["y_true"] == "blank"]["patient_id"].iloc[:1].tolist()
    p["sex"] = np.where(p["patient_id"].isin(pos + neg), "X", "F")
    t = evaluate_predictions(p, task, n_boot=20, seed=0, min_negatives=5, min_patients=3, min_positives=2)
    r = t[(t["group_by"] == "sex") & (t["group"] == "X") & (t["metric"] == "specificity")].iloc[0]
    assert (
        r["status"] == "insufficient" and "1 patients with a negative case < min_negatives 5" in r["reason"]
    )
    assert np.isnan(r["ci_low"]) and np.isnan(r["ci_high"])
    eod = t[(t["group_by"] == "sex") & (t["metric"] == "equalized_odds_difference") & (t["split"] == "test")]
    assert (eod["status"] == "insufficient").all()  # X is out; one eligible group is left


def test_gap_p_value_and_undefined_replicates(task, preds):
    t = evaluate_predictions(preds, task, n_boot=100, seed=0, n_perm=99)
    gaps = t[t["metric"].str.endswith("_gap") & (t["status"] == "ok")]
    assert gaps["p_gap"].between(0.01, 1).all()
    assert (t.loc[t["metric"].str.endswith("_worst"), "p_gap"].isna()).all()
    assert (t["n_undefined"] >= 0).all() and (t["n_undefined"] <= 100).all()
    # a gap's interval leaves out, and counts, replicates where an eligible group is undefined
    noted = gaps[gaps["n_undefined"] > 0]
    assert noted["reason"].str.contains("had an undefined eligible group").all()


def test_patient_scope_scores_mean_probabilities_per_patient(preds):
    from sklearn.metrics import roc_auc_score

    spec = {**SPEC, "metrics": {**SPEC["metrics"], "patient_aggregation": "mean"}}
    task = Task.model_validate(spec)
    p = preds[(preds["generator"] == "none") & (preds["seed"] == 0)]
    t = evaluate_predictions(p, task, n_boot=20, seed=0, n_perm=0)
    r = t[(t["scope"] == "patient") & (t["split"] == "test") & (t["metric"] == "auroc")].iloc[0]
    test = p[p["split"] == "test"]
    agg = test.groupby("patient_id")[["prob_blank", "prob_disc", "prob_bar"]].mean()
    label = test.groupby("patient_id")["y_true"].first()
    assert r["n_cases"] == r["n_patients"] == len(agg)
    assert r["value"] == pytest.approx(roc_auc_score(label != "blank", 1 - agg["prob_blank"]), abs=1e-12)
    # the case-level rows are still there, unchanged by the setting
    base = evaluate_predictions(p, Task.model_validate(SPEC), n_boot=20, seed=0, n_perm=0)
    assert len(t[t["scope"] != "patient"]) == len(base)
