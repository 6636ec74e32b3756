"""The tidy metric table: every metric, scope and group with a patient-clustered interval and its n.

Table columns (`TABLE_COLUMNS`): metric, scope, split, group_by, group, worst_group, best_group, value, ci_low,
ci_high, n_cases, n_patients, n_pos, status, reason, seed_sd, generator, regime, backbone, n_undefined, p_gap. The
metrics and their order come from the metric registry (`bench.metrics.core.METRICS`). Method: docs/STATISTICS.md.

Rows
----
- scope `overall`: split `test` (internal test) and split `external` (every external site pooled); group_by "",
  group "all".
- scope `site`: group_by "site", one row per site within each split.
- scope `subgroup`: group_by a subgroup column of the task (e.g. "sex"), one row per value, within each split.
- scope `intersection`: group_by the columns joined by "&" (e.g. "sex&age_group"), group the values joined by "&".
- scope `patient` (tasks with `metrics.patient_aggregation` other than `none`): split test / external, group "all",
  each patient scored once with the mean of its cases' class probabilities; n_cases counts patients.
- Group summaries, in the same scope/split/group_by as the groups they summarise (site, subgroup, intersection):
  `<metric>_worst` (value of the worst eligible group; `group` and `worst_group` name it), `<metric>_gap` (best
  minus worst eligible group; `worst_group` and `best_group` name both; `group` reads "best vs worst" for people),
  `equalized_odds_difference` (largest of the sensitivity gap and the false-positive-rate gap at the
  validation-chosen threshold; group "all") and `fnr_gap` (false-negative-rate gap, i.e. underdiagnosis;
  `worst_group` has the highest FNR, `best_group` the lowest; `group` reads "highest-FNR vs lowest-FNR").
  Metrics registered with `fairness=False` get no worst/gap rows. Eligible: status `ok` and not listed in the
  task's `subgroups.exclude_from_gaps`; at least two eligible groups are needed. Worst and gap are recomputed in
  every bootstrap replicate, so their intervals account for which group is worst being uncertain.

Numbers
-------
- `value`: the metric averaged over training seeds; `seed_sd` the standard deviation across seeds (NaN with one
  seed). `ci_low`/`ci_high`: 95% percentile interval of a two-stage bootstrap: patients resampled within strata of
  site x patient label (the most frequent class of the patient's cases), then the arm's training seeds resampled
  with replacement. Replicates in which a metric is undefined are left out; `n_undefined` counts them (for worst
  and gap: replicates in which any eligible group was undefined) and the reason says so.
- `p_gap` (gap rows, `fnr_gap`, `equalized_odds_difference`): permutation p-value of "no gap", group labels
  permuted between patients within site x label strata (`metrics.permutations`); NaN on other rows.
- `n_cases`, `n_patients`: cases and patients in the group; `n_pos`: cases positive in the task's binary view.
- `status`: `undefined` (no value: one class only, no positives, a class absent for macro AUROC, no validation data
  for a threshold; `reason` says which), `insufficient` (fewer than `min_patients` patients, `min_positives`
  patients with a positive case or `min_negatives` patients with a negative case; value shown without an
  interval, left out of worst and gap), otherwise `ok`.
- Thresholds: per training seed, chosen on that model's validation predictions (binary view) as the most sensitive
  operating point whose specificity reaches `task.metrics.target_specificity`, then applied unchanged to test and
  external cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.metrics import core
from bench.metrics.engine import (
    GROUP_COLUMNS,
    INTERSECTION_SEP,
    TABLE_COLUMNS,
    Cell,
    CellResult,
    Engine,
    Limits,
    SeedView,
    _group_info,
    _mean_sd,
    define_cells,
    positive_classes,
    prepare_predictions,
)
from bench.metrics.rows import _table_rows, permutation_gaps, permutation_p
from bench.metrics.validate import prob_column
from bench.runfolder import ARM_KEYS, RUN_KEYS, SCORED_SPLITS
from bench.tasks import Task


def evaluate_predictions(
    preds: pd.DataFrame,
    task: Task,
    *,
    n_boot: int | None = None,
    seed: int = 0,
    min_patients: int | None = None,
    min_positives: int | None = None,
    min_negatives: int | None = None,
    n_perm: int | None = None,
    subgroup_columns: Sequence[str] | None = None,
    intersections: Sequence[Sequence[str]] | None = None,
    threshold: float | None = None,
    source: str = "predictions",
) -> pd.DataFrame:
    """The tidy metric table (see module docstring) for every (generator, regime, backbone) in `preds`.

    `subgroup_columns`/`intersections` default to the task's; `threshold` fixes the operating point instead of
    choosing it on validation data; `n_perm` group-label permutations for `p_gap` (task default; 0: none).
    Invalid predictions raise BadInput naming the rows.
    """
    cols = list(task.subgroups.columns if subgroup_columns is None else subgroup_columns)
    inter = [list(i) for i in (task.subgroups.intersections if intersections is None else intersections)]
    df = prepare_predictions(preds, task, source=source, subgroup_columns=cols)
    n_boot = int(task.metrics.bootstrap if n_boot is None else n_boot)
    limits = Limits(
        int(task.metrics.min_patients if min_patients is None else min_patients),
        int(task.metrics.min_positives if min_positives is None else min_positives),
        int(task.metrics.min_negatives if min_negatives is None else min_negatives),
    )
    n_perm = int(task.metrics.permutations if n_perm is None else n_perm)
    if n_boot < 1:
        raise BadInput(f"n_boot must be at least 1, got {n_boot}")
    if not df["split"].isin(SCORED_SPLITS).any():
        raise BadInput(
            f"{source}: no test or external predictions to evaluate (splits present: {sorted(df['split'].unique())})"
        )
    names = core.metric_names(task.classes)
    rows: list[dict] = []
    units = [("case", df)]
    if task.metrics.patient_aggregation != "none":
        units.append(("patient", aggregate_patients(df, task)))
    for unit, frame in units:
        engine = Engine(
            frame,
            task,
            n_boot=n_boot,
            seed=seed,
            subgroup_columns=cols if unit == "case" else [],
            intersections=inter if unit == "case" else [],
            threshold=threshold,
        )
        for key_vals, key_df in frame.groupby(list(ARM_KEYS), sort=True):
            key = dict(zip(ARM_KEYS, key_vals, strict=True))
            views = engine.views(key_df)
            if unit == "patient":
                for v in views:
                    v.cells = {
                        Cell("patient", c.split, "", "all"): i
                        for c, i in v.cells.items()
                        if c.scope == "overall"
                    }
            res = engine.compute(views, names)
            rows += _table_rows(engine, views, res, names, key, limits, n_perm)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return _order(table, names)


def aggregate_patients(df: pd.DataFrame, task: Task) -> pd.DataFrame:
    """One row per (run key, seed, split, patient): the mean of its cases' class probabilities (the task's
    `metrics.patient_aggregation`), its most frequent class (ties: the task's first) and its first site."""
    probs = [prob_column(c) for c in task.classes]
    keys = [*RUN_KEYS, "split", "patient_id"]
    g = df.groupby(keys, sort=True, dropna=False)
    out = g[probs].mean()
    counts = df.groupby([*keys, "_y"], dropna=False).size().rename("k").reset_index()
    counts = counts.sort_values([*keys, "k", "_y"], ascending=[True] * len(keys) + [False, True])
    label = counts.drop_duplicates(keys).set_index(keys)["_y"]
    out["_y"] = label.reindex(out.index).to_numpy(np.int64)
    out["site"] = g["site"].first()
    out = out.reset_index()
    out["case_id"] = out["patient_id"]
    out["y_true"] = np.asarray(task.classes, dtype=object)[out["_y"].to_numpy()]
    pos = positive_classes(task)
    out["_ybin"] = out["y_true"].isin(pos)
    out["_sbin"] = out[[prob_column(c) for c in pos]].sum(axis=1)
    return out


def _order(table: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    if table.empty:
        return table
    scope_rank = {"overall": 0, "patient": 0.5, "site": 1, "subgroup": 2, "intersection": 3}
    split_rank = {"test": 0, "external": 1}
    base = {n: i for i, n in enumerate(names)}

    def metric_rank(m: str) -> tuple[int, int]:
        for suffix, k in (("_worst", 1), ("_gap", 2)):
            if m.endswith(suffix) and m[: -len(suffix)] in base:
                return base[m[: -len(suffix)]], k
        return base.get(m, len(base)), 0 if m in base else 3

    t = table.assign(
        _k1=table["split"].map(split_rank),
        _k2=table["scope"].map(scope_rank),
        _k3=[metric_rank(m)[0] for m in table["metric"]],
        _k4=[metric_rank(m)[1] for m in table["metric"]],
    )
    keys = ["generator", "regime", "backbone", "_k1", "_k2", "group_by", "_k3", "_k4", "group"]
    t = t.sort_values(keys, kind="stable")
    t = t.drop(columns=["_k1", "_k2", "_k3", "_k4"]).reset_index(drop=True)
    for c in ("n_cases", "n_patients", "n_pos"):
        t[c] = t[c].astype(np.int64)
    return t


# Public names of the metric table, wherever they are defined (callers import them from here).
__all__ = [
    "GROUP_COLUMNS",
    "INTERSECTION_SEP",
    "TABLE_COLUMNS",
    "Cell",
    "CellResult",
    "Engine",
    "Limits",
    "SeedView",
    "_group_info",
    "_mean_sd",
    "aggregate_patients",
    "define_cells",
    "evaluate_predictions",
    "permutation_gaps",
    "permutation_p",
    "positive_classes",
    "prepare_predictions",
]
