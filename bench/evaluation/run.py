"""Evaluate a RUN folder: read finished runs, score them, write tables, summary and report atomically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BadInput
from bench.evaluation.controls import check_controls, controls_blocks, read_privacy, run_controls
from bench.evaluation.model_privacy import check_copycat_leak, model_privacy_summary, read_model_privacy
from bench.evaluation.report import Settings, build_report
from bench.evaluation.report_sections import fidelity_section, model_privacy_section
from bench.evaluation.summary import summarize
from bench.io import atomic_dir, read_json, read_table, write_json, write_table, write_text
from bench.metrics.compare import compare_to_baseline
from bench.metrics.evaluate import evaluate_predictions, prepare_predictions
from bench.metrics.segeval import compare_segmentation, evaluate_segmentation, mask_classes, prepare_counts
from bench.metrics.validate import ROW_NOTE, validate_predictions
from bench.runfolder import DONE, PREDICTIONS_FILE, SEG_PREDICTIONS_FILE, RunDir
from bench.tasks import Task, load_task

log = logging.getLogger(__name__)


def load_run_predictions(run: str | Path) -> tuple[Task, pd.DataFrame]:
    """The RUN folder's task and the predictions of every finished run, each file checked on its own first."""
    rd = RunDir(run).require()
    task = load_task(rd.task_file)
    runs = rd.finished_runs()
    if not runs:
        raise BadInput(f"{rd.path}: no finished runs (sub-folders with {DONE} and {PREDICTIONS_FILE})")
    frames, problems = [], []
    cols = [c for c in task.subgroups.columns if c != "age_group"]
    for r in runs:
        f = read_table(r.predictions)
        for p in validate_predictions(f, task.classes, subgroup_columns=cols):
            problems.append(f"{r.predictions}: {p}")
        frames.append(f)
    if problems:
        raise BadInput(f"{rd.path}: {len(problems)} problem(s) in predictions ({ROW_NOTE})", problems)
    return task, pd.concat(frames, ignore_index=True)


def load_run_counts(run: str | Path) -> tuple[Task, pd.DataFrame]:
    """A segmentation RUN folder's task and the count tables (`seg_predictions.parquet`) of every finished run, each
    file checked on its own first."""
    rd = RunDir(run).require()
    task = load_task(rd.task_file)
    runs = [r for r in rd.finished_runs() if r.seg_predictions.is_file()]
    if not runs:
        raise BadInput(
            f"{rd.path}: no finished segmentation runs (sub-folders with {DONE} and {SEG_PREDICTIONS_FILE})"
        )
    frames, problems = [], []
    for r in runs:
        f = read_table(r.seg_predictions)
        try:
            prepare_counts(f, task, mask_classes(task), source=str(r.seg_predictions))
        except BadInput as e:
            problems.append(str(e))
        frames.append(f)
    if problems:
        raise BadInput(f"{rd.path}: {len(problems)} problem(s) in count tables ({ROW_NOTE})", problems)
    return task, pd.concat(frames, ignore_index=True)


def _score(
    run: Path, n_boot: int, seed: int, mp: int, mpos: int
) -> tuple[Task, pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """The metric table, the comparisons with real-only and (classification) the prepared predictions."""
    src = str(run)
    kw = dict(n_boot=n_boot, seed=seed, min_patients=mp, min_positives=mpos, source=src)
    if load_task(RunDir(run).require().task_file).is_segmentation:
        task, counts = load_run_counts(run)
        return task, evaluate_segmentation(counts, task, **kw), compare_segmentation(counts, task, **kw), None
    task, preds = load_run_predictions(run)
    table = evaluate_predictions(preds, task, **kw)
    comps = compare_to_baseline(preds, task, **kw)
    return task, table, comps, prepare_predictions(preds, task, source=src)


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
    run = Path(run)
    out = Path(out) if out else RunDir(run).evaluation
    task = load_task(RunDir(run).require().task_file)
    n_boot = int(task.metrics.bootstrap if n_boot is None else n_boot)
    mp = int(task.metrics.min_patients if min_patients is None else min_patients)
    mpos = int(task.metrics.min_positives if min_positives is None else min_positives)
    src = str(run)
    task, table, comps, prepared = _score(run, n_boot, seed, mp, mpos)
    summary = summarize(table, comps, task)
    summary["settings"] = dict(
        n_boot=n_boot,
        seed=seed,
        min_patients=mp,
        min_positives=mpos,
        target_specificity=task.metrics.target_specificity,
        ece_bins=task.metrics.ece_bins,
        runs=[r.path.name for r in RunDir(run).finished_runs()],
    )
    ctl_gens = run_controls(run)
    controls = check_controls(table, comps, read_privacy(run, list(ctl_gens)), task, ctl_gens)
    model_privacy = read_model_privacy(run)
    if model_privacy is not None:
        controls += check_copycat_leak(model_privacy, ctl_gens)
        summary["model_privacy"] = model_privacy_summary(model_privacy)
    summary["controls"] = [c.to_dict() for c in controls]
    # The report is shared: it names the run folder, not where it lies on this machine.
    settings = Settings(n_boot, seed, mp, mpos, source=Path(src).name)
    report = build_report(table, comps, summary, task, settings, prepared)
    # Controls come first: a failed control matters more than any ranking below it.
    report.blocks[0:0] = controls_blocks(controls)
    fidelity_section(report, read_fidelity(run), summary)
    model_privacy_section(report, model_privacy, summary)
    with atomic_dir(out, overwrite=True) as tmp:
        write_tables(tmp, "metrics", table)
        write_tables(tmp, "comparisons", comps)
        write_json(tmp / "summary.json", summary)
        write_text(tmp / "report.md", report.markdown())
        write_text(tmp / "report.html", report.html())
    log.info("wrote %s", out)
    return summary


def read_fidelity(run: str | Path) -> dict[str, dict[str, Any]]:
    """RUN/fidelity/<generator>/fidelity.json of every generator that has one (`medsynbench fidelity --run RUN`)."""
    out = {}
    for g, path in RunDir(run).fidelity_files().items():
        try:
            out[g] = read_json(path)
        except (OSError, ValueError) as e:
            raise BadInput(f"{path}: not readable JSON: {e}") from None
    return out


def write_tables(folder: Path, stem: str, df: pd.DataFrame) -> None:
    write_table(folder / f"{stem}.parquet", df)
    write_table(folder / f"{stem}.csv", df)
