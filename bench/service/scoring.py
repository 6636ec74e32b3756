"""The one place the service meets the leaderboard's answer key.

Everything the service needs from an answer key goes through the functions of this module (`build_key`,
`load_key`, `salt_ids`, `validate_predictions`, `score_parts`), on `bench.leaderboard.key.AnswerKey`.

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
from bench.leaderboard.key import KEYED, MAX_EXAMPLES, AnswerKey, hash_ids
from bench.leaderboard.spec import ScoringSpec
from bench.metrics import evaluate_predictions, get_metric
from bench.metrics.compare import headline_split
from bench.metrics.table import MetricTable
from bench.metrics.validate import ROW_NOTE, validate_probabilities
from bench.runfolder import RUN_KEYS
from bench.tasks import Task

PARTS = ("public", "private")
# The run keys the metric engine groups by: a hosted submission is scored as one model, trained once.
HOSTED_RUN: dict[str, Any] = {"generator": "submission", "regime": "hosted", "seed": 0, "backbone": "hosted"}


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


def _one_run(preds: pd.DataFrame) -> pd.DataFrame:
    # A hosted predictions file is one model: run keys it happens to carry would let several runs of the same
    # cases through the key's coverage check, and they are replaced by HOSTED_RUN when scored.
    return preds.drop(columns=[c for c in RUN_KEYS if c in preds.columns])


def answered_columns(key: AnswerKey) -> list[str]:
    """Columns the key answers for: an upload may not carry them (a disagreement would tell the key's value)."""
    return sorted({*KEYED, "label", "part", *key.subgroup_columns})


def _rows(mask: pd.Series | np.ndarray, what: str) -> str:
    # Row numbers only, never the case id: which ids a message shows must not depend on what the host holds.
    pos = np.flatnonzero(np.asarray(mask, dtype=bool))
    more = f" and {len(pos) - MAX_EXAMPLES} more" if len(pos) > MAX_EXAMPLES else ""
    return f"row(s) {', '.join(str(i + 1) for i in pos[:MAX_EXAMPLES])}{more}: {what}"


def validate_predictions(key: AnswerKey, preds: pd.DataFrame, task: Task) -> list[str]:
    """Every problem of a predictions table: columns, probabilities, coverage of the key's cases.

    Messages name columns and row numbers (from 1, header excluded) and echo nothing of the key: no case id, no
    label, site, split or subgroup, and no submitted id either, so that a known and an unknown id read the same.
    Only `case_id`, one `prob_<class>` per class and run keys (ignored) are accepted.
    """
    if "case_id" not in preds.columns:
        return ["column 'case_id' is missing"]
    preds = _one_run(preds).reset_index(drop=True)
    problems = []
    answered = set(answered_columns(key))
    probs = {f"prob_{c}" for c in task.classes}
    cols = [str(c) for c in preds.columns]
    keyed = [c for c in cols if c in answered or c == "y_true"]
    if keyed:
        problems.append(
            f"column(s) {keyed} are answered by the host's answer key and may not be uploaded: send only 'case_id' "
            f"and {sorted(probs)}"
        )
    extra = [c for c in cols if c not in probs and c != "case_id" and c not in keyed]
    if extra:
        problems.append(f"unexpected column(s) {extra}: this task's classes give {sorted(probs)}")
    problems += validate_probabilities(preds.drop(columns=["case_id"]), task.classes)
    ids = preds["case_id"].astype(str)
    known = ids.isin(set(key.df["case_id"]))
    if (~known).any():
        problems.append(_rows(~known, "not an evaluation case of this board"))
    dup = known & ids.duplicated(keep="first")
    if dup.any():
        problems.append(_rows(dup, "a case predicted more than once"))
    missing = len(key.df) - ids[known].nunique()
    if missing:
        problems.append(f"{missing} of the {len(key.df)} evaluation case(s) not predicted")
    return problems


def _score_frame(df: pd.DataFrame, task: Task, split: str, spec: ScoringSpec) -> dict[str, Any]:
    name = spec.primary
    higher = bool(get_metric(name, task.classes).higher_is_better)
    if not (df["split"] == split).any():  # a part without a case of the board's split has no score
        return {
            "metric": name,
            "higher_is_better": higher,
            "value": None,
            "ci_low": None,
            "ci_high": None,
            "n_cases": 0,
            "n_patients": 0,
        }
    # Permutation p-values and subgroup cells are not shown by the service; leaving them out does not change the
    # overall rows, whose replicates depend only on the patients and their site x label strata.
    table = evaluate_predictions(
        df.assign(**{k: HOSTED_RUN[k] for k in RUN_KEYS}),
        task,
        n_boot=spec.n_boot,
        seed=spec.seed,
        n_perm=0,
        subgroup_columns=[],
        intersections=[],
    )
    r = MetricTable(table).one(name, split=split)
    assert r is not None  # a scored split always has the metric's overall row
    return {
        "metric": name,
        "higher_is_better": higher,
        "value": _num(r["value"]),
        "ci_low": _num(r["ci_low"]),
        "ci_high": _num(r["ci_high"]),
        "n_cases": int(r["n_cases"]),
        "n_patients": int(r["n_patients"]),
    }


def _num(x: Any) -> float | None:
    f = float(x)
    return None if np.isnan(f) else f


def score_parts(
    key: AnswerKey, preds: pd.DataFrame, task: Task, spec: ScoringSpec
) -> dict[str, dict[str, Any]]:
    """The spec's primary metric on each part of the key, as `bench.metrics.evaluate_predictions` scores it.

    The value and interval are those of the metric table's overall row on the board's split: external when the key
    holds external cases, else test (`bench.metrics.compare.headline_split`, as repository boards choose it). The
    engine reports test and external separately and pools neither, and both parts are scored on the same split
    so that public and private ranks measure the same thing.
    """
    preds = _one_run(preds)
    problems = validate_probabilities(preds, task.classes)
    if problems:
        raise BadInput(f"predictions: {len(problems)} problem(s) ({ROW_NOTE})", problems)
    key.join(preds)  # the whole key first: a missing case is named once, not once per part
    split = headline_split(key.df)
    out = {}
    for part in PARTS:
        sub = key.part(part)
        mine = preds[preds["case_id"].astype(str).isin(set(sub.df["case_id"]))]
        out[part] = _score_frame(sub.join(mine), task, split, spec)
    return out
