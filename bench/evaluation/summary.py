"""summary.json: the headline numbers of each (generator, regime, backbone), read from the metric table and the
paired comparisons through `bench.metrics.table.MetricTable`.

This is presentation: which rows make a headline and how each is written. The numbers themselves come from the
metric library (`evaluate_predictions`, `compare_to_baseline`); nothing is computed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from bench.metrics import core
from bench.metrics.compare import auroc_metric, headline_split
from bench.metrics.evaluate import GROUP_COLUMNS
from bench.metrics.table import MetricTable, number
from bench.runfolder import ARM_KEYS
from bench.tasks import Task


def summary_header(task: Task, primary: str, split: str) -> dict[str, Any]:
    """What every summary file (evaluation, audit) opens with: the task, its primary metric and headline split."""
    return {
        "task": task.name,
        "task_version": task.version,
        "primary_metric": primary,
        "headline_split": split,
    }


def summary_entry(row: pd.Series | None, extra: Sequence[str] = ()) -> dict[str, Any] | None:
    """A metric-table row as a summary.json entry: value, interval, n, status and the `extra` columns."""
    if row is None:
        return None
    out = {k: number(row[k]) for k in ("value", "ci_low", "ci_high")}
    out.update(n_cases=int(row["n_cases"]), n_patients=int(row["n_patients"]), status=str(row["status"]))
    for k in extra:
        out[k] = number(row[k]) if isinstance(row[k], (int, float, np.floating, np.integer)) else str(row[k])
    return out


def _extreme(mt: MetricTable, metric: str, split: str, *, lowest: bool) -> pd.Series | None:
    """The subgroup row of `metric` with the lowest (highest) value among those with an estimate (status ok)."""
    rows = mt.select(metric=metric, split=split, scope="subgroup", status="ok")
    if rows.empty:
        return None
    return rows.loc[rows["value"].idxmin() if lowest else rows["value"].idxmax()]


def _comparison_entries(row: pd.Series) -> tuple[dict[str, Any], dict[str, Any]]:
    """`diff_vs_real` and `utility_ratio` of one comparison row."""
    n = {"n_cases": int(row["n_cases"]), "n_patients": int(row["n_patients"]), "status": str(row["status"])}
    diff = {
        "value": number(row["diff"]),
        "ci_low": number(row["ci_low"]),
        "ci_high": number(row["ci_high"]),
        "p_boot_holm": number(row["p_boot_holm"]),
        **n,
    }
    ratio = {
        "value": number(row["ratio"]),
        "ci_low": number(row["ratio_ci_low"]),
        "ci_high": number(row["ratio_ci_high"]),
        **n,
    }
    return diff, ratio


def summarize(table: pd.DataFrame, comparisons: pd.DataFrame | None, task: Task) -> dict[str, Any]:
    """Headline numbers per (generator, regime, backbone), each {value, ci_low, ci_high, n_cases, n_patients, status}.

    Keys of each run: `external_primary` (primary metric, external sites pooled), `test_primary` (internal test),
    `patient_primary` (tasks with `metrics.patient_aggregation`: primary metric per patient, headline split),
    `worst_subgroup_auroc` and `largest_subgroup_gap` (over the task's subgroup columns on the headline split, with
    `group_by`, `group`, `worst_group` and `best_group`), one key per metric registered with `headline=True`
    (overall, headline split; `ece` among the built-ins), `fnr_gap` (largest over subgroup columns, headline split),
    `diff_vs_real` (primary metric on the headline split minus the real-only baseline, with `p_boot_holm`) and
    `utility_ratio` (primary metric on the headline split / real-only). Missing numbers are null.
    """
    primary = task.metrics.primary
    split = headline_split(table) if len(table) else "test"
    # Worst group and gap: an AUROC for a classification task; a segmentation task's own primary metric (macro
    # Dice). The key keeps its name (`auroc_metric`, `worst_subgroup_auroc`) so every reader finds it.
    seg = task.kind == "segmentation"
    am = primary if seg else auroc_metric(task)
    comps = MetricTable(comparisons) if comparisons is not None and len(comparisons) else None
    where = ("group_by", "group", *GROUP_COLUMNS)
    runs = []
    for (gen, reg, bb), t in table.groupby(list(ARM_KEYS), sort=True):
        mt = MetricTable(t)
        run: dict[str, Any] = dict(generator=gen, regime=reg, backbone=bb)
        run["external_primary"] = summary_entry(mt.one(primary, split="external"))
        run["test_primary"] = summary_entry(mt.one(primary, split="test"))
        if not mt.select(scope="patient").empty:
            run["patient_primary"] = summary_entry(mt.one(primary, split=split, scope="patient"))
        run["worst_subgroup_auroc"] = summary_entry(_extreme(mt, f"{am}_worst", split, lowest=True), where)
        run["largest_subgroup_gap"] = summary_entry(_extreme(mt, f"{am}_gap", split, lowest=False), where)
        for m in core.reported("headline", task.kind):
            run[m.name] = summary_entry(mt.one(m.name, split=split))
        if not seg:
            run["fnr_gap"] = summary_entry(_extreme(mt, "fnr_gap", split, lowest=False), where)
        run["diff_vs_real"] = run["utility_ratio"] = None
        c = None if comps is None else comps.one(primary, split=split, generator=gen, regime=reg, backbone=bb)
        if c is not None:
            run["diff_vs_real"], run["utility_ratio"] = _comparison_entries(c)
        runs.append(run)
    return {**summary_header(task, primary, split), "auroc_metric": am, "runs": runs}
