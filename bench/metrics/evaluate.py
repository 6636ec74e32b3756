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

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.metrics import core
from bench.metrics.bootstrap import (
    bca_interval,
    chunks,
    combine_seeds,
    jackknife_weights,
    patient_strata,
    patient_weights,
    percentile_interval,
    seed_weights,
    stream_id,
)
from bench.metrics.validate import ROW_NOTE, prob_column, validate_predictions
from bench.runfolder import ARM_KEYS, RUN_KEYS, SCORED_SPLITS
from bench.tasks import Task

TABLE_COLUMNS = [
    "metric",
    "scope",
    "split",
    "group_by",
    "group",
    "worst_group",
    "best_group",
    "value",
    "ci_low",
    "ci_high",
    "n_cases",
    "n_patients",
    "n_pos",
    "status",
    "reason",
    "seed_sd",
    "generator",
    "regime",
    "backbone",
    "n_undefined",
    "p_gap",
]
# Structured names of the groups a group summary is about (empty on every other row), so that nobody parses
# `group` back: `<metric>_worst` names its group in worst_group; `<metric>_gap` and `fnr_gap` name both ends.
GROUP_COLUMNS = ("worst_group", "best_group")
INTERSECTION_SEP = "&"
_CELL_BUDGET = 4_000_000  # floats per replicate chunk (weights of one chunk x cases of one seed)


def positive_classes(task: Task) -> list[str]:
    """Classes counted positive in the binary view; without one, every class but the first."""
    if task.labels.binary_view:
        return list(task.labels.binary_view.positive)
    return task.classes[1:]


# --------------------------------------------------------------------------------------------- preparation


def prepare_predictions(
    preds: pd.DataFrame,
    task: Task,
    *,
    source: str = "predictions",
    subgroup_columns: Sequence[str] | None = None,
    run_keys: Sequence[str] = RUN_KEYS,
) -> pd.DataFrame:
    """Validate a predictions table and add the arrays the evaluation needs. Bad input raises BadInput naming rows."""
    cols = list(task.subgroups.columns if subgroup_columns is None else subgroup_columns)
    df = preds.reset_index(drop=True)
    if "age_group" in cols and "age_group" not in df.columns and "age" in df.columns:
        df = df.assign(age_group=task.age_group(df["age"]))
    problems = validate_predictions(df, task.classes, subgroup_columns=cols, run_keys=list(run_keys))
    if problems:
        raise BadInput(f"{source}: {len(problems)} problem(s) in the predictions ({ROW_NOTE})", problems)
    df = df.copy()
    for c in cols:
        df[c] = df[c].astype(object).where(df[c].notna(), "unknown").astype(str)
    for c in ("case_id", "patient_id", "site", "split", "y_true", "generator", "regime", "backbone"):
        if c in df.columns:
            df[c] = df[c].astype(str)
    classes = task.classes
    df["_y"] = pd.Categorical(df["y_true"], categories=classes).codes.astype(np.int64)
    pos = positive_classes(task)
    df["_ybin"] = df["y_true"].isin(pos)
    df["_sbin"] = df[[prob_column(c) for c in pos]].astype(float).sum(axis=1)
    return df


# --------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True, order=True)
class Cell:
    scope: str
    split: str
    group_by: str
    group: str


def define_cells(
    df: pd.DataFrame, task: Task, subgroup_columns: Sequence[str], intersections: Sequence[Sequence[str]]
) -> dict[Cell, np.ndarray]:
    """Row indices of every reported group (test and external splits)."""
    out: dict[Cell, np.ndarray] = {}
    for split in SCORED_SPLITS:
        in_split = (df["split"] == split).to_numpy()
        if not in_split.any():
            continue
        out[Cell("overall", split, "", "all")] = np.flatnonzero(in_split)
        sub = df[in_split]
        for site, idx in sub.groupby("site", sort=True).indices.items():
            out[Cell("site", split, "site", str(site))] = np.flatnonzero(in_split)[idx]
        for col in subgroup_columns:
            for val, idx in sub.groupby(col, sort=True).indices.items():
                out[Cell("subgroup", split, col, str(val))] = np.flatnonzero(in_split)[idx]
        for cols in intersections:
            cols = list(cols)
            for vals, idx in sub.groupby(cols, sort=True).indices.items():
                vals = vals if isinstance(vals, tuple) else (vals,)
                out[
                    Cell(
                        "intersection",
                        split,
                        INTERSECTION_SEP.join(cols),
                        INTERSECTION_SEP.join(map(str, vals)),
                    )
                ] = np.flatnonzero(in_split)[idx]
    return out


