"""Evaluation of segmenters: the metric table and the paired comparisons from per-case count tables.

A segmentation evaluation feeds the same engine as a classification one (`bench.metrics.engine`): cells (scope x
split x group), the two-stage bootstrap over patients and training seeds, BCa intervals, worst/gap rows with
permutation p-values, and paired comparisons against real-only. What differs is the per-case input: instead of
class probabilities, a row of counts per mask class (`bench.metrics.segmentation`, `count_columns`), and the
metrics are the registered segmentation metrics (`metric_names(classes, "segmentation")`). Tables have the
classification tables' columns (`TABLE_COLUMNS`, `COMPARISON_COLUMNS`).

Count-table rows: `case_id`, `patient_id`, `site`, `split` (val rows are ignored: no operating point is chosen),
the run keys `generator`, `regime`, `seed`, `backbone`, the task's subgroup columns, and the count columns. An
optional `y_true` (the case's image-level label) names the case's class for patient strata; without it the label
is the mask class with the most true pixels (`normal`-like code 0 for an empty mask). `n_pos` counts cases with a
lesion; `min_positives`/`min_negatives` count patients with / without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.metrics import core
from bench.metrics.bootstrap import holm
from bench.metrics.compare import COMPARISON_COLUMNS, _compare_one, _empty
from bench.metrics.engine import TABLE_COLUMNS, Engine, Limits, SeedView, define_cells
from bench.metrics.evaluate import _order
from bench.metrics.rows import _table_rows
from bench.metrics.segmentation import count_columns, true_label
from bench.metrics.validate import ROW_NOTE, describe_rows
from bench.runfolder import ARM_KEYS, BASELINE, BASELINE_REGIME, RUN_KEYS, SCORED_SPLITS
from bench.tasks import Task

REQUIRED = ["case_id", "patient_id", "site", "split"]


def mask_classes(task: Task) -> list[str]:
    """The task's mask classes (`masks.classes`); a task without masks has none to score."""
    masks = getattr(task, "masks", None)
    classes = getattr(masks, "classes", None)
    if not classes:
        raise BadInput(f"task {task.name!r} declares no mask classes (masks.classes): nothing to segment")
    return [str(c) for c in classes]


