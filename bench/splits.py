"""Patient-level splitting of the training sites; external sites are always `external`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.tasks import Task


def assign_splits(df: pd.DataFrame, task: Task) -> pd.DataFrame:
    """Return a copy of `df` with a `split` column.

    The unit (the task's `splits.unit`, normally `patient_id`) never crosses splits. Units are stratified by
    (site, label) where a stratum holds enough units for every split to get its share; smaller strata are pooled per
    site, then globally. Deterministic for the task's split seed whatever the row order.
    """
    spec = task.splits
    unit = spec.unit if spec.unit in df.columns else "patient_id"
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
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        for k, j in enumerate(order):
            assignment[ids[j]] = "val" if k < n_val else "test" if k < n_val + n_test else "train"

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