# --------------------------------------------------------------------------------------------- engine


@dataclass
class SeedView:
    """One trained model (run key x seed): its test/external rows as arrays, and its operating point."""

    seed: Any
    frame: pd.DataFrame
    y: np.ndarray
    ybin: np.ndarray
    P: np.ndarray
    sbin: np.ndarray
    pidx: np.ndarray
    threshold: float
    threshold_reason: str | None
    cells: dict[Cell, np.ndarray] = field(default_factory=dict)


@dataclass
class CellResult:
    point: np.ndarray  # per seed (NaN where the seed lacks the cell or the metric is undefined)
    reps: np.ndarray  # per replicate, averaged over seeds
    jack: np.ndarray | None = None  # delete-a-group jackknife values, averaged over seeds (BCa acceleration)


class Engine:
    """Evaluates metrics for run keys on shared patient bootstrap replicates."""

    def __init__(
        self,
        df: pd.DataFrame,
        task: Task,
        *,
        n_boot: int,
        seed: int,
        subgroup_columns: Sequence[str],
        intersections: Sequence[Sequence[str]],
        threshold: float | None = None,
        seed_stage: bool = True,
    ):
        self.task = task
        self.seed_stage = seed_stage
        self.df = df
        self.n_boot = int(n_boot)
        self.seed = int(seed)
        self.subgroup_columns = list(subgroup_columns)
        self.intersections = [list(i) for i in intersections]
        self.fixed_threshold = threshold
        ev = df[df["split"].isin(SCORED_SPLITS)]
        # the most frequent class of a patient's cases (ties: first class of the task) labels the patient's stratum
        counts = ev.groupby(["patient_id", "_y"]).size().rename("k").reset_index()
        counts = counts.sort_values(["patient_id", "k", "_y"], ascending=[True, False, True])
        label = counts.drop_duplicates("patient_id").set_index("patient_id")["_y"]
        site = ev.groupby("patient_id")["site"].min()
        self.patients = pd.DataFrame({"site": site, "label": label}).sort_index()
        self.patient_index = pd.Series(np.arange(len(self.patients)), index=self.patients.index)
        self.strata = patient_strata(self.patients, ["site", "label"])
        self.jackknife = jackknife_weights(self.strata)

    # views -------------------------------------------------------------------------------------------------
    def views(self, key_df: pd.DataFrame, case_filter: Iterable[str] | None = None) -> list[SeedView]:
        out = []
        allowed = None if case_filter is None else set(case_filter)
        for seed, g in key_df.groupby("seed", sort=True):
            val = g[g["split"] == "val"]
            thr, why = self._threshold(val)
            ev = g[g["split"].isin(SCORED_SPLITS)]
            if allowed is not None:
                ev = ev[ev["case_id"].isin(allowed)]
            ev = ev.reset_index(drop=True)
            view = SeedView(
                seed=seed,
                frame=ev,
                y=ev["_y"].to_numpy(np.int64),
                ybin=ev["_ybin"].to_numpy(bool),
                P=ev[[prob_column(c) for c in self.task.classes]].to_numpy(float),
                sbin=ev["_sbin"].to_numpy(float),
                pidx=self.patient_index.reindex(ev["patient_id"]).to_numpy(np.int64),
                threshold=thr,
                threshold_reason=why,
            )
            view.cells = define_cells(ev, self.task, self.subgroup_columns, self.intersections)
            out.append(view)
        return out

    def _threshold(self, val: pd.DataFrame) -> tuple[float, str | None]:
        if self.fixed_threshold is not None:
            return float(self.fixed_threshold), None
        if len(val) == 0:
            return float("nan"), "no validation predictions to choose the operating point"
        if not (~val["_ybin"]).any():
            return float("nan"), "no negative validation cases to choose the operating point"
        t = core.choose_threshold(
            val["_ybin"].to_numpy(bool), val["_sbin"].to_numpy(float), self.task.metrics.target_specificity
        )
        return t, None

    # metrics ------------------------------------------------------------------------------------------------
    def metric(self, name: str, view: SeedView) -> core.Metric:
        m = core.get_metric(name, self.task.classes).for_task(self.task.metrics)
        return m.bind(threshold=view.threshold) if m.needs_threshold else m

    def kernel(self, name: str, view: SeedView, idx: np.ndarray) -> core.Kernel:
        m = self.metric(name, view)
        if m.target == "binary":
            return m.kernel(view.ybin[idx], view.sbin[idx])
        return m.kernel(view.y[idx], view.P[idx])

    def compute(
        self,
        views: list[SeedView],
        metrics: Sequence[str],
        cells: Iterable[Cell] | None = None,
        arm: str | None = None,
        jackknife: bool = True,
    ) -> dict[tuple[Cell, str], CellResult]:
        """Point values per seed and two-stage replicates (patients, then the arm's training seeds).

        With `jackknife`, also the delete-a-group jackknife values that the table's BCa intervals need.
        """
        all_cells = sorted(set().union(*(v.cells for v in views))) if views else []
        if cells is not None:
            wanted = set(cells)
            all_cells = [c for c in all_cells if c in wanted]
        jobs = []  # (view number, cell, metric, kernel, idx)
        for s, v in enumerate(views):
            for c in all_cells:
                if c not in v.cells:
                    continue
                idx = v.cells[c]
                for m in metrics:
                    jobs.append((s, c, m, self.kernel(m, v, idx), idx))
        n_seeds = len(views)
        point = {(c, m): np.full(n_seeds, np.nan) for c in all_cells for m in metrics}
        for s, c, m, kern, idx in jobs:
            point[(c, m)][s] = kern(np.ones((1, len(idx))))[0]
        reps = {k: np.zeros((n_seeds, self.n_boot)) + np.nan for k in point}
        n_max = max((len(v.pidx) for v in views), default=1)
        size = max(1, min(self.n_boot, _CELL_BUDGET // max(n_max, 1)))
        for a, b in chunks(self.n_boot, size):
            Wp = patient_weights(self.strata, self.n_boot, self.seed, a, b)
            cache: dict[int, np.ndarray] = {}
            for s, c, m, kern, idx in jobs:
                if s not in cache:
                    cache = {s: Wp[:, views[s].pidx]}
                reps[(c, m)][s, a:b] = kern(cache[s][:, idx])
        jack = {k: np.full((n_seeds, self.jackknife.shape[0] if jackknife else 0), np.nan) for k in point}
        cache = {}
        for s, c, m, kern, idx in jobs if jackknife else []:
            if s not in cache:
                cache = {s: self.jackknife[:, views[s].pidx]}
            jack[(c, m)][s] = kern(cache[s][:, idx])
        stream = stream_id(arm if arm is not None else _arm_of(views))
        sw = seed_weights(n_seeds, self.n_boot, self.seed, stream) if self.seed_stage else None
        return {
            k: CellResult(point[k], combine_seeds(reps[k], sw), _nanmean0(jack[k]) if jackknife else None)
            for k in point
        }


def _arm_of(views: list[SeedView]) -> str:
    for v in views:
        if len(v.frame):
            return "|".join(str(v.frame[k].iloc[0]) for k in ARM_KEYS if k in v.frame.columns)
    return ""


def _nanmean0(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    cnt = ok.sum(axis=0)
    tot = np.where(ok, a, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _mean_sd(point: np.ndarray) -> tuple[float, float]:
    p = point[~np.isnan(point)]
    if len(p) == 0:
        return float("nan"), float("nan")
    return float(p.mean()), float(p.std(ddof=1)) if len(p) > 1 else float("nan")


# --------------------------------------------------------------------------------------------- table


@dataclass
class _GroupInfo:
    n_cases: int
    n_patients: int
    n_pos: int
    n_pos_patients: int
    n_neg_patients: int
    y: np.ndarray
    ybin: np.ndarray


def _group_info(views: list[SeedView], cell: Cell) -> _GroupInfo:
    frames = [v.frame.iloc[v.cells[cell]] for v in views if cell in v.cells]
    f = pd.concat(frames).drop_duplicates("case_id")
    return _GroupInfo(
        n_cases=len(f),
        n_patients=f["patient_id"].nunique(),
        n_pos=int(f["_ybin"].sum()),
        n_pos_patients=f.loc[f["_ybin"], "patient_id"].nunique(),
        n_neg_patients=f.loc[~f["_ybin"], "patient_id"].nunique(),
        y=f["_y"].to_numpy(),
        ybin=f["_ybin"].to_numpy(bool),
    )


def _row(
    metric: str,
    cell: Cell,
    value: float,
    lo: float,
    hi: float,
    info: tuple[int, int, int],
    status: str,
    reason: str,
    sd: float,
    key: dict,
    worst_group: str = "",
    best_group: str = "",
    n_undefined: int = 0,
    p_gap: float = float("nan"),
) -> dict:
    return dict(
        n_undefined=int(n_undefined),
        p_gap=p_gap,
        metric=metric,
        scope=cell.scope,
        split=cell.split,
        group_by=cell.group_by,
        group=cell.group,
        worst_group=worst_group,
        best_group=best_group,
        value=value,
        ci_low=lo,
        ci_high=hi,
        n_cases=info[0],
        n_patients=info[1],
        n_pos=info[2],
        status=status,
        reason=reason,
        seed_sd=sd,
        **key,
    )


def _excluded(task: Task, cell: Cell) -> bool:
    excl = task.subgroups.exclude_from_gaps
    cols = cell.group_by.split(INTERSECTION_SEP)
    vals = cell.group.split(INTERSECTION_SEP)
    if len(cols) != len(vals):
        return False
    return any(v in excl.get(c, []) for c, v in zip(cols, vals, strict=True))


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


@dataclass(frozen=True)
class Limits:
    """Smallest group that gets a value with an interval (patients, positive patients, negative patients)."""

    patients: int
    positives: int
    negatives: int

    def problems(self, info: _GroupInfo) -> list[str]:
        out = []
        if info.n_patients < self.patients:
            out.append(f"{info.n_patients} patients < min_patients {self.patients}")
        if info.n_pos_patients < self.positives:
            out.append(
                f"{info.n_pos_patients} patients with a positive case < min_positives {self.positives}"
            )
        if info.n_neg_patients < self.negatives:
            out.append(
                f"{info.n_neg_patients} patients with a negative case < min_negatives {self.negatives}"
            )
        return out


def _table_rows(
    engine: Engine,
    views: list[SeedView],
    res: dict[tuple[Cell, str], CellResult],
    names: Sequence[str],
    key: dict,
    limits: Limits,
    n_perm: int,
) -> list[dict]:
    task = engine.task
    rows: list[dict] = []
    cells = sorted({c for c, _ in res})
    status_of: dict[tuple[Cell, str], str] = {}
    infos = {c: _group_info(views, c) for c in cells}
    thr_reason = next((v.threshold_reason for v in views if v.threshold_reason), None)
    for c in cells:
        info = infos[c]
        small = limits.problems(info)
        for m in names:
            r = res[(c, m)]
            value, sd = _mean_sd(r.point)
            lo, hi, used = bca_interval(r.reps, value, r.jack, info.n_patients)
            notes = []
            if np.isnan(value):
                status = "undefined"
                metric = core.get_metric(m, task.classes)
                why = (thr_reason if metric.needs_threshold else None) or metric.undefined_reason(
                    info.ybin if metric.target == "binary" else info.y
                )
                if m == "auroc_macro" and why is None:
                    absent = [cl for k, cl in enumerate(task.classes) if not (info.y == k).any()]
                    if absent:
                        why = f"no cases of {', '.join(absent)} (macro AUROC is over the task's classes)"
                notes.append(why or "metric undefined for these cases")
                lo = hi = float("nan")
                used = 0
            elif small:
                # too small a group gets its value but never an interval: a bootstrap of a handful of patients
                # gives intervals that look precise and are not
                status = "insufficient"
                notes += small
                lo = hi = float("nan")
            else:
                status = "ok"
            if status == "ok" and used < engine.n_boot:
                notes.append(
                    f"interval from {used} of {engine.n_boot} replicates (metric undefined in the rest)"
                )
            status_of[(c, m)] = status
            rows.append(
                _row(
                    m,
                    c,
                    value,
                    lo,
                    hi,
                    (info.n_cases, info.n_patients, info.n_pos),
                    status,
                    "; ".join(notes),
                    sd,
                    key,
                    n_undefined=engine.n_boot - used if status == "ok" else 0,
                )
            )
    # group summaries ---------------------------------------------------------------------------------------
    families: dict[tuple[str, str, str], list[Cell]] = {}
    for c in cells:
        if c.scope not in ("overall", "patient"):
            families.setdefault((c.scope, c.split, c.group_by), []).append(c)
    for (scope, split, group_by), members in sorted(families.items()):
        fam_cell = Cell(scope, split, group_by, "")
        perm_metrics = {}
        design: dict = {}
        for m in names:
            metric = core.get_metric(m, task.classes)
            if not metric.fairness:
                continue
            elig = [c for c in members if status_of[(c, m)] == "ok" and not _excluded(task, c)]
            perm = (
                permutation_gaps(engine, views, elig, m, n_perm, design)
                if len(elig) >= 2 and n_perm
                else None
            )
            perm_metrics[m] = (elig, perm)
            rows += _summary_rows(
                m, metric.higher_is_better, fam_cell, elig, res, infos, key, engine.n_boot, members, perm
            )
        elig = [
            c
            for c in members
            if status_of[(c, "sensitivity")] == "ok"
            and status_of[(c, "specificity")] == "ok"
            and not _excluded(task, c)
        ]
        perm = None
        if len(elig) >= 2 and n_perm and not thr_reason:
            ps = perm_metrics.get("sensitivity")
            sp = perm_metrics.get("specificity")
            sens = (
                ps[1]
                if ps and ps[0] == elig
                else permutation_gaps(engine, views, elig, "sensitivity", n_perm, design)
            )
            spec = (
                sp[1]
                if sp and sp[0] == elig
                else permutation_gaps(engine, views, elig, "specificity", n_perm, design)
            )
            perm = (sens, spec)
        rows += _fairness_rows(fam_cell, elig, res, infos, key, thr_reason, engine.n_boot, perm)
    return rows


def _stack(
    res: dict[tuple[Cell, str], CellResult], elig: list[Cell], m: str
) -> tuple[np.ndarray, np.ndarray]:
    point = np.vstack([res[(c, m)].point for c in elig])  # groups x seeds
    reps = np.vstack([res[(c, m)].reps for c in elig])  # groups x replicates
    return point, reps


def _n(infos: dict[Cell, _GroupInfo], elig: list[Cell]) -> tuple[int, int, int]:
    return (
        sum(infos[c].n_cases for c in elig),
        sum(infos[c].n_patients for c in elig),
        sum(infos[c].n_pos for c in elig),
    )


def _too_few(metric: str, cell: Cell, elig: list[Cell], infos: dict[Cell, _GroupInfo], key: dict) -> dict:
    return _row(
        metric,
        cell,
        float("nan"),
        float("nan"),
        float("nan"),
        _n(infos, elig),
        "insufficient",
        f"{len(elig)} eligible group(s); worst and gap need at least 2 with status ok",
        float("nan"),
        key,
    )


def _spread(point_seeds: np.ndarray, reps: np.ndarray, higher: bool) -> dict[str, Any]:
    """Worst and gap (best - worst) from per-group values: point per seed-average, per seed, per replicate.

    A replicate in which any eligible group is undefined has no worst group and no gap (NaN, counted by the
    caller): dropping the group would silently shrink the gap towards zero.
    """
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = _nanmean0(point_seeds.T)
        worst_i = int(np.nanargmin(mean) if higher else np.nanargmax(mean))
        best_i = int(np.nanargmax(mean) if higher else np.nanargmin(mean))
        w_fn = np.nanmin if higher else np.nanmax
        worst_seed = w_fn(point_seeds, axis=0)
        gap_seed = np.nanmax(point_seeds, axis=0) - np.nanmin(point_seeds, axis=0)
        worst_rep = (np.min if higher else np.max)(reps, axis=0)
        gap_rep = np.max(reps, axis=0) - np.min(reps, axis=0)
    return dict(
        worst=float(mean[worst_i]),
        gap=float(np.nanmax(mean) - np.nanmin(mean)),
        worst_i=worst_i,
        best_i=best_i,
        worst_seed=worst_seed,
        gap_seed=gap_seed,
        worst_rep=worst_rep,
        gap_rep=gap_rep,
    )


def _undefined_note(used: int, n_boot: int) -> str:
    if used >= n_boot:
        return ""
    return (
        f"; {n_boot - used} of {n_boot} replicates had an undefined eligible group and were left out of the "
        "interval"
    )


def _perm_note(perm: np.ndarray | None) -> str:
    if perm is None:
        return ""
    return f"; p_gap: {len(perm) - 1} permutations of group labels within site x label strata"


def _summary_rows(
    m: str,
    higher: bool,
    fam: Cell,
    elig: list[Cell],
    res,
    infos,
    key: dict,
    n_boot: int,
    members: list[Cell] | None = None,
    perm: np.ndarray | None = None,
) -> list[dict]:
    if len(elig) < 2:
        return [_too_few(f"{m}_worst", fam, elig, infos, key), _too_few(f"{m}_gap", fam, elig, infos, key)]
    point, reps = _stack(res, elig, m)
    sp = _spread(point, reps, higher)
    n = _n(infos, elig)
    out = []
    worst, best = elig[sp["worst_i"]].group, elig[sp["best_i"]].group
    left_out = len(members or elig) - len(elig)
    for what, value, seeds, rep, group, ends in (
        ("worst", sp["worst"], sp["worst_seed"], sp["worst_rep"], worst, (worst, "")),
        ("gap", sp["gap"], sp["gap_seed"], sp["gap_rep"], f"{best} vs {worst}", (worst, best)),
    ):
        lo, hi, used = percentile_interval(rep)
        _, sd = _mean_sd(seeds)
        reason = f"over {len(elig)} eligible groups"
        if left_out:
            reason += f" ({left_out} group(s) not eligible: insufficient, undefined or excluded)"
        reason += _undefined_note(used, n_boot)
        p_gap = float("nan")
        if what == "gap" and perm is not None:
            p_gap = permutation_p(perm)
            reason += _perm_note(perm)
        out.append(
            _row(
                f"{m}_{what}",
                Cell(fam.scope, fam.split, fam.group_by, group),
                value,
                lo,
                hi,
                n,
                "ok",
                reason,
                sd,
                key,
                *ends,
                n_undefined=n_boot - used,
                p_gap=p_gap,
            )
        )
    return out


def _fairness_rows(
    fam: Cell,
    elig: list[Cell],
    res,
    infos,
    key: dict,
    thr_reason: str | None,
    n_boot: int = 0,
    perm: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict]:
    names = ("equalized_odds_difference", "fnr_gap")
    if thr_reason:
        return [
            _row(
                nm,
                Cell(fam.scope, fam.split, fam.group_by, "all"),
                *([float("nan")] * 3),
                _n(infos, elig),
                "undefined",
                thr_reason,
                float("nan"),
                key,
            )
            for nm in names
        ]
    if len(elig) < 2:
        return [
            _too_few(nm, Cell(fam.scope, fam.split, fam.group_by, "all"), elig, infos, key) for nm in names
        ]
    sens_p, sens_r = _stack(res, elig, "sensitivity")
    spec_p, spec_r = _stack(res, elig, "specificity")
    s_sens = _spread(sens_p, sens_r, True)
    s_spec = _spread(spec_p, spec_r, True)  # FPR = 1 - specificity, so the FPR gap equals the specificity gap
    n = _n(infos, elig)
    out = []
    eod_seed = np.fmax(s_sens["gap_seed"], s_spec["gap_seed"])
    eod_rep = np.maximum(s_sens["gap_rep"], s_spec["gap_rep"])
    lo, hi, used = percentile_interval(eod_rep)
    p_eod = p_fnr = float("nan")
    note = ""
    if perm is not None:
        p_eod = permutation_p(np.maximum(perm[0], perm[1]))
        p_fnr = permutation_p(perm[0])
        note = _perm_note(perm[0])
    out.append(
        _row(
            "equalized_odds_difference",
            Cell(fam.scope, fam.split, fam.group_by, "all"),
            max(s_sens["gap"], s_spec["gap"]),
            lo,
            hi,
            n,
            "ok",
            f"max of sensitivity gap and false-positive-rate gap over {len(elig)} eligible groups at the validation-chosen threshold"
            + _undefined_note(used, n_boot or used)
            + note,
            _mean_sd(eod_seed)[1],
            key,
            n_undefined=max((n_boot or used) - used, 0),
            p_gap=p_eod,
        )
    )
    lo, hi, used = percentile_interval(s_sens["gap_rep"])
    worst, best = elig[s_sens["worst_i"]].group, elig[s_sens["best_i"]].group
    out.append(
        _row(
            "fnr_gap",
            Cell(fam.scope, fam.split, fam.group_by, f"{worst} vs {best}"),
            s_sens["gap"],
            lo,
            hi,
            n,
            "ok",
            f"false-negative rate of {worst} minus that of {best} (highest vs lowest) over {len(elig)} eligible groups"
            + _undefined_note(used, n_boot or used)
            + note,
            _mean_sd(s_sens["gap_seed"])[1],
            key,
            worst,
            best,
            n_undefined=max((n_boot or used) - used, 0),
            p_gap=p_fnr,
        )
    )
    return out


# --------------------------------------------------------------------------------------------- permutation test


def permutation_p(gaps: np.ndarray) -> float:
    """One-sided p-value of 'no gap': gaps[0] is observed, gaps[1:] under permuted group labels (NaN ones skipped).

    p = (1 + #{permuted >= observed}) / (1 + permutations), never zero.
    """
    g = np.asarray(gaps, dtype=float)
    obs, perm = g[0], g[1:]
    perm = perm[~np.isnan(perm)]
    if np.isnan(obs) or len(perm) == 0:
        return float("nan")
    return float((1 + np.sum(perm >= obs - 1e-12)) / (1 + len(perm)))


def permutation_gaps(
    engine: Engine,
    views: list[SeedView],
    elig: list[Cell],
    metric: str,
    n_perm: int,
    cache: dict | None = None,
) -> np.ndarray:
    """The gap (max - min over `elig` groups of the seed-averaged metric) with the observed group labels (entry 0)
    and under `n_perm` permutations of the labels.

    Labels are permuted between patients within strata of patient label x site (label only when the groups are
    sites), so a permutation keeps each stratum's case mix and every patient's cases together. Where a patient's
    cases fall in several groups (an image-level attribute), case labels are permuted instead, within the same
    strata. The permutations of a family are drawn once from (seed, family) and shared by its metrics.
    """
    key = tuple(elig)
    if cache is not None and key in cache:
        G, per_seed = cache[key]
    else:
        G, per_seed = _permutation_design(engine, views, elig, n_perm)
        if cache is not None:
            cache[key] = (G, per_seed)
    k = len(elig)
    vals = np.full((len(views), k, G.shape[0]), np.nan)
    for s, (v, (idx, u)) in enumerate(zip(views, per_seed, strict=True)):
        kern = engine.kernel(metric, v, idx)
        size = max(1, _CELL_BUDGET // max(len(idx), 1))
        for a, b in chunks(G.shape[0], size):
            Gu = G[a:b][:, u]
            for gi in range(k):
                vals[s, gi, a:b] = kern((Gu == gi).astype(float))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(vals, axis=0)  # groups x permutations
        return np.max(mean, axis=0) - np.min(mean, axis=0)


def _permutation_design(
    engine: Engine, views: list[SeedView], elig: list[Cell], n_perm: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(permutations + 1, units) group codes (row 0 observed) and, per seed, the rows used and their unit."""
    frames = []
    for v in views:
        code = np.full(len(v.frame), -1, dtype=np.int64)
        for gi, c in enumerate(elig):
            code[v.cells[c]] = gi
        keep = np.flatnonzero(code >= 0)
        frames.append((v, keep, code[keep]))
    allc = pd.concat(
        [
            pd.DataFrame({"case": v.frame["case_id"].to_numpy()[i], "p": v.pidx[i], "g": g})
            for v, i, g in frames
        ]
    ).drop_duplicates("case")
    unit_key = "p" if allc.groupby("p")["g"].nunique().max() <= 1 else "case"
    units = allc.drop_duplicates(unit_key).reset_index(drop=True)
    unit_index = pd.Series(np.arange(len(units)), index=units[unit_key].to_numpy())
    pat = engine.patients.iloc[units["p"].to_numpy()].reset_index(drop=True)
    strata = patient_strata(pat, ["label"] if elig[0].group_by == "site" else ["site", "label"])
    g0 = units["g"].to_numpy()
    rng = np.random.default_rng(
        [engine.seed, stream_id(f"{elig[0].scope}|{elig[0].split}|{elig[0].group_by}"), 2]
    )
    # sorting stratum + U(0, 1) keys shuffles units within each stratum; the strata blocks stay in place
    base = np.argsort(strata, kind="stable")
    shuffled = np.argsort(strata[None, :] + rng.random((n_perm, len(units))), axis=1)
    G = np.empty((n_perm + 1, len(units)), dtype=np.int64)
    G[0] = g0
    G[1:, base] = g0[shuffled]
    per_seed = []
    for v, idx, _ in frames:
        keys = v.frame["case_id"].to_numpy()[idx] if unit_key == "case" else v.pidx[idx]
        per_seed.append((idx, unit_index.reindex(keys).to_numpy(np.int64)))
    return G, per_seed


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
