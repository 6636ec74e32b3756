"""How the command line prints an estimate: a number with its interval, or `undefined` with the reason.

A small evaluation can leave a metric without a value (one class only, no positives, no validation data for a
threshold) or without an interval (fewer patients than `min_patients`); commands print that, with the metric
table's reason, and still exit 0. Every command that prints an estimate goes through `estimate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def estimate(est: Mapping[str, Any] | None, digits: int = 3, *, value: str = "value") -> str:
    """`0.912 [0.880, 0.940]`; `0.912 (no interval: reason)`; `undefined (reason)`; `–` for nothing at all."""
    if not est:
        return "–"
    status = str(est.get("status") or "ok")
    reason = str(est.get("reason") or "").strip() or ("" if status == "ok" else status)
    v = _finite(est.get(value))
    if v is None:
        return f"undefined ({reason})" if reason else "undefined"
    lo, hi = _finite(est.get("ci_low")), _finite(est.get("ci_high"))
    if lo is None or hi is None:
        return f"{v:.{digits}f} (no interval{': ' + reason if reason else ''})"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def number(x: Any, digits: int = 3) -> str:
    """One number without an interval; `undefined` when it is missing or not finite."""
    v = _finite(x)
    return "undefined" if v is None else f"{v:.{digits}f}"


def run_lines(summary: Mapping[str, Any]) -> list[str]:
    """One line per model of a summary.json (`evaluate`, `audit`): the primary metric on the headline split."""
    out = []
    for r in summary.get("runs", []):
        x = r.get("external_primary") or r.get("test_primary")
        if x:
            out.append(
                f"  {r['generator']}/{r['regime']}/{r['backbone']}: {summary.get('primary_metric', 'primary')} "
                f"{estimate(x)}, {x.get('n_patients', 0)} patients"
            )
    return out
