"""The one place the service meets the leaderboard's answer key.

Everything the service needs from an answer key goes through the functions of this module (`build_key`,
`load_key`, `salt_ids`, `validate_predictions`, `score_parts`), on `bench.leaderboard.key.AnswerKey`.

An answer key has one row per evaluation case: salted `case_id` and `patient_id`, `label`, `site`, `split`, the
task's subgroup columns, and `part` (`public` or `private`). Teams never see it.

A segmentation board's key also holds each case's truth label map at the board's scoring resolution. Its
predictions are label maps (`bench.labelmaps`, one per evaluation case under its salted id), recounted here against
the truth masks into the per-case count table that `bench.metrics.segeval` scores; a submission's own counts are
never read. Messages about label maps name map numbers and sizes, never a truth value or a count.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.labelmaps import LabelMaps
from bench.leaderboard.key import KEYED, MAX_EXAMPLES, AnswerKey, hash_ids
from bench.leaderboard.spec import ScoringSpec
from bench.metrics import evaluate_predictions, get_metric
from bench.metrics.compare import headline_split
from bench.metrics.segeval import evaluate_segmentation
from bench.metrics.segmentation import count_table
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
    real_manifest: Path,
    task: Task,
    salt: str,
    private_fraction: float,
    seed: int = 0,
    *,
    image_size: int | str | None = None,
    cache_dir: Path | None = None,
) -> AnswerKey:
    """The key of the host's evaluation cases; for a segmentation task with the truth label maps at `image_size`
    (the protocol's preset, so that the label maps of the service's own runs are scored at their size)."""
    return AnswerKey.build_from_manifest(
        real_manifest, task, salt, private_fraction, seed, image_size=image_size, cache_dir=cache_dir
    )


def write_key(key: AnswerKey, path: Path, masks: Path | None = None) -> None:
    """Write the key and, for a segmentation board, its masks file (`masks`)."""
    key.write(path)
    if key.is_segmentation:
        if masks is None:
            raise ValueError("a segmentation key needs a path for its masks")
        key.write_masks(masks)


def load_key(path: Path, masks: Path | None = None) -> AnswerKey:
    return AnswerKey.read(path, masks=masks)


# Bytes a label maps upload may spend per case beside its map: a salted id is 32 characters of 4-byte unicode in
# the npz; 64 characters leaves room for an id format a team got wrong, to be named by validation, not by a limit.
_ID_BYTES = 4 * 64


def labelmap_limits(key: AnswerKey) -> dict[str, int]:
    """Bounds of a label maps upload, checked before it expands (`bench.labelmaps.load_labelmaps`): one map per
    evaluation case at the board's resolution, plus the small arrays around them."""
    if key.image_size is None:
        raise ValueError("a classification key takes no label maps")
    h, w = key.image_size
    n = len(key.df)
    return {"max_maps": n, "max_map_pixels": h * w, "max_bytes": n * (h * w + _ID_BYTES) + (1 << 16)}


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


def _rows(mask: pd.Series | np.ndarray, what: str, unit: str = "row") -> str:
    # Row numbers only, never the case id: which ids a message shows must not depend on what the host holds.
    pos = np.flatnonzero(np.asarray(mask, dtype=bool))
    more = f" and {len(pos) - MAX_EXAMPLES} more" if len(pos) > MAX_EXAMPLES else ""
    return f"{unit}(s) {', '.join(str(i + 1) for i in pos[:MAX_EXAMPLES])}{more}: {what}"


def _coverage(key: AnswerKey, ids: pd.Series, unit: str) -> list[str]:
    """Cases the board does not hold, repeated, or not predicted: positions and counts only."""
    problems = []
    known = ids.isin(key.case_id_set)
    if (~known).any():
        problems.append(_rows(~known, "not an evaluation case of this board", unit))
    dup = known & ids.duplicated(keep="first")
    if dup.any():
        problems.append(_rows(dup, "a case predicted more than once", unit))
    missing = len(key.df) - ids[known].nunique()
    if missing:
        problems.append(f"{missing} of the {len(key.df)} evaluation case(s) not predicted")
    return problems


