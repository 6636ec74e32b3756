"""Patient-level splitting of the training sites; external sites are always `external`.

Splits are drawn (seeded, stratified) unless the task's `splits.from_column` names a source column holding a
release's own split: then that is used as given, still checked for a unit in two splits.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.tasks import Task

# Spellings of the three training splits found in public releases (CheXpert writes `valid`).
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def assign_splits(df: pd.DataFrame, task: Task) -> pd.DataFrame:
    """Return a copy of `df` with a `split` column.

    The unit (the task's `splits.unit`, normally `patient_id`) never crosses splits. Units are stratified by
    (site, label) where a stratum holds enough units for every split to get its share; smaller strata are pooled per
    site, then globally. Deterministic for the task's split seed whatever the row order.
    """
    spec = task.splits
    unit = spec.unit if spec.unit in df.columns else "patient_id"
    if spec.from_column:
        return _predefined(df, unit, task)
    out = df.copy()
    ext = out["site"].isin(task.sites.external)
    out["split"] = np.where(ext, "external", "train")
    inner = out.loc[~ext]
    if inner.empty:
        return out
    per_unit = inner.groupby(unit, sort=True).agg(
        label=("label", lambda s: s.value_counts().sort_index().idxmax()), site=("site", "first")
    )
    min_n = math.ceil(1.0 / min(spec.val, spec.test))
    rng = np.random.default_rng(spec.seed)
    assignment: dict[str, str] = {}

    def allot(ids: list[str]) -> None:
        ids = sorted(ids)
        order = rng.permutation(len(ids))
        n = len(ids)
        n_val = int(round(n * spec.val))
        n_test = int(round(n * spec.test))
        n_res = int(round(n * spec.reserve))
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        n_res = min(n_res, max(n - n_val - n_test - 1, 0))  # at least one training unit stays
        for k, j in enumerate(order):
            assignment[ids[j]] = (
                "val"
                if k < n_val
                else "test"
                if k < n_val + n_test
                else "reserve"
                if k < n_val + n_test + n_res
                else "train"
            )

    site_pool: dict[str, list[str]] = {}
    for (site, _label), grp in per_unit.groupby(["site", "label"], sort=True):
        ids = [str(i) for i in grp.index]
        if len(ids) >= min_n:
            allot(ids)
        else:
            site_pool.setdefault(str(site), []).extend(ids)
    global_pool: list[str] = []
    for site in sorted(site_pool):
        ids = site_pool[site]
        if len(ids) >= min_n:
            allot(ids)
        else:
            global_pool.extend(ids)
    if global_pool:
        allot(global_pool)
    out.loc[~ext, "split"] = inner[unit].astype(str).map(assignment).to_numpy()
    return out


def _predefined(df: pd.DataFrame, unit: str, task: Task) -> pd.DataFrame:
    col = task.splits.from_column
    where = f"task {task.name!r} ({task.path or 'task.yaml'}), field 'splits.from_column'"
    if col not in df.columns:
        raise BadInput(
            f"{where}: the source gives no column {col!r} to take the splits from (columns: {list(df.columns)})"
        )
    out = df.copy()
    ext = out["site"].isin(task.sites.external)
    raw = out[col].map(lambda v: str(v).strip().lower() if isinstance(v, str) or pd.notna(v) else "")
    given = raw.map(SPLIT_ALIASES)
    inner = ~ext
    bad = out.index[inner & given.isna()]
    if len(bad):
        vals = sorted(set(out.loc[bad, col].astype(str)))
        raise BadInput(
            f"{where}: column {col!r} holds {vals[:10]} on {len(bad)} training-site row(s); expected train, val "
            f"or test (cases {_cases(out, bad)})"
        )
    out["split"] = np.where(ext, "external", given.fillna("external"))
    sub = out.loc[inner]
    nsplit = sub.groupby(unit)["split"].nunique()
    leaks = [
        f"{unit} {uid!r} is in splits {sorted(set(sub.loc[sub[unit] == uid, 'split']))} "
        f"(cases {_cases(sub, sub.index[sub[unit] == uid])}): leakage"
        for uid in nsplit[nsplit > 1].index
    ]
    if leaks:
        raise BadInput(f"{where}: the predefined splits put a unit in several splits", leaks)
    missing = [s for s in ("train", "val", "test") if not (sub["split"] == s).any()]
    if missing:
        raise BadInput(
            f"{where}: column {col!r} gives no training-site row to split(s) {missing}; the protocol needs "
            "train, val (thresholds) and test"
        )
    return out


def _cases(df: pd.DataFrame, idx, limit: int = 10) -> str:
    ids = [str(v) for v in df.loc[idx, "case_id"]] if "case_id" in df.columns else [str(i) for i in idx]
    return ", ".join(ids[:limit]) + (f", ... ({len(ids)} cases)" if len(ids) > limit else "")
