"""Segmentation submissions on a repository leaderboard: label maps in, counts recounted against the key's masks.

A segmentation run holds `seg_predictions.parquet` (case columns, run keys, per-case counts) and `labelmaps.npz`
(`bench.labelmaps`). A board reads the count table for its cases and run keys only: the counts themselves are
rebuilt from the submitted label maps against the answer key's truth masks (`AnswerKey.masks`), so an edited count
table changes nothing. Each record stores the recounted table (`predictions/<id>.parquet`) and the label maps it was
counted from under salted ids (`predictions/<id>.labelmaps.npz`, one map per run and case: `record_map_id`), so
`leaderboard build` recounts every stored row from stored maps + key and refuses a record whose maps or counts
changed.

A label maps file is a zip of `.npy` arrays: before numpy expands it, each member's declared size and each array's
declared shape are checked against a bound derived from the key (`maps_limit`), so a small file that would unpack to
gigabytes is refused naming the file. No message quotes a truth mask or a count computed from one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.evaluation.controls import check_controls, read_privacy, run_controls
from bench.io import sha256_file
from bench.labelmaps import LabelMaps, load_labelmaps
from bench.leaderboard.config import load_key
from bench.leaderboard.key import AnswerKey, MissingCases, _examples, hash_ids, stored_table
from bench.metrics.segeval import compare_segmentation, evaluate_segmentation
from bench.metrics.segmentation import count_columns
from bench.protocol.segment import recount
from bench.runfolder import BASELINE, RUN_KEYS
from bench.tasks import Task

MAPS_SUFFIX = ".labelmaps.npz"
_ID_BYTES = 4 * 160  # a case id of up to 160 characters, numpy unicode (4 bytes a character)


def maps_limit(key: AnswerKey, n_maps: int) -> int:
    """Bytes a label maps file of `n_maps` maps may unpack to: the maps at the key's size with their ids, twice
    over, plus a megabyte (no honest file comes near it; a zip bomb is far above)."""
    assert key.image_size is not None
    h, w = key.image_size
    return 2 * max(int(n_maps), len(key.df)) * (h * w + _ID_BYTES) + (1 << 20)


def read_maps(path: Path, limit: int) -> LabelMaps:
    """A submitted or stored label maps file, refused (naming the file) before loading when it would unpack to more
    than `limit` bytes."""
    if not path.is_file():
        raise BadInput(f"{path}: missing (a segmentation run stores the label maps it predicted)")
    return load_labelmaps(path, max_bytes=limit)


def run_sha256(counts_file: Path, maps_file: Path) -> str:
    """A segmentation run's submitted identity: its count table and its label maps together."""
    maps_sha = sha256_file(maps_file) if maps_file.is_file() else "-"
    return hashlib.sha256(f"{sha256_file(counts_file)}\x1f{maps_sha}".encode()).hexdigest()


def record_map_id(generator: str, regime: str, seed: int, backbone: str, case_id: str) -> str:
    """The id of one run's map of one case in a record's label maps file (runs share case ids)."""
    return f"{generator}/{regime}/{int(seed)}/{backbone}/{case_id}"


def _map_ids(df: pd.DataFrame) -> list[str]:
    cols = [df[c].astype(str) for c in ("generator", "regime", "seed", "backbone", "case_id")]
    return [record_map_id(g, r, int(s), b, c) for g, r, s, b, c in zip(*cols, strict=True)]


def _salted(maps: LabelMaps, salt: str) -> LabelMaps:
    return LabelMaps(hash_ids(pd.Series(maps.case_ids), salt).tolist(), maps.maps, maps.num_classes)


def check_maps(maps: LabelMaps, key: AnswerKey, task: Task, where: str) -> list[str]:
    """Shape and class count of a run's maps against the key's (problems name the file and both shapes)."""
    problems = []
    want = key.image_size
    got = tuple(int(x) for x in maps.maps.shape[1:])
    if got != want:
        problems.append(
            f"{where}: label maps of {got[0]}x{got[1]} px; this leaderboard scores at "
            f"{want[0]}x{want[1]} px (its answer key's masks): run at that image size"  # type: ignore[index]
        )
    k = len(task.mask_classes) + 1
    if maps.num_classes != k:
        problems.append(
            f"{where}: num_classes {maps.num_classes}; task {task.name} has {k} (background + "
            f"{len(task.mask_classes)} mask classes)"
        )
    return problems


