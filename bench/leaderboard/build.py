"""`medsynbench leaderboard build`: records -> verified, ranked rows -> README.md and index.html.

The records are the single source of truth, but none of their numbers is trusted: each record's stored predictions
are checked (`bench.leaderboard.checks`, record stage: the board's scoring spec first, so the verdict never depends
on a cache), joined to the leaderboard's answer key and re-scored (or found in the cache keyed by
`ScoringSpec.cache_key`), and a record whose stored numbers differ is refused with the old pages kept. Generators
the eligibility checks exclude (privacy flag, failed contamination checks) are listed as not ranked.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.io import sha256_file, write_text
from bench.leaderboard.checks import RecordCase, cacheable_checks, record_problems, run_checks
from bench.leaderboard.checks import exclusion as checks_exclusion
from bench.leaderboard.config import (
    LeaderboardConfig,
    answer_key_digest,
    board_spec,
    load_config,
    load_key,
)
from bench.leaderboard.fidelity import fidelity_cells
from bench.leaderboard.key import AnswerKey, key_path
from bench.leaderboard.model_privacy import model_privacy_cells
from bench.leaderboard.rank import rank_predictions, replicate_cache
from bench.leaderboard.record import PUBLISHED_MODE, display_name, read_records
from bench.leaderboard.render import render_html, render_markdown
from bench.leaderboard.score import column_metrics, score_submission
from bench.leaderboard.spec import ScoringSpec, cached_scores, read_cache, write_cache
from bench.tasks import Task, load_task

# Record fields that held a registry metric's column before records carried `metrics.columns`.
LEGACY_COLUMN_FIELDS = {"ece": "calibration_error"}
# Fields newer scoring adds to an estimate that older records lack (why a value or interval is absent).
ADDED_FIELDS = frozenset({"status", "reason"})


def _binary_positive(cfg: LeaderboardConfig) -> list[str] | None:
    try:
        task = load_task(cfg.task.name)
    except BadInput:
        return None
    if task.version != cfg.task.version or task.labels.binary_view is None:
        return None
    return list(task.labels.binary_view.positive)


class StoredPredictions(Mapping[str, pd.DataFrame]):
    """Each record's stored predictions, checked against the hash the record carries when the board is opened and
    parsed only when a table is asked for: a warm build hashes every file but reads the rows of few."""

    def __init__(self, cfg: LeaderboardConfig, records: list[dict[str, Any]]) -> None:
        self._files: dict[str, tuple[Path, str]] = {}
        self._parsed: dict[str, pd.DataFrame] = {}
        problems = []
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
            self._files[r["id"]] = (p, r["predictions_sha256"])
        if problems:
            raise BadInput(f"{cfg.folder}: {len(problems)} record(s) without their predictions", problems)

    def sha256(self, rid: str) -> str:
        return self._files[rid][1]

    def __getitem__(self, rid: str) -> pd.DataFrame:
        if rid not in self._parsed:
            path, sha = self._files[rid]
            data = path.read_bytes()  # read once: hashed again (it may have changed since), then parsed
            if hashlib.sha256(data).hexdigest() != sha:
                raise BadInput(f"record {rid}: {path} changed while the leaderboard was being built")
            self._parsed[rid] = pd.read_parquet(io.BytesIO(data))
        return self._parsed[rid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def load_predictions(cfg: LeaderboardConfig, records: list[dict[str, Any]]) -> StoredPredictions:
    """Each record's stored predictions, checked against the hash the record carries (parsed on first use)."""
    return StoredPredictions(cfg, records)


class _Joined(Mapping[str, pd.DataFrame]):
    """Verified records' predictions joined to the answer key: the stored table itself where it is its join."""

    def __init__(self, stored: Mapping[str, pd.DataFrame], own: dict[str, pd.DataFrame | None]) -> None:
        self._stored, self._own = stored, own

    def __getitem__(self, rid: str) -> pd.DataFrame:
        j = self._own[rid]
        return self._stored[rid] if j is None else j

    def __iter__(self) -> Iterator[str]:
        return iter(self._own)

    def __len__(self) -> int:
        return len(self._own)


