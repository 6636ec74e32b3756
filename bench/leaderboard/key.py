"""The answer key: what a leaderboard knows about every evaluation case, and the only source scoring reads.

One row per evaluation case (test and external splits of the real data): the salted `case_id` and `patient_id`,
the `label`, `site`, `split`, every subgroup column of the task, and the `part` (public or private) the case
belongs to. Submitted predictions contribute probabilities and run keys only: `join` replaces their labels, sites,
splits, patients and subgroups with the key's, and `cross_check` lists every row where the submitted values
disagree, so that a relabelled or edited predictions file is named rather than scored.

In a repository leaderboard the key is a Parquet file beside `leaderboard.yaml` (its sha256 recorded there); a
host may keep it anywhere it controls. It holds the labels of the evaluation cases: commit it only for boards on
public data.
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
from bench.manifest import read_manifest
from bench.runfolder import RUN_KEYS, SCORED_SPLITS
from bench.tasks import load_task

KEY_FILE = "answer_key.parquet"
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


@dataclass(frozen=True)
class AnswerKey:
    """The reference of every evaluation case. `df` has BASE_COLUMNS plus `subgroup_columns`, all strings."""

    df: pd.DataFrame
    subgroup_columns: tuple[str, ...]

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def from_frame(cls, df: pd.DataFrame, subgroup_columns: list[str] | tuple[str, ...] = ()) -> AnswerKey:
        """A key from a table that already holds salted ids (BADInput names what is missing or duplicated)."""
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
        return cls(df, tuple(subgroup_columns))

    @classmethod
    def build_from_manifest(
        cls,
        real_manifest: str | Path | pd.DataFrame,
        task: Any,
        salt: str,
        private_fraction: float = 0.0,
        seed: int = 0,
    ) -> AnswerKey:
        """The key of a real manifest's test and external cases, ids salted with the leaderboard's `salt`.

        `private_fraction` of the patients of each site (drawn with `seed`) form the private part.
        """
        task = load_task(task)
        if not 0.0 <= private_fraction < 1.0:
            raise BadInput(f"private_fraction must be in [0, 1) (got {private_fraction})")
        src = "real manifest"
        if isinstance(real_manifest, pd.DataFrame):
            df = real_manifest.copy()
        else:
            src = str(real_manifest)
            df = read_manifest(real_manifest).df
        if "origin" in df.columns:
            df = df[df["origin"].astype(str) == "real"]
        df = df[df["split"].astype(str).isin(SCORED_SPLITS)]
        if df.empty:
            raise BadInput(f"{src}: no test or external cases: nothing to build an answer key from")
        df = task.add_subgroup_columns(df)
        lacking = [c for c in task.subgroups.columns if c not in df.columns]
        if lacking:
            raise BadInput(f"{src}: subgroup column(s) {lacking} of task {task.name} missing")
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
        return cls.from_frame(df, list(task.subgroups.columns))

    # ---------------------------------------------------------------------------------------------- files

    @classmethod
    def read(cls, path: str | Path, sha256: str | None = None) -> AnswerKey:
        """Read a key file; with `sha256`, refuse a file whose content changed."""
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: answer key not found")
        if sha256 and sha256_file(path) != sha256:
            raise BadInput(
                f"{path}: the answer key does not match the sha256 recorded in leaderboard.yaml "
                f"({sha256_file(path)[:12]}... != {sha256[:12]}...)"
            )
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise BadInput(f"{path}: cannot be read as parquet: {e}") from e
        subgroups = [c for c in df.columns if c not in BASE_COLUMNS]
        try:
            return cls.from_frame(df, subgroups)
        except BadInput as e:
            raise BadInput(f"{path}: {e.args[0]}", e.problems) from None

    def write(self, path: str | Path) -> str:
        """Write the key as Parquet (owner-only permissions: it holds labels); returns the file's sha256."""
        write_table(path, self.df)
        return sha256_file(path)

    # ---------------------------------------------------------------------------------------------- use

    @property
    def case_ids(self) -> list[str]:
        return self.df["case_id"].tolist()

    def part(self, name: str) -> AnswerKey:
        if name not in PARTS:
            raise BadInput(f"answer key part {name!r}: allowed {list(PARTS)}")
        return AnswerKey(self.df[self.df["part"] == name].reset_index(drop=True), self.subgroup_columns)

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


def key_path(folder: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else folder / p
