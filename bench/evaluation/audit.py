"""Fairness audit of any predictions file that follows the contract (columns renamable), without rerunning.

Run-key columns (generator, regime, seed, backbone) are optional here: a paper's submission often holds one model.
Missing ones are filled with `submitted` (generator, regime), 0 (seed) and `unknown` (backbone).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BadInput
from bench.evaluation.report import Settings, build_report
from bench.evaluation.run import write_tables
from bench.evaluation.summary import summary_entry, summary_header
from bench.io import atomic_dir, read_table, write_json, write_text
from bench.metrics.compare import headline_split
from bench.metrics.evaluate import GROUP_COLUMNS, evaluate_predictions, prepare_predictions
from bench.metrics.table import MetricTable
from bench.runfolder import ARM_KEYS
from bench.tasks import Subgroups, Task, load_task

log = logging.getLogger(__name__)
RUN_KEY_DEFAULTS = {"generator": "submitted", "regime": "submitted", "seed": 0, "backbone": "unknown"}


def parse_map(spec: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """'y_true=label,prob_=p_' -> ({'label': 'y_true'}, {'p_': 'prob_'}): contract name = name in the file.

    Entries whose contract name ends with '_' map a column prefix (the class name follows the prefix).
    """
    cols: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    if not spec:
        return cols, prefixes
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if item.count("=") != 1 or not all(p.strip() for p in item.split("=")):
            raise BadInput(f"--map {item!r}: expected CONTRACT_NAME=FILE_NAME, e.g. y_true=label or prob_=p_")
        ours, theirs = (p.strip() for p in item.split("="))
        if ours.endswith("_"):
            prefixes[theirs] = ours
        else:
            cols[theirs] = ours
    return cols, prefixes


def apply_map(df: pd.DataFrame, spec: str | None, source: str) -> pd.DataFrame:
    cols, prefixes = parse_map(spec)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise BadInput(
            f"{source}: --map names column(s) not in the file: {', '.join(missing)} (columns: {', '.join(map(str, df.columns))})"
        )
    rename = dict(cols)
    for theirs, ours in prefixes.items():
        hits = [c for c in df.columns if str(c).startswith(theirs)]
        if not hits:
            raise BadInput(
                f"{source}: --map prefix {theirs!r} matches no column (columns: {', '.join(map(str, df.columns))})"
            )
        for c in hits:
            rename[c] = ours + str(c)[len(theirs) :]
    return df.rename(columns=rename)


def infer_task(df: pd.DataFrame, positive: Sequence[str] | None, age_bins: Sequence[float] | None) -> Task:
    """A minimal task from the file: classes from the prob_ columns, in column order."""
    classes = [str(c)[5:] for c in df.columns if str(c).startswith("prob_")]
    if len(classes) < 2:
        raise BadInput(
            "cannot infer the classes: fewer than two prob_<class> columns (pass --task, or --map prob_=PREFIX)"
        )
    pos = list(positive) if positive else classes[1:]
    unknown = [p for p in pos if p not in classes]
    if unknown:
        raise BadInput(
            f"--positive names unknown class(es) {', '.join(unknown)} (classes: {', '.join(classes)})"
        )
    spec: dict[str, Any] = dict(
        name="audit",
        version="1",
        modality="unknown",
        labels=dict(classes=classes, binary_view=dict(name="positive", positive=pos)),
        sites=dict(train=["any"]),
        source=dict(kind="none"),
    )
    if age_bins is not None:
        spec["subgroups"] = dict(age_bins=list(age_bins))
    return Task.model_validate(spec)


def audit_predictions(
    path: str | Path,
    out: str | Path,
    *,
    by: Sequence[str],
    task: str | Path | Task | None = None,
    threshold_from: str = "val",
    mapping: str | None = None,
    positive: Sequence[str] | None = None,
    intersect: bool = False,
    n_boot: int | None = None,
    seed: int = 0,
    min_patients: int | None = None,
    min_positives: int | None = None,
    age_bins: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Audit a predictions file by the columns `by`; writes metrics, summary.json and reports to `out` atomically."""
    path = Path(path)
    src = str(path)
    by = [b.strip() for b in by if b.strip()]
    if not by:
        raise BadInput("--by: name at least one subgroup column, e.g. --by sex,age_group")
    df = apply_map(read_table(path), mapping, src)
    if task is not None:
        t = load_task(task)
        if positive:
            raise BadInput("--positive is only used without --task (the task defines its binary view)")
        if age_bins is not None:
            t = t.model_copy(
                update={"subgroups": Subgroups(**{**t.subgroups.model_dump(), "age_bins": list(age_bins)})}
            )
    else:
        t = infer_task(df, positive, age_bins)
    for k, v in RUN_KEY_DEFAULTS.items():
        if k not in df.columns:
            df[k] = v
    threshold: float | None = None
    if threshold_from != "val":
        try:
            threshold = float(threshold_from)
        except ValueError:
            raise BadInput(f"--threshold-from {threshold_from!r}: expected 'val' or a number") from None
    inter = [list(i) for i in t.subgroups.intersections if set(i) <= set(by)]
    if intersect and len(by) > 1 and by not in inter:
        inter.append(list(by))
    prepared = prepare_predictions(df, t, source=src, subgroup_columns=by)
    if threshold is None and not (prepared["split"] == "val").any():
        raise BadInput(
            f"{src}: no validation rows (split == 'val') to choose the threshold from; pass --threshold-from NUMBER"
        )
    n_boot = int(t.metrics.bootstrap if n_boot is None else n_boot)
    mp = int(t.metrics.min_patients if min_patients is None else min_patients)
    mpos = int(t.metrics.min_positives if min_positives is None else min_positives)
    table = evaluate_predictions(
        df,
        t,
        n_boot=n_boot,
        seed=seed,
        min_patients=mp,
        min_positives=mpos,
        subgroup_columns=by,
        intersections=inter,
        threshold=threshold,
        source=src,
    )
    summary = audit_summary(table, t, by)
    summary["settings"] = dict(
        n_boot=n_boot,
        seed=seed,
        min_patients=mp,
        min_positives=mpos,
        by=by,
        intersections=inter,
        threshold_from=threshold_from,
        source=src,
    )
    settings = Settings(
        n_boot, seed, mp, mpos, threshold="validation" if threshold is None else f"{threshold:g}", source=src
    )
    report = build_report(table, None, summary, t, settings, prepared, audit=True)
    with atomic_dir(out, overwrite=True) as tmp:
        write_tables(tmp, "metrics", table)
        write_json(tmp / "summary.json", summary)
        write_text(tmp / "report.md", report.markdown())
        write_text(tmp / "report.html", report.html())
    log.info("wrote %s", out)
    return summary


def audit_summary(table: pd.DataFrame, task: Task, by: Sequence[str]) -> dict[str, Any]:
    split = headline_split(table)
    primary = task.metrics.primary
    runs = []
    for key, t in table.groupby(list(ARM_KEYS), sort=True):
        run: dict[str, Any] = dict(zip(ARM_KEYS, key, strict=True))
        mt = MetricTable(t)
        for col in by:
            run[col] = {
                m: summary_entry(
                    mt.one(m, split=split, scope="subgroup", group_by=col), ("group", *GROUP_COLUMNS)
                )
                for m in (f"{primary}_worst", f"{primary}_gap", "equalized_odds_difference", "fnr_gap")
            }
        runs.append(run)
    return {**summary_header(task, primary, split), "runs": runs}