def prepare_counts(
    counts: pd.DataFrame,
    task: Task,
    classes: Sequence[str],
    *,
    source: str = "counts",
    subgroup_columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Validate a count table and add what the engine reads. Bad input raises BadInput naming columns and rows."""
    cols = list(task.subgroups.columns if subgroup_columns is None else subgroup_columns)
    df = counts.reset_index(drop=True)
    if "age_group" in cols and "age_group" not in df.columns and "age" in df.columns:
        df = df.assign(age_group=task.age_group(df["age"]))
    ccols = count_columns(classes)
    missing = [c for c in [*REQUIRED, *RUN_KEYS, *cols, *ccols] if c not in df.columns]
    if missing:
        raise BadInput(f"{source}: missing column(s): {', '.join(missing)}")
    problems = []
    C = df[ccols].apply(pd.to_numeric, errors="coerce")
    # HD95 is empty where a class is missing from truth or prediction; counts are never missing
    exact = [c for c in ccols if not c.startswith("hd95_")]
    unreadable = (df[ccols].notna() & C.isna()).any(axis=1)
    bad = (C[exact].isna().any(axis=1) | (C < 0).any(axis=1) | unreadable).to_numpy()
    if bad.any():
        problems.append(describe_rows(df, bad, "a count is missing, not a number or negative"))
    dup = df.duplicated([*RUN_KEYS, "case_id"], keep=False).to_numpy()
    if dup.any():
        problems.append(describe_rows(df, dup, "the same case twice for one run key and seed"))
    if problems:
        raise BadInput(f"{source}: {len(problems)} problem(s) in the count table ({ROW_NOTE})", problems)
    df = df.copy()
    for c in cols:
        df[c] = df[c].astype(object).where(df[c].notna(), "unknown").astype(str)
    for c in ("case_id", "patient_id", "site", "split", "generator", "regime", "backbone"):
        df[c] = df[c].astype(str)
    M = C.to_numpy(float)
    if "y_true" in df.columns:
        df["y_true"] = df["y_true"].astype(str)
        known = set(df["y_true"]) <= set(task.classes)
        cats = list(task.classes) if known else sorted(set(df["y_true"]))
        df["_y"] = pd.Categorical(df["y_true"], categories=cats).codes.astype(np.int64)
    else:
        df["_y"] = true_label(M, len(classes))
    area = sum(M[:, ccols.index(f"{s}_{c}")] for c in classes for s in ("tp", "fn"))
    df["_ybin"] = area > 0
    df["_sbin"] = 0.0
    return df


@dataclass
class SegView(SeedView):
    """One trained segmenter's scored cases with their count matrix."""

    counts: np.ndarray | None = None


class SegEngine(Engine):
    """The metric engine on count tables: the same cells, replicates and seed stage, count-matrix kernels."""

    def __init__(self, df: pd.DataFrame, task: Task, classes: Sequence[str], **kw: Any):
        super().__init__(df, task, **kw)
        self.classes = list(classes)
        self.count_cols = count_columns(self.classes)

    def views(self, key_df: pd.DataFrame, case_filter: Iterable[str] | None = None) -> list[SeedView]:
        out: list[SeedView] = []
        allowed = None if case_filter is None else set(case_filter)
        for seed, g in key_df.groupby("seed", sort=True):
            ev = g[g["split"].isin(SCORED_SPLITS)]
            if allowed is not None:
                ev = ev[ev["case_id"].isin(allowed)]
            ev = ev.reset_index(drop=True)
            n = len(ev)
            view = SegView(
                seed=seed,
                frame=ev,
                y=ev["_y"].to_numpy(np.int64),
                ybin=ev["_ybin"].to_numpy(bool),
                P=np.zeros((n, 0)),
                sbin=np.zeros(n),
                pidx=self.patient_index.reindex(ev["patient_id"]).to_numpy(np.int64),
                threshold=float("nan"),
                threshold_reason=None,
                counts=ev[self.count_cols].to_numpy(float),
            )
            view.cells = define_cells(ev, self.task, self.subgroup_columns, self.intersections)
            out.append(view)
        return out

    def metric(self, name: str, view: SeedView) -> core.Metric:
        return core.get_metric(name, self.classes)

    def kernel(self, name: str, view: SeedView, idx: np.ndarray) -> core.Kernel:
        counts = getattr(view, "counts", None)
        if counts is None:
            raise TypeError("a segmentation engine scores SegViews (count matrices)")
        return self.metric(name, view).kernel(counts[idx], None)


def _setup(
    counts: pd.DataFrame,
    task: Task,
    classes: Sequence[str] | None,
    n_boot: int | None,
    limits: tuple[int | None, int | None, int | None],
    source: str,
    subgroup_columns: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, list[str], int, Limits]:
    cls = list(classes) if classes is not None else mask_classes(task)
    df = prepare_counts(counts, task, cls, source=source, subgroup_columns=subgroup_columns)
    n_boot = int(task.metrics.bootstrap if n_boot is None else n_boot)
    if n_boot < 1:
        raise BadInput(f"n_boot must be at least 1, got {n_boot}")
    if not df["split"].isin(SCORED_SPLITS).any():
        raise BadInput(f"{source}: no test or external cases to evaluate")
    m = task.metrics
    lim = Limits(
        int(m.min_patients if limits[0] is None else limits[0]),
        int(m.min_positives if limits[1] is None else limits[1]),
        int(m.min_negatives if limits[2] is None else limits[2]),
    )
    return df, cls, n_boot, lim


def evaluate_segmentation(
    counts: pd.DataFrame,
    task: Task,
    *,
    classes: Sequence[str] | None = None,
    n_boot: int | None = None,
    seed: int = 0,
    min_patients: int | None = None,
    min_positives: int | None = None,
    min_negatives: int | None = None,
    n_perm: int | None = None,
    subgroup_columns: Sequence[str] | None = None,
    intersections: Sequence[Sequence[str]] | None = None,
    source: str = "counts",
) -> pd.DataFrame:
    """The tidy metric table (`TABLE_COLUMNS`; rows as in `bench.metrics.evaluate`) of a count table, for every
    (generator, regime, backbone). `classes` defaults to the task's mask classes."""
    cols = list(task.subgroups.columns if subgroup_columns is None else subgroup_columns)
    inter = [list(i) for i in (task.subgroups.intersections if intersections is None else intersections)]
    df, cls, n_boot, limits = _setup(
        counts, task, classes, n_boot, (min_patients, min_positives, min_negatives), source, cols
    )
    n_perm = int(task.metrics.permutations if n_perm is None else n_perm)
    names = core.metric_names(cls, "segmentation")
    engine = SegEngine(df, task, cls, n_boot=n_boot, seed=seed, subgroup_columns=cols, intersections=inter)
    rows: list[dict] = []
    for key_vals, key_df in df.groupby(list(ARM_KEYS), sort=True):
        key = dict(zip(ARM_KEYS, key_vals, strict=True))
        views = engine.views(key_df)
        res = engine.compute(views, names)
        rows += _table_rows(engine, views, res, names, key, limits, n_perm)
    return _order(pd.DataFrame(rows, columns=TABLE_COLUMNS), names)


def compare_segmentation(
    counts: pd.DataFrame,
    task: Task,
    *,
    classes: Sequence[str] | None = None,
    n_boot: int | None = None,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
    min_patients: int | None = None,
    min_positives: int | None = None,
    min_negatives: int | None = None,
    source: str = "counts",
) -> pd.DataFrame:
    """Each (generator, regime, backbone) against the real-only baseline of its backbone, on the cases both
    scored (`COMPARISON_COLUMNS`, as `compare_to_baseline`): the registered segmentation metrics flagged
    `comparisons` unless `metrics` names others."""
    df, cls, n_boot, limits = _setup(
        counts, task, classes, n_boot, (min_patients, min_positives, min_negatives), source, []
    )
    names = list(metrics or [m.name for m in core.reported("comparisons", "segmentation")])
    for m in names:
        core.get_metric(m, cls)  # unknown names fail before any work
    engine = SegEngine(df, task, cls, n_boot=n_boot, seed=seed, subgroup_columns=[], intersections=[])
    arm = list(ARM_KEYS)
    rows: list[dict[str, Any]] = []
    for gen, reg, bb in df[arm].drop_duplicates().sort_values(arm).itertuples(index=False, name=None):
        if gen == BASELINE and reg == BASELINE_REGIME:
            continue
        key = dict(generator=gen, regime=reg, backbone=bb)
        same_bb = df["backbone"] == bb
        base_df = df[same_bb & (df["generator"] == BASELINE) & (df["regime"] == BASELINE_REGIME)]
        cand_df = df[same_bb & (df["generator"] == gen) & (df["regime"] == reg)]
        if base_df.empty:
            rows.append(_empty(key, names[0], f"no real-only baseline with backbone {bb!r}"))
            continue
        rows += _compare_one(engine, cand_df, base_df, key, names, limits)
    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    if out.empty:
        return out
    fam = ["metric", "scope", "split", "group"]
    out["p_boot_holm"] = out.groupby(fam, sort=False)["p_boot"].transform(lambda p: holm(p.to_numpy()))
    return out.reset_index(drop=True)
