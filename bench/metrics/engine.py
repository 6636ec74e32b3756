"""The bootstrap engine behind the metric table: prepared predictions, cells (scope x split x group), every
metric's point value and replicates per cell (method: docs/STATISTICS.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.metrics import core
from bench.metrics.bootstrap import (
    chunks,
    combine_seeds,
    jackknife_weights,
    patient_strata,
    patient_weights,
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
        # the class list that per-class metric names refer to (a segmentation engine: the mask classes)
        self.classes: list[str] = list(task.classes)
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
        m = core.get_metric(name, self.classes).for_task(self.task.metrics)
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
