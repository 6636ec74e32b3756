"""The metric-table reader: rows by arm, one row, by group, and the one serialiser of an estimate."""

from __future__ import annotations

import math

import pandas as pd

from bench.metrics.table import MetricTable


def _table() -> pd.DataFrame:
    base = dict(split="external", generator="g", regime="synthetic", backbone="b", n_patients=30, reason="")
    rows = [
        dict(
            base,
            metric="auroc_macro",
            scope="overall",
            group_by="",
            group="all",
            value=0.81234567,
            ci_low=0.7,
            ci_high=0.9,
            status="ok",
        ),
        dict(
            base,
            metric="auroc_macro",
            scope="subgroup",
            group_by="sex",
            group="F",
            value=0.8,
            ci_low=0.7,
            ci_high=0.9,
            status="ok",
        ),
        dict(
            base,
            metric="auroc_macro",
            scope="subgroup",
            group_by="sex",
            group="M",
            value=math.nan,
            ci_low=math.nan,
            ci_high=math.nan,
            status="undefined",
            reason="one class only",
        ),
        dict(
            base,
            metric="auroc_macro",
            scope="overall",
            group_by="",
            group="all",
            regime="real",
            value=0.7,
            ci_low=math.nan,
            ci_high=math.nan,
            status="insufficient",
            reason="3 patients < min_patients 10",
        ),
    ]
    return pd.DataFrame(rows)


def test_one_row_per_arm_and_none_when_absent():
    t = MetricTable(_table())
    assert t.one("auroc_macro", split="external", regime="synthetic")["value"] == 0.81234567
    assert t.one("auroc_macro", split="test", regime="synthetic") is None
    assert t.overall("ece", "external", regime="synthetic") is None


def test_estimate_rounds_and_keeps_why_a_number_is_missing():
    t = MetricTable(_table())
    assert t.overall("auroc_macro", "external", regime="synthetic") == {
        "value": 0.812346,
        "ci_low": 0.7,
        "ci_high": 0.9,
    }
    assert t.overall("auroc_macro", "external", regime="real") == {
        "value": 0.7,
        "ci_low": None,
        "ci_high": None,
        "status": "insufficient",
        "reason": "3 patients < min_patients 10",
    }


def test_by_group_lists_each_group():
    t = MetricTable(_table())
    g = t.by_group("auroc_macro", split="external", group_by="sex", regime="synthetic")
    assert list(g["group"]) == ["F", "M"]
    assert MetricTable.estimate(g.iloc[1])["status"] == "undefined"


def test_select_matches_any_of_a_collection_and_keeps_row_order():
    t = MetricTable(_table())
    rows = t.select(scope=("subgroup", "overall"), regime="synthetic")
    assert list(rows["group"]) == ["all", "F", "M"]
    assert list(t.select(scope=["subgroup"])["group"]) == ["F", "M"]
    assert t.select(scope=()).empty
    # None leaves a column unfiltered
    assert len(t.select(scope="overall", regime=None)) == 2