# ------------------------------------------------------------------------------------------------ verification

# Stored numbers are rounded to 6 decimals; anything further apart was not computed from these predictions.
TOLERANCE = 2e-6


def with_legacy_fields(stored: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """`fresh` plus the fields an older record keeps a column under (`calibration_error` for `columns.ece`), carrying
    the fresh column's numbers, so an old record is compared number for number and a new one has each metric once."""
    out = dict(fresh)
    for name, legacy in LEGACY_COLUMN_FIELDS.items():
        if legacy in stored and legacy not in fresh:
            col = (fresh.get("columns") or {}).get(name)
            old = stored[legacy]
            out[legacy] = (
                None
                if col is None or old is None
                else {**old, **{k: col.get(k) for k in ("value", "ci_low", "ci_high")}}
            )
    return out


def differences(stored: Any, fresh: Any, where: str = "metrics") -> list[str]:
    """Places where a record's stored numbers differ from the re-computed ones."""
    if isinstance(stored, dict) and isinstance(fresh, dict):
        out = []
        for k in sorted(set(stored) | set(fresh)):
            sub = f"{where}.{k}"
            if k not in fresh:
                out.append(f"{sub}: stored but not computed")
            elif k not in stored:
                if k not in ADDED_FIELDS:
                    out.append(f"{sub}: missing from the record")
            else:
                out += differences(stored[k], fresh[k], sub)
        return out
    if isinstance(stored, list) and isinstance(fresh, list) and len(stored) == len(fresh):
        return [
            d
            for i, (a, b) in enumerate(zip(stored, fresh, strict=True))
            for d in differences(a, b, f"{where}.{i}")
        ]
    num = (int, float)
    if isinstance(stored, num) and isinstance(fresh, num) and not isinstance(stored, bool):
        a, b = float(stored), float(fresh)
        if (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOLERANCE:
            return []
        return [f"{where}: record says {stored}, predictions give {fresh}"]
    return [] if stored == fresh else [f"{where}: record says {stored!r}, predictions give {fresh!r}"]


def verify_records(
    cfg: LeaderboardConfig,
    records: list[dict[str, Any]],
    tables: Mapping[str, pd.DataFrame],
    key: AnswerKey,
    task: Task,
    spec: ScoringSpec,
) -> Mapping[str, pd.DataFrame]:
    """Re-score every record from its stored predictions joined to the answer key; BadInput names each record
    whose stored numbers, spec (task definition, settings) or predictions do not agree. Returns the joined tables.

    The spec is checked before any score is looked up, so the verdict is the same with a warm or a cold cache."""
    assert cfg.answer_key is not None
    key_sha = answer_key_digest(cfg)
    cache, fresh_cache = read_cache(), {}
    problems: list[str] = []
    joined: dict[str, pd.DataFrame | None] = {}
    for r in records:
        rid, gen = r["id"], r["generator"]["name"]
        ck = spec.cache_key(r["predictions_sha256"], key_sha, gen)
        hit = cached_scores(cache, ck)
        # Checks that depend only on what the cache key holds (predictions, key, generator) passed when the entry
        # was written; the others (the record's own fields, its spec) always run. Same verdict, warm or cold.
        entry = cache[ck] if hit is not None else {}
        skip = set(entry.get("passed") or [])
        case = RecordCase(r, lambda rid=rid: tables[rid], key, spec, cfg.folder, task)
        found = record_problems(case, skip=skip)
        if found:
            problems += found
            continue
        # `submit` stores predictions already joined to the key; an entry that saw these predictions equal their
        # join (a function of the predictions and the key, both in the cache key) spares the join, and the table
        # is read only if the ranking needs it.
        stored_is_joined = entry.get("stored_is_joined") is True and set(cacheable_checks()) <= skip
        j: pd.DataFrame | None = None
        if not stored_is_joined:
            df = tables[rid]
            try:
                j = key.join(df, source=f"record {rid}: {r['predictions']['file']}")
            except BadInput as e:
                problems += [e.args[0], *e.problems]
                continue
            stored_is_joined = j.equals(df)
        ev = r["evaluation"]
        if hit is not None:
            metrics, split = hit
        else:
            metrics, split = score_submission(
                tables[rid] if j is None else j,
                task,
                generator=gen,
                primary=spec.primary,
                n_boot=spec.n_boot,
                seed=spec.seed,
            )
            metrics = json.loads(json.dumps(metrics))
        fresh_cache[ck] = {
            "metrics": metrics,
            "split": split,
            "passed": cacheable_checks(),
            "stored_is_joined": stored_is_joined,
        }
        diffs = differences(r["metrics"], with_legacy_fields(r["metrics"], metrics))
        if split != ev["split"]:
            diffs.insert(0, f"evaluation.split: record says {ev['split']!r}, predictions give {split!r}")
        if diffs:
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            problems.append(
                f"record {rid}: its stored numbers disagree with its predictions re-scored against the answer "
                f"key: {'; '.join(diffs[:5])}{more}"
            )
            continue
        joined[rid] = j
    write_cache(cache, fresh_cache)
    if problems:
        raise BadInput(
            f"{cfg.folder}: leaderboard not built: {len(problems)} problem(s) with the records (pages unchanged)",
            problems,
        )
    return _Joined(tables, joined)


def exclusion(cfg: LeaderboardConfig, record: dict[str, Any]) -> str | None:
    """Why the eligibility rules of leaderboard.yaml keep a record out of the ranking (None: ranked)."""
    return checks_exclusion(record, cfg.eligibility)


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


def metric_columns(
    metrics: dict[str, Any], task_kind: str = "classification"
) -> dict[str, dict[str, Any] | None]:
    """A record's value of every metric column of its board (`score.column_metrics`), keyed by metric name."""
    cols = metrics.get("columns") or {}
    out = {}
    for m in column_metrics(task_kind):
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
    task, spec = board_spec(cfg, records)
    key = load_key(cfg)
    stored = load_predictions(cfg, records)
    tables = verify_records(cfg, records, stored, key, task, spec)
    classes = list(task.classes)
    seg = task.is_segmentation
    reasons = {r["id"]: exclusion(cfg, r) for r in records}
    ranked = [r for r in records if reasons[r["id"]] is None]
    notes: list[str] = []
    ranks: dict[str, dict[str, Any]] = {}
    ranking = None
    if ranked:
        ranking, notes = rank_predictions(
            _Joined(tables, {r["id"]: None for r in ranked}),
            {r["id"]: r["metrics"]["headline_regime"] for r in ranked},
            classes,
            primary,
            split=split,
            n_boot=cfg.bootstrap.n,
            seed=cfg.bootstrap.seed,
            binary_positive=list(task.labels.binary_view.positive) if task.labels.binary_view else None,
            digests={r["id"]: stored.sha256(r["id"]) for r in ranked},
            cache=replicate_cache(),
            mask_classes=task.mask_classes if seg else None,
        )
        ranks = ranking.as_dict()

    pts = {}
    for r in ranked:
        gap = (r["metrics"].get("largest_gap") or {}).get("value")
        mem = (r.get("privacy") or {}).get("memorization_rate")
        if r["kind"] == "generator" and gap is not None and mem is not None:
            pts[r["id"]] = (ranks[r["id"]]["value"], gap, mem)
    front = pareto_front(pts)

    hib = ranking_hib(records)
    rows = [_row(r, ranks[r["id"]], r["id"] in front, task.kind) for r in ranked]
    rows.sort(key=lambda x: (x["rank"], -x["value"] if hib else x["value"], x["id"]))
    unranked = []
    for r in records:
        if reasons[r["id"]] is None:
            continue
        head = r["metrics"]["regimes"][r["metrics"]["headline_regime"]]
        blank = {"value": head["value"], "rank": None, "rank_low": None, "rank_high": None, "tie_group": None}
        unranked.append({**_row(r, blank, False, task.kind), "reason": reasons[r["id"]]})
    facts = {
        "primary_metric": primary,
        "higher_is_better": hib,
        "split": split,
        "sites": sorted({s for r in records for s in r["evaluation"]["sites"]}),
        "n_cases": ranking.n_cases if ranking else len(key.df),
        "n_patients": ranking.n_patients if ranking else int(key.df["patient_id"].nunique()),
        "n_boot": cfg.bootstrap.n,
        "n_boot_used": ranking.n_boot_used if ranking else 0,
        "notes": notes,
        "not_ranked": unranked,
        "answer_key": _key_facts(cfg),
    }
    if seg:  # classification facts (and so their pages) stay as they were
        facts["kind"] = task.kind
        facts["answer_key"]["masks"] = True
    return rows, facts


def _key_facts(cfg: LeaderboardConfig) -> dict[str, Any]:
    assert cfg.answer_key is not None
    p = key_path(cfg.folder, cfg.answer_key.path)
    inside = p.resolve().is_relative_to(cfg.folder.resolve())
    return {
        "file": p.relative_to(cfg.folder).as_posix() if inside else None,
        "sha256": cfg.answer_key.sha256,
        "published": inside,
    }


def _row(
    r: dict[str, Any], rank: dict[str, Any], pareto: bool, task_kind: str = "classification"
) -> dict[str, Any]:
    m = r["metrics"]
    head = m["regimes"][m["headline_regime"]]
    priv = r.get("privacy") or {}
    worst = m.get("worst_subgroup")
    gap = m.get("largest_gap")
    return {
        "id": r["id"],
        "name": display_name(r),
        "kind": r["kind"],
        "version": r["generator"].get("version"),
        "link": r["generator"].get("link"),
        "submitter": r["submitter"]["name"],
        "created": r["created"],
        **rank,
        "headline_regime": m["headline_regime"],
        "utility": {"value": head["value"], "ci_low": head["ci_low"], "ci_high": head["ci_high"]},
        "n_seeds": head["n_seeds"],
        "patient": _est(m.get("patient_level")),
        "ratio": _est(m.get("utility_ratio")),
        "gain": _est(m.get("gain_mixed")) and {**_est(m["gain_mixed"]), "regime": m["gain_mixed"]["regime"]},
        "rescue": _est(m.get("scarcity_rescue"))
        and {**_est(m["scarcity_rescue"]), "regime": m["scarcity_rescue"]["regime"]},
        "worst": _est(worst) and {**_est(worst), "group": f"{worst['group_by']}={worst['group']}"},
        "gap": _est(gap) and {**_est(gap), "group": f"{gap['group_by']}: {' vs '.join(gap['groups'])}"},
        **metric_columns(m, task_kind),
        **fidelity_cells(r),
        **model_privacy_cells(r),
        "memorization": None
        if priv.get("memorization_rate") is None
        else {
            "value": priv["memorization_rate"],
            "ci_low": priv.get("ci_low"),
            "ci_high": priv.get("ci_high"),
            "flagged": priv.get("flagged"),
        },
        "contamination": (priv.get("contamination") or {}).get("status") if priv else None,
        "pareto": pareto,
    }


def ranking_hib(records: list[dict[str, Any]]) -> bool:
    return bool(records[0]["evaluation"]["higher_is_better"]) if records else True


def reference_controls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The control checks the reference records carry (one reference per submitted run)."""
    return [c for r in records if r.get("kind") == "reference" for c in (r.get("controls") or [])]


def build(board: str | Path) -> tuple[Path, Path]:
    """Render README.md and index.html from the records; both written atomically. A reference run whose controls
    fail is not published (BadInput naming the control)."""
    cfg = load_config(board)
    records = read_records(cfg.records_dir)
    controls = reference_controls(records)
    failed = run_checks("board", records)
    if failed:
        raise BadInput(
            f"{cfg.records_dir}: not published: the reference run fails {len(failed)} control check(s)",
            failed,
        )
    rows, facts = board_rows(cfg, records)
    facts["controls"] = controls
    md = render_markdown(cfg, rows, facts)
    html = render_html(cfg, rows, facts)
    readme = write_text(cfg.folder / "README.md", md, PUBLISHED_MODE)
    index = write_text(cfg.folder / "index.html", html, PUBLISHED_MODE)
    return readme, index


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"
