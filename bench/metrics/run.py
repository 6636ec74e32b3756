"""Evaluate a RUN folder: read finished runs, score them, write tables, summary and report atomically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BadInput
from bench.io import atomic_dir, read_table, write_json, write_table, write_text
from bench.metrics.compare import compare_to_baseline, summarize
from bench.metrics.evaluate import evaluate_predictions, prepare_predictions
from bench.metrics.validate import ROW_NOTE, validate_predictions
from bench.tasks import TASK_FILE, Task, load_task

log = logging.getLogger(__name__)
PREDICTIONS = "predictions.parquet"
DONE = "DONE"


def finished_runs(run: Path) -> list[Path]:
    """Run folders with a DONE marker and a predictions file, sorted by name."""
    return sorted(
        d for d in run.iterdir() if d.is_dir() and (d / DONE).is_file() and (d / PREDICTIONS).is_file()
    )


def load_run_predictions(run: str | Path) -> tuple[Task, pd.DataFrame]:
    """The RUN folder's task and the predictions of every finished run, each file checked on its own first."""
    run = Path(run)
    if not run.is_dir():
        raise BadInput(f"{run}: not a run folder")
    if not (run / TASK_FILE).is_file():
        raise BadInput(f"{run}: no {TASK_FILE} (a run folder holds the task it ran)")
    task = load_task(run / TASK_FILE)
    dirs = finished_runs(run)
    if not dirs:
        raise BadInput(f"{run}: no finished runs (sub-folders with {DONE} and {PREDICTIONS})")
    frames, problems = [], []
    cols = [c for c in task.subgroups.columns if c != "age_group"]
    for d in dirs:
        f = read_table(d / PREDICTIONS)
        for p in validate_predictions(f, task.classes, subgroup_columns=cols):
            problems.append(f"{d / PREDICTIONS}: {p}")
        frames.append(f)
    if problems:
        raise BadInput(f"{run}: {len(problems)} problem(s) in predictions ({ROW_NOTE})", problems)
    return task, pd.concat(frames, ignore_index=True)


def evaluate_run(
    run: str | Path,
    out: str | Path | None = None,
    *,
    n_boot: int | None = None,
    seed: int = 0,
    min_patients: int | None = None,
    min_positives: int | None = None,
) -> dict[str, Any]:
    """Write metrics, comparisons, summary.json, report.md and report.html to `out` (default RUN/evaluation).

    The folder is assembled under a temporary name and renamed into place, replacing an earlier evaluation only
    when everything succeeded. Returns the summary.
    """
    from bench.report import Settings, build_report

    run = Path(run)
    out = Path(out) if out else run / "evaluation"
    task, preds = load_run_predictions(run)
    n_boot = int(task.metrics.bootstrap if n_boot is None else n_boot)
    mp = int(task.metrics.min_patients if min_patients is None else min_patients)
    mpos = int(task.metrics.min_positives if min_positives is None else min_positives)
    src = str(run)
    table = evaluate_predictions(
        preds, task, n_boot=n_boot, seed=seed, min_patients=mp, min_positives=mpos, source=src
    )
    comps = compare_to_baseline(
        preds, task, n_boot=n_boot, seed=seed, min_patients=mp, min_positives=mpos, source=src
    )
    summary = summarize(table, comps, task)
    summary["settings"] = dict(
        n_boot=n_boot,
        seed=seed,
        min_patients=mp,
        min_positives=mpos,
        target_specificity=task.metrics.target_specificity,
        ece_bins=task.metrics.ece_bins,
        runs=[d.name for d in finished_runs(run)],
    )
    prepared = prepare_predictions(preds, task, source=src)
    report = build_report(table, comps, summary, task, Settings(n_boot, seed, mp, mpos, source=src), prepared)
    with atomic_dir(out, overwrite=True) as tmp:
        write_tables(tmp, "metrics", table)
        write_tables(tmp, "comparisons", comps)
        write_json(tmp / "summary.json", summary)
        write_text(tmp / "report.md", report.markdown())
        write_text(tmp / "report.html", report.html())
    log.info("wrote %s", out)
    return summary


def write_tables(folder: Path, stem: str, df: pd.DataFrame) -> None:
    write_table(folder / f"{stem}.parquet", df)
    write_table(folder / f"{stem}.csv", df)