def validate_labelmaps(key: AnswerKey, maps: LabelMaps, task: Task) -> list[str]:
    """Every problem of a segmentation board's label maps upload: classes, resolution, coverage of the key.

    Like `validate_predictions`, messages echo nothing of the key: map numbers (from 1, in the file's order), the
    board's public resolution and class count, and counts of cases."""
    problems = []
    k = len(task.mask_classes) + 1
    if maps.num_classes != k:
        problems.append(
            f"num_classes: {maps.num_classes}; this task's label maps have {k} (background + "
            f"{', '.join(task.mask_classes)})"
        )
    size = key.image_size
    got = tuple(int(n) for n in maps.maps.shape[1:])
    if size is not None and got != size:
        problems.append(
            f"maps: {got[0]} x {got[1]} pixels; this board scores label maps of {size[0]} x {size[1]}"
        )
    return problems + _coverage(key, pd.Series(maps.case_ids, dtype=str), "map")


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
    return problems + _coverage(key, preds["case_id"].astype(str), "row")


def _score_frame(df: pd.DataFrame, task: Task, split: str, spec: ScoringSpec) -> dict[str, Any]:
    """The primary metric's overall row on `split`: `df` holds probabilities, or a segmentation board's counts."""
    name = spec.primary
    seg = task.is_segmentation
    higher = bool(get_metric(name, task.mask_classes if seg else task.classes).higher_is_better)
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
    table = (evaluate_segmentation if seg else evaluate_predictions)(
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


def seg_counts(key: AnswerKey, maps: LabelMaps, task: Task) -> pd.DataFrame:
    """The count table of `maps` against the key's truth masks: one row per case of the key (its order), with the
    key's patients, sites, splits, subgroups, image labels (`y_true`) and parts. Host-side only: it holds truth
    counts."""
    problems = validate_labelmaps(key, maps, task)
    if problems:
        raise BadInput(f"label maps: {len(problems)} problem(s)", problems)
    ids = key.df["case_id"].tolist()
    pred = maps.by_case()
    truth = key.truth
    cases = key.df.rename(columns={"label": "y_true"})
    counts = count_table(
        np.stack([truth[c] for c in ids]),
        np.stack([pred[c] for c in ids]),
        task.mask_classes,
        cases.drop(columns=["part"]),
    )
    return counts.assign(part=cases["part"].to_numpy())


def score_parts(
    key: AnswerKey, preds: pd.DataFrame | LabelMaps, task: Task, spec: ScoringSpec
) -> dict[str, dict[str, Any]]:
    """The spec's primary metric on each part of the key, as `bench.metrics.evaluate_predictions` (a segmentation
    board: `bench.metrics.segeval.evaluate_segmentation` on the recounted label maps) scores it.

    The value and interval are those of the metric table's overall row on the board's split: external when the key
    holds external cases, else test (`bench.metrics.compare.headline_split`, as repository boards choose it). The
    engine reports test and external separately and pools neither, and both parts are scored on the same split
    so that public and private ranks measure the same thing.
    """
    split = headline_split(key.df)
    if isinstance(preds, LabelMaps):
        counts = seg_counts(key, preds, task)
        return {
            part: _score_frame(counts[counts["part"] == part].drop(columns=["part"]), task, split, spec)
            for part in PARTS
        }
    preds = _one_run(preds)
    problems = validate_probabilities(preds, task.classes)
    if problems:
        raise BadInput(f"predictions: {len(problems)} problem(s) ({ROW_NOTE})", problems)
    key.join(preds)  # the whole key first: a missing case is named once, not once per part
    out = {}
    for part in PARTS:
        sub = key.part(part)
        mine = preds[preds["case_id"].astype(str).isin(set(sub.df["case_id"]))]
        out[part] = _score_frame(sub.join(mine), task, split, spec)
    return out
