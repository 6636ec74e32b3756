"""The one place the service meets the leaderboard's answer key.

Everything the service needs from an answer key goes through the functions of this module (`build_key`,
`load_key`, `salt_ids`, `score_parts`, `secret_ids`), on `bench.leaderboard.key.AnswerKey`.

An answer key has one row per evaluation case: salted `case_id` and `patient_id`, `label`, `site`, `split`, the
task's subgroup columns, and `part` (`public` or `private`). Teams never see it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.leaderboard.key import AnswerKey, hash_ids
from bench.tasks import Task

PARTS = ("public", "private")


# ---------------------------------------------------------------------------------------------------------------
# What the service uses.
# ---------------------------------------------------------------------------------------------------------------


def build_key(
    real_manifest: Path, task: Task, salt: str, private_fraction: float, seed: int = 0
) -> AnswerKey:
    return AnswerKey.build_from_manifest(real_manifest, task, salt, private_fraction, seed)


def load_key(path: Path) -> AnswerKey:
    return AnswerKey.read(path)


def salt_ids(values: Iterable[Any], salt: str) -> pd.Series:
    """The key's form of real identifiers (a run's predictions carry the raw ones)."""
    return hash_ids(pd.Series(list(values), dtype=object).astype(str), salt)


def secret_ids(key: AnswerKey) -> set[str]:
    """Identifiers no response may contain."""
    return set(key.df["case_id"].astype(str)) | set(key.df["patient_id"].astype(str))


def check_probabilities(preds: pd.DataFrame, task: Task) -> list[str]:
    problems = []
    cols = [f"prob_{c}" for c in task.classes]
    missing = [c for c in cols if c not in preds.columns]
    if missing:
        return [f"column(s) {missing} are missing (one prob_<class> column per class of task {task.name!r})"]
    p = preds[cols].apply(pd.to_numeric, errors="coerce")
    bad = p.isna().any(axis=1) | (p < 0).any(axis=1) | (p > 1).any(axis=1)
    if bad.any():
        problems.append(f"{int(bad.sum())} row(s) hold probabilities that are missing or outside [0, 1]")
    sums = p.sum(axis=1)
    off = ~bad & ((sums - 1).abs() > 1e-3)
    if off.any():
        problems.append(f"{int(off.sum())} row(s) have probabilities that do not sum to 1")
    return problems


def validate_predictions(key: AnswerKey, preds: pd.DataFrame, task: Task) -> list[str]:
    """Every problem of a predictions table: columns, probabilities, coverage of the key's cases."""
    if "case_id" not in preds.columns:
        return ["column 'case_id' is missing"]
    problems = check_probabilities(preds, task) + key.cross_check(preds)
    try:
        key.join(preds)
    except BadInput as e:
        problems += [e.args[0], *e.problems]
    return problems


def _score_frame(df: pd.DataFrame, task: Task, n_boot: int, seed: int) -> dict[str, Any]:
    from bench.metrics.bootstrap import patient_weights, percentile_interval
    from bench.metrics.core import get_metric
    from bench.metrics.evaluate import positive_classes

    name = task.metrics.primary
    metric = get_metric(name, task.classes).for_task(task.metrics)
    probs = df[[f"prob_{c}" for c in task.classes]].astype(float).to_numpy()
    if metric.target == "multiclass":
        y = pd.Categorical(df["y_true"], categories=task.classes).codes.astype(np.int64)
        score: Any = probs
    else:
        pos = positive_classes(task)
        y = df["y_true"].isin(pos).to_numpy().astype(np.int64)
        score = df[[f"prob_{c}" for c in pos]].astype(float).sum(axis=1).to_numpy()
    value = metric(y, score)
    patients, pidx = np.unique(df["patient_id"].astype(str).to_numpy(), return_inverse=True)
    w = patient_weights(np.zeros(len(patients), dtype=np.int64), n_boot, seed)[:, pidx]
    reps = metric.kernel(y, score)(w)
    lo, hi, _ = percentile_interval(reps)
    return {
        "metric": name,
        "higher_is_better": bool(metric.higher_is_better),
        "value": None if np.isnan(value) else float(value),
        "ci_low": None if np.isnan(lo) else float(lo),
        "ci_high": None if np.isnan(hi) else float(hi),
        "n_cases": int(len(df)),
        "n_patients": int(len(patients)),
    }


def score_parts(
    key: AnswerKey, preds: pd.DataFrame, task: Task, *, n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """The task's primary metric with a patient bootstrap interval, on each part of the key."""
    problems = check_probabilities(preds, task)
    if problems:
        raise BadInput(f"predictions: {len(problems)} problem(s)", problems)
    key.join(preds)  # the whole key first: a missing case is named once, not once per part
    out = {}
    for part in PARTS:
        sub = key.part(part)
        mine = preds[preds["case_id"].astype(str).isin(set(sub.df["case_id"]))]
        out[part] = _score_frame(sub.join(mine), task, n_boot, seed)
    return out
