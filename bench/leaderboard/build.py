"""`medsynbench leaderboard build`: records -> ranked rows -> README.md and index.html.

The records are the single source of truth; everything here is derived from them (and the predictions they were
scored from) at build time, so the pages never drift from the records and need no index file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.io import sha256_file, write_text
from bench.leaderboard.config import LeaderboardConfig, load_config
from bench.leaderboard.fidelity import fidelity_cells
from bench.leaderboard.rank import rank_predictions
from bench.leaderboard.record import display_name, read_records
from bench.leaderboard.render import render_html, render_markdown
from bench.metrics import reported
from bench.tasks import load_task

# Record fields that held a registry metric's column before records carried `metrics.columns`.
LEGACY_COLUMN_FIELDS = {"ece": "calibration_error"}


def _classes_from(df: pd.DataFrame) -> list[str]:
    return [c[len("prob_") :] for c in df.columns if str(c).startswith("prob_")]


def _binary_positive(cfg: LeaderboardConfig) -> list[str] | None:
    try:
        task = load_task(cfg.task.name)
    except BadInput:
        return None
    if task.version != cfg.task.version or task.labels.binary_view is None:
        return None
    return list(task.labels.binary_view.positive)


def load_predictions(cfg: LeaderboardConfig, records: list[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """Each record's stored predictions, checked against the hash the record carries."""
    out, problems = {}, []
    for r in records:
        p = cfg.folder / r["predictions"]["file"]
        if not p.is_file():
            problems.append(f"record {r['id']}: predictions file {p} is missing")
            continue
        if sha256_file(p) != r["predictions_sha256"]:
            problems.append(
                f"record {r['id']}: {p} does not match the record's predictions_sha256 (file changed)"
            )
            continue
        out[r["id"]] = pd.read_parquet(p)
    if problems:
        raise BadInput(f"{cfg.folder}: {len(problems)} record(s) without their predictions", problems)
    return out


def pareto_front(points: dict[str, tuple[float, float, float]]) -> set[str]:
    """Keys not dominated on (utility: max, gap: min, memorization: min)."""
    front = set()
    for k, (u, g, m) in points.items():
        dominated = False
        for k2, (u2, g2, m2) in points.items():
            if k2 == k:
                continue
            if u2 >= u and g2 <= g and m2 <= m and (u2 > u or g2 < g or m2 < m):
                dominated = True
                break
        if not dominated:
            front.add(k)
    return front


