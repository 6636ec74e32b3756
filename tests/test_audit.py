"""`medsynbench audit`: any predictions file, renamable columns, exit 2 naming the rows, no partial output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.cli import main
from bench.metrics.simulate import simulate_predictions
from bench.tasks import Task
from tests.conftest import TINY_TASK


@pytest.fixture(scope="module")
def preds():
    task = Task.model_validate(TINY_TASK)
    return simulate_predictions(task, runs={("none", "real"): 1.5}, seeds=[0], patients_per_site=24)


@pytest.fixture
def task_file(tmp_path):
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(TINY_TASK))
    return p


def _foreign(preds: pd.DataFrame) -> pd.DataFrame:
    """A paper's file: its own column names and no run keys."""
    f = preds.drop(columns=["generator", "regime", "seed", "backbone"]).rename(columns={"y_true": "label"})
    return f.rename(columns={c: "p_" + c[5:] for c in f.columns if c.startswith("prob_")})


def test_audit_foreign_file_without_task(tmp_path, preds, capsys):
    src = tmp_path / "paper.csv"
    _foreign(preds).to_csv(src, index=False)
    out = tmp_path / "audit"
    rc = main(
        [
            "audit",
            str(src),
            "--by",
            "sex,age_group",
            "--intersect",
            "--map",
            "y_true=label,prob_=p_",
            "--positive",
            "disc,bar",
            "--n-boot",
            "30",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {
        "metrics.parquet",
        "metrics.csv",
        "summary.json",
        "report.md",
        "report.html",
    }
    m = pd.read_parquet(out / "metrics.parquet")
    assert set(m["group_by"]) >= {"sex", "age_group", "sex&age_group"}
    assert {"equalized_odds_difference", "fnr_gap"} <= set(m["metric"])
    s = json.loads((out / "summary.json").read_text())
    assert s["runs"][0]["generator"] == "submitted" and "equalized_odds_difference" in s["runs"][0]["sex"]


def test_audit_with_task_and_fixed_threshold(tmp_path, preds, task_file):
    src = tmp_path / "p.parquet"
    preds.to_parquet(src)
    out = tmp_path / "a"
    assert (
        main(
            [
                "audit",
                str(src),
                "--task",
                str(task_file),
                "--by",
                "sex",
                "--threshold-from",
                "0.5",
                "--n-boot",
                "20",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = pd.read_parquet(out / "metrics.parquet")
    t = preds[preds["split"] == "test"]
    y = t["y_true"].isin(["disc", "bar"]).to_numpy()
    s = (t["prob_disc"] + t["prob_bar"]).to_numpy()
    row = m[(m["metric"] == "sensitivity") & (m["scope"] == "overall") & (m["split"] == "test")].iloc[0]
    assert row["value"] == pytest.approx(np.mean(s[y] >= 0.5))


def _break(kind: str, f: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    f = f.copy()
    if kind == "nan":
        f.loc[3, "prob_disc"] = np.nan
        return f, ["row 4 ", "NaN"]
    if kind == "negative":
        f.loc[7, "prob_bar"] = -0.2
        f.loc[7, "prob_blank"] += 0.2
        return f, ["row 8 ", "negative"]
    if kind == "sum":
        f.loc[[2, 9], "prob_blank"] += 0.01
        return f, ["rows 3, 10 ", "do not sum to 1"]
    if kind == "duplicate":
        f.loc[5, "case_id"] = f.loc[6, "case_id"]
        return f, ["rows 6, 7 ", "duplicate case_id"]
    if kind == "unknown_class":
        f.loc[11, "y_true"] = "tumour"
        return f, ["row 12 ", "'tumour' unknown to the task"]
    if kind == "unknown_prob_column":
        return f.assign(prob_tumour=0.0), ["prob_tumour", "unknown to the task"]
    if kind == "missing_column":
        return f.drop(columns=["patient_id"]), ["missing column(s): patient_id"]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["nan", "negative", "sum", "duplicate", "unknown_class", "unknown_prob_column", "missing_column"]
)
def test_bad_predictions_exit_2_naming_rows_and_no_output(tmp_path, preds, task_file, capsys, kind):
    f, expect = _break(kind, preds)
    src = tmp_path / "bad.csv"
    f.to_csv(src, index=False)
    out = tmp_path / "out"
    rc = main(
        ["audit", str(src), "--task", str(task_file), "--by", "sex", "--n-boot", "10", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert str(src) in err
    for e in expect:
        assert e in err, (e, err)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--by", "sex", "--map", "y_true"], "expected CONTRACT_NAME=FILE_NAME"),
        (["--by", "sex", "--map", "y_true=nolabel"], "not in the file: nolabel"),
        (["--by", "sex,ethnicity"], "missing column(s): ethnicity"),
        (["--by", "sex", "--threshold-from", "half"], "expected 'val' or a number"),
        (["--by", "sex", "--n-boot", "0"], "--n-boot must be at least 1"),
    ],
)
def test_bad_options_exit_2(tmp_path, preds, task_file, capsys, args, expect):
    src = tmp_path / "p.parquet"
    preds.to_parquet(src)
    out = tmp_path / "out"
    assert main(["audit", str(src), "--task", str(task_file), *args, "--out", str(out)]) == 2
    assert expect in capsys.readouterr().err
    assert not out.exists()


def test_threshold_from_val_without_val_rows_exit_2(tmp_path, preds, task_file, capsys):
    src = tmp_path / "p.parquet"
    preds[preds["split"] != "val"].to_parquet(src)
    out = tmp_path / "out"
    assert main(["audit", str(src), "--task", str(task_file), "--by", "sex", "--out", str(out)]) == 2
    assert "no validation rows" in capsys.readouterr().err
    assert not out.exists()
