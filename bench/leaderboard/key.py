"""The answer key: what a leaderboard knows about every evaluation case, and the only source scoring reads.

One row per evaluation case (test and external splits of the real data): the salted `case_id` and `patient_id`,
the `label`, `site`, `split`, every subgroup column of the task, and the `part` (public or private) the case
belongs to. Submitted predictions contribute probabilities and run keys only: `join` replaces their labels, sites,
splits, patients and subgroups with the key's, and `cross_check` lists every row where the submitted values
disagree, so that a relabelled or edited predictions file is named rather than scored.

In a repository leaderboard the key is a Parquet file beside `leaderboard.yaml` (its sha256 recorded there); a
host may keep it anywhere it controls. It holds the labels of the evaluation cases: commit it only for boards on
public data.

A segmentation board's key also holds the truth label map of every evaluation case (`masks`, format
`medsynbench-labelmaps/1` of `bench.labelmaps`, keyed by salted case id, at the board's scoring resolution), in a
second file beside the key (`MASKS_FILE`, its path and sha256 under `answer_key.masks` in leaderboard.yaml).
Submitted label maps are recounted against these masks; a submission's own counts are never scored. Like the labels,
the masks never leave the host: no message quotes a mask value or a count computed from one.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.io import sha256_file, write_table
from bench.labelmaps import LabelMaps, load_labelmaps, save_labelmaps
from bench.manifest import Manifest, read_manifest
from bench.runfolder import RUN_KEYS, SCORED_SPLITS
from bench.tasks import load_task

KEY_FILE = "answer_key.parquet"
MASKS_FILE = "answer_key.masks.npz"
BASE_COLUMNS = ("case_id", "patient_id", "label", "site", "split", "part")
PARTS = ("public", "private")
# Prediction columns the key answers for: submitted values are cross-checked and then replaced.
KEYED = {"patient_id": "patient_id", "y_true": "label", "site": "site", "split": "split"}
MAX_EXAMPLES = 5


class UnknownCases(BadInput):
    """Predictions for evaluation cases the key does not hold."""


class MissingCases(BadInput):
    """A run that does not predict every case of the key exactly once."""


def hash_ids(values: pd.Series, salt: str) -> pd.Series:
    """Salted SHA-256 of identifiers: stable within a leaderboard (records pair up), useless as a lookup table."""
    cache: dict[str, str] = {}

    def h(v: Any) -> str:
        s = str(v)
        if s not in cache:
            cache[s] = hashlib.sha256(f"{salt}\x1f{s}".encode()).hexdigest()[:32]
        return cache[s]

    return values.map(h)


def _examples(values: list[str]) -> str:
    more = f" and {len(values) - MAX_EXAMPLES} more" if len(values) > MAX_EXAMPLES else ""
    return ", ".join(values[:MAX_EXAMPLES]) + more


def row_names(predictions: pd.DataFrame, where: str = "") -> pd.Series:
    """'<where>row N (case C)' for each row, numbered from 1 with the header excluded, like every other row message
    (bench.metrics.validate); aligned with `predictions` for `AnswerKey.cross_check`."""
    return pd.Series(
        [f"{where}row {i} (case {c})" for i, c in enumerate(predictions["case_id"].astype(str), start=1)],
        index=predictions.index,
    )


def masks_path(key_file: str | Path) -> Path:
    """Where the masks of a key file live by default: `answer_key.parquet` -> `answer_key.masks.npz`."""
    p = Path(key_file)
    return p.with_name(f"{p.name.removesuffix('.parquet')}.masks.npz")


@dataclass(frozen=True)
class AnswerKey:
    """The reference of every evaluation case. `df` has BASE_COLUMNS plus `subgroup_columns`, all strings.

    `masks` (segmentation boards only): the truth label map of every case of `df`, under its salted case id, all of
    one shape (the board's scoring resolution); None for a classification board."""

    df: pd.DataFrame
    subgroup_columns: tuple[str, ...]
    masks: LabelMaps | None = None

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def from_frame(
        cls,
        df: pd.DataFrame,
        subgroup_columns: list[str] | tuple[str, ...] = (),
        masks: LabelMaps | None = None,
    ) -> AnswerKey:
        """A key from a table that already holds salted ids (BADInput names what is missing or duplicated), with
        the truth label maps of its cases for a segmentation board (`masks`: exactly the key's case ids)."""
        df = df.copy()
        if "part" not in df.columns:
            df["part"] = "public"
        missing = [c for c in (*BASE_COLUMNS, *subgroup_columns) if c not in df.columns]
        if missing:
            raise BadInput(f"answer key: column(s) {missing} missing")
        cols = [*BASE_COLUMNS, *subgroup_columns]
        df = df[cols].astype(str)
        dup = df["case_id"][df["case_id"].duplicated()].unique().tolist()
        if dup:
            raise BadInput(f"answer key: {len(dup)} case id(s) appear more than once (e.g. {_examples(dup)})")
        bad_part = sorted(set(df["part"]) - set(PARTS))
        if bad_part:
            raise BadInput(f"answer key: column 'part' holds {bad_part}; allowed: {list(PARTS)}")
        bad_split = sorted(set(df["split"]) - set(SCORED_SPLITS))
        if bad_split:
            raise BadInput(
                f"answer key: column 'split' holds {bad_split}; the key holds {list(SCORED_SPLITS)}"
            )
        df = df.sort_values("case_id", kind="mergesort").reset_index(drop=True)
        if masks is not None:
            masks = _masks_for(df["case_id"].tolist(), masks)
        return cls(df, tuple(subgroup_columns), masks)

    @classmethod
    def build_from_manifest(
        cls,
        real_manifest: str | Path | pd.DataFrame,
        task: Any,
        salt: str,
        private_fraction: float = 0.0,
        seed: int = 0,
        *,
        image_size: int | str | None = None,
        cache_dir: str | Path | None = None,
    ) -> AnswerKey:
        """The key of a real manifest's test and external cases, ids salted with the leaderboard's `salt`.

        `private_fraction` of the patients of each site (drawn with `seed`) form the private part. For a
        segmentation task the key also holds each case's truth label map, decoded from the manifest's masks through
        the image cache at `image_size` (default: the task's `image.size`): the very masks a run at that size is
        scored against (`bench.protocol.segment.recount_run`). That needs the manifest itself (a path or Manifest),
        not a bare table.
        """
        task = load_task(task)
        if not 0.0 <= private_fraction < 1.0:
            raise BadInput(f"private_fraction must be in [0, 1) (got {private_fraction})")
        src = "real manifest"
        manifest: Manifest | None = None
        if isinstance(real_manifest, pd.DataFrame):
            df = real_manifest.copy()
        elif isinstance(real_manifest, Manifest):
            manifest, df = real_manifest, real_manifest.df
            src = str(real_manifest.path or "real manifest")
        else:
            src = str(real_manifest)
            manifest = read_manifest(real_manifest)
            df = manifest.df
        if "origin" in df.columns:
            df = df[df["origin"].astype(str) == "real"]
        df = df[df["split"].astype(str).isin(SCORED_SPLITS)]
        if df.empty:
            raise BadInput(f"{src}: no test or external cases: nothing to build an answer key from")
        df = task.add_subgroup_columns(df)
        lacking = [c for c in task.subgroups.columns if c not in df.columns]
        if lacking:
            raise BadInput(f"{src}: subgroup column(s) {lacking} of task {task.name} missing")
        masks = None
        if task.is_segmentation:
            if manifest is None:
                raise BadInput(
                    f"{src}: task {task.name} is a segmentation task: its answer key needs the manifest file "
                    "(the masks of its cases), not a bare table"
                )
            masks = _truth_masks(manifest, task, df["case_id"].astype(str), salt, image_size, cache_dir, src)
        df = df.assign(
            case_id=hash_ids(df["case_id"].astype(str), salt),
            patient_id=hash_ids(df["patient_id"].astype(str), salt),
            part="public",
        )
        if private_fraction > 0:
            rng = np.random.default_rng(seed)
            private: set[str] = set()
            for _, g in df.groupby("site", sort=True):
                pats = np.array(sorted(g["patient_id"].unique()))
                k = int(round(private_fraction * len(pats)))
                private |= set(rng.permutation(pats)[:k].tolist())
            df.loc[df["patient_id"].isin(private), "part"] = "private"
        return cls.from_frame(df, list(task.subgroups.columns), masks)

    # ---------------------------------------------------------------------------------------------- files

    @classmethod
    def read(
        cls,
        path: str | Path,
        sha256: str | None = None,
        masks: str | Path | None = None,
        masks_sha256: str | None = None,
    ) -> AnswerKey:
        """Read a key file (and, for a segmentation board, its masks file); with `sha256` / `masks_sha256`, refuse
        a file whose content changed."""
        path = Path(path)
        _check_file(path, sha256, "answer key")
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise BadInput(f"{path}: cannot be read as parquet: {e}") from e
        subgroups = [c for c in df.columns if c not in BASE_COLUMNS]
        maps = None
        if masks is not None:
            mpath = Path(masks)
            _check_file(mpath, masks_sha256, "answer key masks")
            maps = load_labelmaps(mpath)
        try:
            return cls.from_frame(df, subgroups, maps)
        except BadInput as e:
            where = f"{path}" if maps is None else f"{path} with {masks}"
            raise BadInput(f"{where}: {e.args[0]}", e.problems) from None

    def write(self, path: str | Path) -> str:
        """Write the key as Parquet (owner-only permissions: it holds labels); returns the file's sha256."""
        write_table(path, self.df)
        return sha256_file(path)

    def write_masks(self, path: str | Path) -> str:
        """Write the key's truth label maps (owner-only permissions, like the key); returns the file's sha256."""
        if self.masks is None:
            raise ValueError("this answer key holds no masks (a classification board)")
        save_labelmaps(path, self.masks.case_ids, self.masks.maps, num_classes=self.masks.num_classes)
        return sha256_file(path)

    # ---------------------------------------------------------------------------------------------- use

    @property
    def case_ids(self) -> list[str]:
        return self.df["case_id"].tolist()

    def part(self, name: str) -> AnswerKey:
        if name not in PARTS:
            raise BadInput(f"answer key part {name!r}: allowed {list(PARTS)}")
        df = self.df[self.df["part"] == name].reset_index(drop=True)
        masks = None if self.masks is None else _masks_for(df["case_id"].tolist(), self.masks)
        return AnswerKey(df, self.subgroup_columns, masks)

    @property
    def is_segmentation(self) -> bool:
        return self.masks is not None

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the truth label maps: the resolution submissions are scored at (None: no masks)."""
        return None if self.masks is None else (int(self.masks.maps.shape[1]), int(self.masks.maps.shape[2]))

    @functools.cached_property
    def truth(self) -> dict[str, np.ndarray]:
        """Salted case id -> truth label map (empty for a classification key). Host-side only: never echo it."""
        return {} if self.masks is None else self.masks.by_case()

    @functools.cached_property
    def case_id_set(self) -> frozenset[str]:
        """The key's case ids (computed once: a board joins every record to the same key)."""
        return frozenset(self.df["case_id"].astype(str).unique())

    def _keyed_columns(self) -> dict[str, str]:
        return {**KEYED, **{c: c for c in self.subgroup_columns}}

    def cross_check(self, predictions: pd.DataFrame, names: pd.Series | None = None) -> list[str]:
        """Every submitted label, site, split, patient or subgroup value that disagrees with the key.

        One problem per column, naming up to five rows and the submitted value (never the key's) (`names`, aligned with `predictions`, says how; default:
        the row number from 1 and the case id). Rows of cases the key does not hold are not compared (see `join`).
        """
        if names is None:
            names = row_names(predictions)
        ref = self.df.set_index("case_id")
        ids = predictions["case_id"].astype(str)
        known = ids.isin(ref.index)
        problems = []
        for col, kcol in self._keyed_columns().items():
            if col not in predictions.columns:
                continue
            got = predictions.loc[known, col].astype(str)
            want = ref.loc[ids[known], kcol].to_numpy()
            bad = got.to_numpy() != want
            if bad.any():
                # The submitted value only: echoing the key's would answer a guess with the label (or site, split,
                # subgroup) of the case, one request at a time.
                idx = got.index[bad]
                rows = [f"{names[i]}: {g!r} differs from the key" for i, g in zip(idx, got[bad], strict=True)]
                problems.append(
                    f"column {col!r} disagrees with the answer key in {int(bad.sum())} row(s): {_examples(rows)}"
                )
        return problems

    def join(self, predictions: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
        """Probabilities and run keys of `predictions` on the key's cases, with the key's labels, sites, splits,
        patients and subgroups (the submitted ones are dropped).

        Rows of cases the key does not hold are dropped when they claim a split that is not scored (validation);
        claimed as test or external they raise UnknownCases. Each run (generator, regime, seed, backbone) must
        predict every case of the key exactly once, else MissingCases.
        """
        ids = predictions["case_id"].astype(str)
        key_ids = self.case_id_set
        known = ids.isin(key_ids)
        claims_eval = (
            predictions["split"].astype(str).isin(SCORED_SPLITS)
            if "split" in predictions.columns
            else pd.Series(True, index=predictions.index)
        )
        unknown = ids[~known & claims_eval].unique().tolist()
        if unknown:
            raise UnknownCases(
                f"{source}: {len(unknown)} case(s) predicted as test/external that the answer key does not hold "
                f"(e.g. {_examples(unknown)})"
            )
        drop = [c for c in self._keyed_columns() if c in predictions.columns]
        own = predictions.loc[known].drop(columns=drop)
        own = own.assign(case_id=own["case_id"].astype(str))
        run_cols = [c for c in RUN_KEYS if c in own.columns]
        problems = []
        n = len(self.df)
        groups = own.groupby(run_cols, sort=True, dropna=False) if run_cols else [((), own)]
        for keys, g in groups:
            run = ", ".join(f"{c}={v}" for c, v in zip(run_cols, np.atleast_1d(keys), strict=False))
            dup = g["case_id"][g["case_id"].duplicated()].unique().tolist()
            if dup:
                problems.append(
                    f"run ({run}): {len(dup)} case(s) predicted more than once (e.g. {_examples(dup)})"
                )
            missing = sorted(key_ids - set(g["case_id"].unique()))
            if missing:
                problems.append(
                    f"run ({run}): {len(missing)} of the {n} evaluation case(s) not predicted "
                    f"(e.g. {_examples(missing)})"
                )
        if problems:
            raise MissingCases(f"{source}: does not cover the answer key", problems)
        ref = self.df.rename(columns={"label": "y_true"}).drop(columns=["part"])
        out = own.merge(ref, on="case_id", how="left", validate="many_to_one")
        first = ["case_id", "patient_id", "site", "split", *self.subgroup_columns, "y_true"]
        rest = [c for c in own.columns if c not in first]
        return out[first + rest].reset_index(drop=True)


def _check_file(path: Path, sha256: str | None, what: str) -> None:
    if not path.is_file():
        raise BadInput(f"{path}: {what} not found")
    if sha256 and sha256_file(path) != sha256:
        raise BadInput(
            f"{path}: the {what} does not match the sha256 recorded in leaderboard.yaml "
            f"({sha256_file(path)[:12]}... != {sha256[:12]}...)"
        )


def _masks_for(case_ids: list[str], masks: LabelMaps) -> LabelMaps:
    """`masks` restricted to `case_ids`, in their order; BadInput (counts only: the ids are the key's) unless it
    holds every one of them and nothing else."""
    have = masks.by_case()
    missing = [c for c in case_ids if c not in have]
    extra = len(set(have) - set(case_ids))
    if missing or extra:
        raise BadInput(
            f"answer key: the masks do not match the key's cases ({len(missing)} case(s) without a mask, "
            f"{extra} mask(s) of cases the key does not hold)"
        )
    maps = np.stack([have[c] for c in case_ids]) if case_ids else masks.maps[:0]
    return LabelMaps(list(case_ids), maps, masks.num_classes)


def _truth_masks(
    manifest: Manifest,
    task: Any,
    raw_ids: pd.Series,
    salt: str,
    size: int | str | None,
    cache_dir: str | Path | None,
    src: str,
) -> LabelMaps:
    """The truth label maps of `raw_ids` at `size`, as the image cache preprocesses them for a run at that size,
    under their salted ids."""
    from bench.imaging import build_cache  # heavy (image decoding); only a segmentation key needs it

    cache = build_cache(
        manifest, task, size=size, cache_dir=Path(cache_dir) if cache_dir else None, progress=False
    )
    if cache.masks is None:
        raise BadInput(f"{src}: the image cache holds no masks (does the manifest name each case's mask?)")
    known = cache.contains(raw_ids)
    if not known.all():
        lost = raw_ids[~known].tolist()
        raise BadInput(
            f"{src}: {len(lost)} evaluation case(s) have no decodable image and mask (e.g. {_examples(lost)})"
        )
    maps = np.asarray(cache.masks[cache.rows(raw_ids)], dtype=np.uint8)
    return LabelMaps(hash_ids(raw_ids, salt).tolist(), maps, len(task.mask_classes) + 1)


def key_path(folder: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else folder / p


def stored_table(
    df: pd.DataFrame, subgroup_columns: list[str] | tuple[str, ...], values: list[str]
) -> pd.DataFrame:
    """What a record stores of keyed rows: the contract's case columns, `values` (probabilities or counts) and the
    run keys, identifiers and categories as strings, in a stable order (ids already salted)."""
    case_cols = ["case_id", "patient_id", "site", "split", *subgroup_columns, "y_true"]
    cols = [*case_cols, *values, *RUN_KEYS]
    out = df[[c for c in cols if c in df.columns]].copy()
    for c in [*case_cols, "generator", "regime", "backbone"]:
        if c in out.columns:
            out[c] = out[c].astype(str)
    out["seed"] = out["seed"].astype("int64")
    return out.sort_values(["generator", "regime", "seed", "case_id"], kind="mergesort").reset_index(
        drop=True
    )