def recount_submission(
    joined: pd.DataFrame, runs: Sequence[Any], key: AnswerKey, salt: str, task: Task
) -> tuple[pd.DataFrame, dict[tuple[str, str, int, str], LabelMaps]]:
    """Every run's rows of `joined` (salted, on the key's cases, without counts) with counts recounted from the
    run's submitted label maps against the key's masks; and each run's salted maps of the key's cases.

    A run whose maps are missing, too large, of another shape or class count, or lack a key case is BadInput naming
    its labelmaps file."""
    if key.masks is None:
        raise BadInput(
            "the leaderboard's answer key holds no masks: a segmentation board needs them "
            "(rewrite it with `medsynbench leaderboard key BOARD --real MANIFEST`)"
        )
    classes = task.mask_classes
    problems: list[str] = []
    frames, out_maps = [], {}
    ids = key.case_ids
    for run in runs:
        where = str(run.maps)
        rows = joined
        for c, v in zip(RUN_KEYS, run.keys, strict=True):
            rows = rows[rows[c].astype(str) == str(v)] if c != "seed" else rows[rows[c] == int(v)]
        try:
            maps = read_maps(run.maps, maps_limit(key, len(run.preds)))
        except BadInput as e:
            problems += [e.args[0], *e.problems]
            continue
        found = check_maps(maps, key, task, where)
        if found:
            problems += found
            continue
        have = _salted(maps, salt).by_case()
        missing = [c for c in ids if c not in have]
        if missing:
            problems.append(
                f"{where}: {len(missing)} of the {len(ids)} evaluation case(s) have no label map "
                f"(e.g. {_examples(missing)})"
            )
            continue
        own = LabelMaps(list(ids), np.stack([have[c] for c in ids]), maps.num_classes)
        out_maps[run.keys] = own
        frames.append(recount(rows.reset_index(drop=True), own, key.truth, classes, source=where))
    if problems:
        raise MissingCases("label maps do not cover the answer key", problems)
    counts = pd.concat(frames, ignore_index=True) if frames else joined.iloc[:0]
    return stored_counts(counts, task), out_maps


def stored_counts(df: pd.DataFrame, task: Task) -> pd.DataFrame:
    """The count table a record stores: contract columns only (ids salted), in a stable order."""
    return stored_table(df, task.subgroups.columns, count_columns(task.mask_classes))


def record_maps(stored: pd.DataFrame, run_maps: Mapping[tuple[str, str, int, str], LabelMaps]) -> LabelMaps:
    """The label maps one record stores: a map per row of its stored count table, under `record_map_id`."""
    lookup = {k: m.by_case() for k, m in run_maps.items()}
    cols = [stored[c].astype(str) for c in ("generator", "regime", "seed", "backbone", "case_id")]
    arrays = [lookup[(g, r, int(s), b)][c] for g, r, s, b, c in zip(*cols, strict=True)]
    k = next(iter(run_maps.values())).num_classes
    return LabelMaps(_map_ids(stored), np.stack(arrays), k)


