"""What a segmentation run stores: the label maps of every predicted case and the per-case count table built from
them (`SEG_PREDICTIONS_FILE`, the segmentation counterpart of the predictions contract).

The count table is `bench.metrics.count_table` with the predictions contract's case columns in front (`case_id`,
`patient_id`, `site`, `split`, subgroup columns, `y_true`: the image's label as its mask gives it) and the run keys
(`generator`, `regime`, `seed`, `backbone`) after them. Every registered segmentation metric is a function of these
counts, so evaluation and leaderboards never need the maps; the maps (`labelmaps.npz`, `bench.labelmaps`) are kept so
that anyone holding the truth masks can recount every row (`recount`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.imaging import build_cache
from bench.io import read_json, read_table
from bench.labelmaps import LabelMaps, load_labelmaps
from bench.manifest import read_manifest
from bench.metrics.segmentation import COUNTS_VERSION, IOU_THRESHOLD, count_columns, count_table
from bench.runfolder import PREDICTED_SPLITS, RunFolder
from bench.tasks import Task

CASE_COLUMNS: tuple[str, ...] = ("case_id", "patient_id", "site", "split")


def case_frame(
    task: Task, eval_df: pd.DataFrame, *, generator: str, regime: str, seed: int, backbone: str
) -> pd.DataFrame:
    """The case and run-key columns of a count table, one row per case of `eval_df`, in its order."""
    df = task.add_subgroup_columns(eval_df.reset_index(drop=True))
    subgroup = [c for c in ["sex", "age", "age_group", *task.subgroups.columns] if c in df.columns]
    subgroup = list(dict.fromkeys(subgroup))
    out = df[list(CASE_COLUMNS) + subgroup].copy()
    for c in CASE_COLUMNS:
        out[c] = out[c].astype(str)
    out["y_true"] = df["label"].astype(str)
    out["generator"] = generator
    out["regime"] = regime
    out["seed"] = np.int64(seed)
    out["backbone"] = backbone
    return out


def seg_predictions_frame(
    task: Task, cases: pd.DataFrame, truth: np.ndarray, pred: np.ndarray
) -> pd.DataFrame:
    """The count table of one run: `cases` (from `case_frame`) followed by the counts of `pred` against `truth`."""
    return count_table(truth, pred, task.mask_classes, cases)


def recount(
    stored: pd.DataFrame,
    maps: LabelMaps,
    truth: Mapping[str, np.ndarray],
    classes: Sequence[str],
    *,
    source: str = "count table",
) -> pd.DataFrame:
    """The count table rebuilt from a run's label maps and the truth masks (`truth`: case id -> label map at the
    run's image size), with `stored`'s case and run-key columns: equal to `stored` when nothing was altered.

    A case of `stored` without a label map or without a truth mask is BadInput naming it."""
    pred_of = maps.by_case()
    ids = stored["case_id"].astype(str).tolist()
    no_map = [c for c in ids if c not in pred_of]
    no_truth = [c for c in ids if c not in truth]
    if no_map or no_truth:
        raise BadInput(
            f"{source}: cannot recount",
            [f"{len(no_map)} case(s) without a label map, e.g. {no_map[:3]}"] * bool(no_map)
            + [f"{len(no_truth)} case(s) without a truth mask, e.g. {no_truth[:3]}"] * bool(no_truth),
        )
    ccols = set(count_columns(classes))
    cases = stored[[c for c in stored.columns if c not in ccols]]
    t = np.stack([np.asarray(truth[c]) for c in ids]) if ids else np.zeros((0, 1, 1), np.uint8)
    p = np.stack([pred_of[c] for c in ids]) if ids else np.zeros((0, 1, 1), np.uint8)
    return count_table(t, p, classes, cases)


def _dice_macro(counts: pd.DataFrame, classes: Sequence[str]) -> float | None:
    d = []
    for c in classes:
        tp, fp, fn = (float(counts[f"{s}_{c}"].sum()) for s in ("tp", "fp", "fn"))
        if 2 * tp + fp + fn > 0:
            d.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(d)) if d else None


def seg_run_metrics(counts: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """The quick per-run numbers of metrics.json: pooled macro Dice per split and per external site, no intervals."""

    def score(df: pd.DataFrame) -> dict[str, Any]:
        return {
            "dice_macro": _dice_macro(df, classes),
            "n_cases": int(len(df)),
            "n_patients": int(df["patient_id"].nunique()),
        }

    splits = {
        s: score(counts[counts["split"] == s]) for s in PREDICTED_SPLITS if (counts["split"] == s).any()
    }
    ext = counts[counts["split"] == "external"]
    return {
        "primary": "dice_macro",
        "dice_macro": {s: v["dice_macro"] for s, v in splits.items()},
        "splits": splits,
        "external_sites": {str(s): score(g) for s, g in ext.groupby("site", sort=True)},
        "counts": {"version": COUNTS_VERSION, "iou_threshold": IOU_THRESHOLD},
    }


def recount_run(run: RunFolder, task: Task, cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Rebuild a finished segmentation run's count table from its `labelmaps.npz` and the truth masks of the real
    manifest it was trained with (config.json), at the run's image size."""
    config = run.config()
    real = config.manifests.get("real") or {}
    size = int((read_json(run.config_path).get("image") or {}).get("size") or 0)
    if not real.get("path") or not size:
        raise BadInput(f"{run.config_path}: names no real manifest or image size")
    manifest = read_manifest(real["path"])
    cache = build_cache(
        manifest, task, size=size, cache_dir=Path(cache_dir) if cache_dir else None, progress=False
    )
    if cache.masks is None:
        raise BadInput(
            f"{real['path']}: the image cache holds no masks (is {task.name!r} a segmentation task?)"
        )
    stored = read_table(run.seg_predictions)
    ids = stored["case_id"].astype(str)
    known = cache.contains(ids)
    rows = cache.rows(ids[known])
    truth = dict(zip(ids[known], np.asarray(cache.masks[rows]), strict=True))
    return recount(
        stored, load_labelmaps(run.labelmaps), truth, task.mask_classes, source=str(run.seg_predictions)
    )
