"""A reader of the tidy metric table (`evaluate_predictions`): rows by arm, overall, by group, one estimate, and one
serialiser, so consumers ask for what they need instead of filtering columns by hand.

    t = MetricTable(table)
    row = t.one("auroc_macro", split="external", generator="ddpm", regime="synthetic")
    t.estimate(row)                        # {"value", "ci_low", "ci_high"} (+ "status", "reason" when not ok)
    t.by_group("auroc_macro", split="external", group_by="sex", generator="ddpm", regime="synthetic")
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

OVERALL = "overall"


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if np.isfinite(f) else None


def number(x: Any) -> float | None:
    """A table cell as a float, None where it is missing or NaN; full precision, infinities kept (summary.json and
    control results keep numbers as computed; `MetricTable.estimate` rounds for records)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else f


class MetricTable:
    """Read-only view of a metric table (columns `bench.metrics.evaluate.TABLE_COLUMNS`)."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.df = table

    def select(self, **where: Any) -> pd.DataFrame:
        """Rows whose columns equal the given values (e.g. `metric=`, `split=`, `scope=`, `generator=`); a list,
        tuple or set matches any of its values, and None matches everything. Works on any frame with these columns
        (the comparisons too), keeping its row order."""
        mask = np.ones(len(self.df), dtype=bool)
        for col, value in where.items():
            if value is None:
                continue
            if isinstance(value, (list, tuple, set, frozenset)):
                mask &= self.df[col].isin(list(value)).to_numpy()
            else:
                mask &= (self.df[col] == value).to_numpy()
        return self.df[mask]

    def one(self, metric: str, *, split: str, scope: str = OVERALL, **where: Any) -> pd.Series | None:
        """The single row of `metric` in `scope` on `split` (and the given arm / group), or None."""
        rows = self.select(metric=metric, split=split, scope=scope, **where)
        return rows.iloc[0] if len(rows) else None

    def overall(self, metric: str, split: str, **arm: Any) -> dict[str, Any] | None:
        """The overall estimate of `metric` on `split` for one arm, serialised."""
        row = self.one(metric, split=split, **arm)
        return None if row is None else self.estimate(row)

    def by_group(
        self, metric: str, *, split: str, group_by: str, scope: str = "subgroup", **arm: Any
    ) -> pd.DataFrame:
        """One row per group of `group_by` (a subgroup column, `site`, or an intersection)."""
        return self.select(metric=metric, split=split, scope=scope, group_by=group_by, **arm)

    @staticmethod
    def estimate(row: pd.Series) -> dict[str, Any]:
        """A row as a stored estimate: value and interval (None where not finite, rounded to 6 decimals); a row that
        is not `ok` (undefined, or too few patients for an interval) also keeps its status and reason."""
        out: dict[str, Any] = {k: _num(row[k]) for k in ("value", "ci_low", "ci_high")}
        status = str(row.get("status", "ok"))
        if status != "ok":
            out["status"] = status
            out["reason"] = str(row.get("reason") or "")
        return out
