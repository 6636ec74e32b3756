"""The one place the service meets the leaderboard's answer key.

Everything the service needs from an answer key goes through the functions at the bottom of this module
(`build_key`, `load_key`, `salt_ids`, `score_parts`, `secret_ids`). Until `bench.leaderboard.key` exists, a minimal
local `AnswerKey` with the same interface stands in for it (marked below); switching to the real one is an import.

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
from bench.leaderboard.submit import hash_ids
from bench.runfolder import SCORED_SPLITS
from bench.tasks import Task

PARTS = ("public", "private")

# ---------------------------------------------------------------------------------------------------------------
# Stand-in for bench.leaderboard.key.AnswerKey (to be replaced by `from bench.leaderboard.key import AnswerKey`).
# It implements only what this module uses: build_from_manifest, read, write, join, cross_check, .df.
# ---------------------------------------------------------------------------------------------------------------


class AnswerKey:
    """Hidden labels of the evaluation cases (stand-in; see the note above)."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df.reset_index(drop=True)

    @classmethod
    def build_from_manifest(
        cls,
        real_manifest: str | Path,
        task: Task,
        salt: str,
        private_fraction: float = 0.5,
        seed: int = 0,
    ) -> AnswerKey:
        from bench.manifest import load_valid_manifest

        m = load_valid_manifest(real_manifest, task)
        df = m.df
        if "origin" in df.columns:
            df = df[df["origin"].astype(str) == "real"]
        df = df[df["split"].astype(str).isin(SCORED_SPLITS)].copy()
        if df.empty:
            raise BadInput(
                f"{real_manifest}: no real {'/'.join(SCORED_SPLITS)} rows to build an answer key from"
            )
        # Whole patients go to one part, so the two parts are independent samples of patients.
        patients = np.array(sorted(df["patient_id"].astype(str).unique()))
        rng = np.random.default_rng(seed)
        n_private = int(round(private_fraction * len(patients)))
        private = set(rng.permutation(patients)[:n_private])
        part = df["patient_id"].astype(str).map(lambda p: "private" if p in private else "public")
        cols = ["label", "site", "split", *task.subgroups.columns]
        out = pd.DataFrame(
            {
                "case_id": hash_ids(df["case_id"].astype(str), salt),
                "patient_id": hash_ids(df["patient_id"].astype(str), salt),
            }
        )
        for c in cols:
            out[c] = df[c].astype(str).to_numpy() if c in df.columns else "unknown"
        out["part"] = part.to_numpy()
        return cls(out.sort_values("case_id", kind="mergesort"))

    @classmethod
    def read(cls, path: str | Path) -> AnswerKey:
        p = Path(path)
        if not p.is_file():
            raise BadInput(f"{p}: answer key not found (build it with `medsynbench host init`)")
        return cls(pd.read_parquet(p))

    def write(self, path: str | Path) -> Path:
        from bench.io import write_table

        return write_table(Path(path), self.df)

    def cross_check(self, predictions: pd.DataFrame) -> list[str]:
        problems = []
        if "case_id" not in predictions.columns:
            return ["column 'case_id' is missing"]
        ids = predictions["case_id"].astype(str)
        dup = ids[ids.duplicated()]
        if len(dup):
            problems.append(
                f"{dup.nunique()} case id(s) appear more than once, e.g. row {int(dup.index[0]) + 2}"
            )
        known = set(self.df["case_id"])
        unknown = ~ids.isin(known)
        if unknown.any():
            rows = [int(i) + 2 for i in ids.index[unknown][:10]]
            problems.append(f"{int(unknown.sum())} case id(s) are not evaluation cases (rows {rows})")
        missing = len(known - set(ids))
        if missing:
            problems.append(f"{missing} evaluation case(s) have no prediction")
        return problems

    def join(self, predictions: pd.DataFrame) -> pd.DataFrame:
        problems = self.cross_check(predictions)
        if problems:
            raise BadInput(
                f"predictions do not match the evaluation cases: {len(problems)} problem(s)", problems
            )
        preds = predictions.assign(case_id=predictions["case_id"].astype(str))
        keep = [c for c in preds.columns if c.startswith("prob_")] + ["case_id"]
        return self.df.merge(preds[keep], on="case_id", how="left", validate="one_to_one")


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
    return key.cross_check(preds) + check_probabilities(preds, task)


def _score_frame(df: pd.DataFrame, task: Task, n_boot: int, seed: int) -> dict[str, Any]:
    from bench.metrics.bootstrap import patient_weights, percentile_interval
    from bench.metrics.core import get_metric
    from bench.metrics.evaluate import positive_classes

    name = task.metrics.primary
    metric = get_metric(name, task.classes).for_task(task.metrics)
    probs = df[[f"prob_{c}" for c in task.classes]].astype(float).to_numpy()
    if metric.target == "multiclass":
        y = pd.Categorical(df["label"], categories=task.classes).codes.astype(np.int64)
        score: Any = probs
    else:
        pos = positive_classes(task)
        y = df["label"].isin(pos).to_numpy().astype(np.int64)
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
    joined = key.join(preds)
    return {part: _score_frame(joined[joined["part"] == part], task, n_boot, seed) for part in PARTS}