def _est(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if not d or d.get("value") is None:
        return None
    return {"value": d["value"], "ci_low": d.get("ci_low"), "ci_high": d.get("ci_high")}


def metric_columns(metrics: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """A record's value of every leaderboard column the metric registry declares, keyed by metric name."""
    cols = metrics.get("columns") or {}
    out = {}
    for m in reported("leaderboard"):
        v = cols.get(m.name)
        if v is None and m.name in LEGACY_COLUMN_FIELDS:
            v = metrics.get(LEGACY_COLUMN_FIELDS[m.name])
        out[m.name] = _est(v)
    return out


def board_rows(
    cfg: LeaderboardConfig, records: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per record, ranked, plus facts about the board (metric, split, cases, notes)."""
    if not records:
        return [], {
            "notes": ["no records yet"],
            "primary_metric": cfg.primary_metric or "",
            "split": "",
            "n_cases": 0,
            "n_patients": 0,
            "n_boot": 0,
            "higher_is_better": True,
        }
    bad = [
        f"record {r['id']}: task {r['task']['name']} {r['task']['version']}"
        for r in records
        if (r["task"]["name"], r["task"]["version"]) != (cfg.task.name, cfg.task.version)
    ]
    if bad:
        raise BadInput(f"{cfg.records_dir}: records of another task or version", bad)
    primaries = {r["evaluation"]["primary_metric"] for r in records}
    splits = {r["evaluation"]["split"] for r in records}
    if len(primaries) > 1 or len(splits) > 1:
        raise BadInput(
            f"{cfg.records_dir}: records scored with different primary metrics {sorted(primaries)} or "
            f"splits {sorted(splits)}; re-submit them so they compare"
        )
    primary, split = primaries.pop(), splits.pop()
    tables = load_predictions(cfg, records)
    classes = _classes_from(next(iter(tables.values())))
    headline = {r["id"]: r["metrics"]["headline_regime"] for r in records}
    ranking, notes = rank_predictions(
        tables,
        headline,
        classes,
        primary,
        split=split,
        n_boot=cfg.bootstrap.n,
        seed=cfg.bootstrap.seed,
        binary_positive=_binary_positive(cfg),
    )
    ranks = ranking.as_dict()

    pts = {}
    for r in records:
        gap = (r["metrics"].get("largest_gap") or {}).get("value")
        mem = (r.get("privacy") or {}).get("memorization_rate")
        if r["kind"] == "generator" and gap is not None and mem is not None:
            pts[r["id"]] = (ranks[r["id"]]["value"], gap, mem)
    front = pareto_front(pts)

    rows = []
    for r in records:
        m = r["metrics"]
        head = m["regimes"][m["headline_regime"]]
        priv = r.get("privacy") or {}
        worst = m.get("worst_subgroup")
        gap = m.get("largest_gap")
        rows.append(
            {
                "id": r["id"],
                "name": display_name(r),
                "kind": r["kind"],
                "version": r["generator"].get("version"),
                "link": r["generator"].get("link"),
                "submitter": r["submitter"]["name"],
                "created": r["created"],
                **ranks[r["id"]],
                "headline_regime": m["headline_regime"],
                "utility": {"value": head["value"], "ci_low": head["ci_low"], "ci_high": head["ci_high"]},
                "n_seeds": head["n_seeds"],
                "ratio": _est(m.get("utility_ratio")),
                "gain": _est(m.get("gain_mixed"))
                and {**_est(m["gain_mixed"]), "regime": m["gain_mixed"]["regime"]},
                "rescue": _est(m.get("scarcity_rescue"))
                and {**_est(m["scarcity_rescue"]), "regime": m["scarcity_rescue"]["regime"]},
                "worst": _est(worst) and {**_est(worst), "group": f"{worst['group_by']}={worst['group']}"},
                "gap": _est(gap)
                and {**_est(gap), "group": f"{gap['group_by']}: {' vs '.join(gap['groups'])}"},
                **metric_columns(m),
                **fidelity_cells(r),
                "memorization": None
                if priv.get("memorization_rate") is None
                else {
                    "value": priv["memorization_rate"],
                    "ci_low": priv.get("ci_low"),
                    "ci_high": priv.get("ci_high"),
                    "flagged": priv.get("flagged"),
                },
                "contamination": (priv.get("contamination") or {}).get("status") if priv else None,
                "pareto": r["id"] in front,
            }
        )
    rows.sort(key=lambda x: (x["rank"], -x["value"] if ranking_hib(records) else x["value"], x["id"]))
    facts = {
        "primary_metric": primary,
        "higher_is_better": ranking_hib(records),
        "split": split,
        "sites": sorted({s for r in records for s in r["evaluation"]["sites"]}),
        "n_cases": ranking.n_cases,
        "n_patients": ranking.n_patients,
        "n_boot": cfg.bootstrap.n,
        "n_boot_used": ranking.n_boot_used,
        "notes": notes,
    }
    return rows, facts


def ranking_hib(records: list[dict[str, Any]]) -> bool:
    return bool(records[0]["evaluation"]["higher_is_better"]) if records else True


def build(board: str | Path) -> tuple[Path, Path]:
    """Render README.md and index.html from the records; both written atomically."""
    cfg = load_config(board)
    records = read_records(cfg.records_dir)
    rows, facts = board_rows(cfg, records)
    md = render_markdown(cfg, rows, facts)
    html = render_html(cfg, rows, facts)
    readme = write_text(cfg.folder / "README.md", md)
    index = write_text(cfg.folder / "index.html", html)
    return readme, index


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"