def verify_record_maps(
    record: Mapping[str, Any], folder: Path, stored: pd.DataFrame, key: AnswerKey, task: Task
) -> list[str]:
    """A stored segmentation record against its label maps: the file's sha256 is the record's, it holds a map for
    every stored row, and recounting them against the key's masks gives the stored counts."""
    rid = record.get("id", "?")
    info = (record.get("predictions") or {}).get("labelmaps") or {}
    if not info.get("file"):
        return [
            f"record {rid}: names no label maps file (predictions.labelmaps): its counts cannot be recounted"
        ]
    path = folder / str(info["file"])
    if not path.is_file():
        return [f"record {rid}: label maps file {info['file']} is missing"]
    if sha256_file(path) != info.get("sha256"):
        return [f"record {rid}: {info['file']} does not match the record's labelmaps sha256 (file changed)"]
    if key.masks is None:
        return [f"record {rid}: the answer key holds no masks to recount its label maps against"]
    try:
        maps = read_maps(path, maps_limit(key, len(stored)))
    except BadInput as e:
        return [f"record {rid}: {e.args[0]}", *e.problems]
    problems = check_maps(maps, key, task, f"record {rid}: {info['file']}")
    if problems:
        return problems
    by_id = maps.by_case()
    ids = _map_ids(stored)
    missing = [i for i in ids if i not in by_id]
    if missing or len(by_id) != len(ids):
        return [
            f"record {rid}: {info['file']} holds {len(by_id)} maps for {len(ids)} stored rows "
            f"({len(missing)} row(s) without a map)"
        ]
    if not stored["case_id"].astype(str).isin(key.case_id_set).all():
        return [f"record {rid}: stored rows of cases the answer key does not hold"]
    flat = LabelMaps(ids, np.stack([by_id[i] for i in ids]), maps.num_classes)
    truth = {i: key.truth[c] for i, c in zip(ids, stored["case_id"].astype(str), strict=True)}
    again = recount(stored.assign(case_id=ids), flat, truth, task.mask_classes, source=str(info["file"]))
    cols = count_columns(task.mask_classes)
    a = again[cols].to_numpy(float)
    b = stored[cols].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    same = (a == b) | (np.isnan(a) & np.isnan(b)) | np.isclose(a, b, rtol=0, atol=1e-9, equal_nan=True)
    bad = int((~same.all(axis=1)).sum())
    if bad:
        return [
            f"record {rid}: {bad} row(s) of {record['predictions']['file']} differ from its label maps recounted "
            "against the answer key's masks"
        ]
    return []


def seg_reference_controls(root: Path, task: Task, runs: Sequence[Any], cfg: Any) -> list[Any]:
    """The run's controls (copycat pairs, mask-shuffle, real-holdout), re-scored with the board's bootstrap from the
    control and real-only runs' label maps recounted against the answer key (never their own counts)."""
    ctl = run_controls(root)
    use = [r for r in runs if r.keys[0] in (BASELINE, *ctl)]
    if not use or not any(r.keys[0] == BASELINE for r in use):
        return check_controls(
            pd.DataFrame(columns=["metric", "split"]), None, read_privacy(root, []), task, {}
        )
    key = load_key(cfg)
    counts = keyed_counts(use, key, cfg.id_salt, task, str(root))
    kw: dict[str, Any] = dict(n_boot=cfg.bootstrap.n, seed=cfg.bootstrap.seed, source=str(root))
    table = evaluate_segmentation(counts, task, subgroup_columns=[], intersections=[], **kw)
    comps = compare_segmentation(counts, task, metrics=[task.metrics.primary], **kw)
    return check_controls(table, comps, read_privacy(root, list(ctl)), task, ctl)


def keyed_counts(runs: Sequence[Any], key: AnswerKey, salt: str, task: Task, where: str) -> pd.DataFrame:
    """Runs' count tables on the key's cases (salted, the key's labels and groups), recounted from their maps. A
    missing, repeated or unknown case names the run's own count table."""
    frames, problems = [], []
    drop = count_columns(task.mask_classes)
    for r in runs:
        df = r.preds.drop(columns=drop, errors="ignore")
        salted = df.assign(
            case_id=hash_ids(df["case_id"].astype(str), salt),
            patient_id=hash_ids(df["patient_id"].astype(str), salt),
        )
        try:
            frames.append(key.join(salted, source=str(r.folder / r.file)))
        except BadInput as e:
            problems += [e.args[0], *e.problems]
    if problems:
        raise BadInput(f"{where}: submission rejected: the runs do not cover the answer key", problems)
    return recount_submission(pd.concat(frames, ignore_index=True), runs, key, salt, task)[0]
