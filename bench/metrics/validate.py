"""Checks on a predictions table (DESIGN contract) before anything is scored.

Every problem names the column or the rows (numbered from 1, header excluded, as a spreadsheet shows them after the
header line) and the case ids, so a submitter can fix the file without guessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bench.runfolder import PREDICTED_SPLITS, RUN_KEYS

REQUIRED = ["case_id", "patient_id", "site", "split", "y_true"]
SUM_TOLERANCE = 1e-4
ROW_NOTE = "rows numbered from 1, header excluded"
_SHOW = 10


def prob_column(cls: str) -> str:
    return f"prob_{cls}"


def describe_rows(df: pd.DataFrame, mask: np.ndarray | pd.Series, what: str) -> str:
    """'rows 3, 8 (case_id 'a', 'b'): <what>' listing the first few offending rows and how many more there are."""
    pos = np.flatnonzero(np.asarray(mask, dtype=bool))
    shown = pos[:_SHOW]
    nums = ", ".join(str(i + 1) for i in shown)
    ids = ""
    if "case_id" in df.columns:
        ids = " (case_id " + ", ".join(repr(str(v)) for v in df["case_id"].iloc[shown]) + ")"
    more = f" and {len(pos) - len(shown)} more" if len(pos) > len(shown) else ""
    word = "row" if len(pos) == 1 else "rows"
    return f"{word} {nums}{more}{ids}: {what}"


def validate_probabilities(df: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    """Every problem with the prob_<class> columns of a table, as messages naming columns or rows. Empty: valid.

    The checks `validate_predictions` makes of probabilities, for tables that carry nothing else to check.
    """
    probs = [prob_column(str(c)) for c in classes]
    missing = [c for c in probs if c not in df.columns]
    problems = [f"missing column(s): {', '.join(missing)}"] if missing else []
    return problems + _probability_values(df, probs)


def _probability_values(df: pd.DataFrame, probs: list[str]) -> list[str]:
    # The values of the present columns only: a missing column is reported once, by the caller, among the others.
    problems: list[str] = []
    present = [c for c in probs if c in df.columns]
    if not present:
        return problems
    P = pd.DataFrame({c: pd.to_numeric(df[c], errors="coerce") for c in present})
    non_numeric = P.isna() & df[present].notna()
    if non_numeric.to_numpy().any():
        problems.append(describe_rows(df, non_numeric.any(axis=1), "a probability is not a number"))
    nan = df[present].isna().any(axis=1)
    if nan.any():
        problems.append(describe_rows(df, nan, "a probability is NaN or missing"))
    arr = P.to_numpy(float)
    with np.errstate(invalid="ignore"):
        neg = (arr < 0).any(axis=1)
        above = (arr > 1 + SUM_TOLERANCE).any(axis=1)
    if neg.any():
        problems.append(describe_rows(df, neg, "a probability is negative"))
    if above.any():
        problems.append(describe_rows(df, above, "a probability is above 1"))
    if len(present) == len(probs):
        s = arr.sum(axis=1)
        off = ~np.isnan(s) & (np.abs(s - 1.0) > SUM_TOLERANCE)
        if off.any():
            worst = float(np.max(np.abs(s[off] - 1.0)))
            problems.append(
                describe_rows(
                    df,
                    off,
                    f"probabilities do not sum to 1 (tolerance {SUM_TOLERANCE:g}; largest deviation {worst:.3g})",
                )
            )
    return problems


def validate_predictions(
    df: pd.DataFrame,
    classes: Sequence[str],
    *,
    subgroup_columns: Sequence[str] = (),
    run_keys: Sequence[str] = RUN_KEYS,
) -> list[str]:
    """Every problem with a predictions table, as messages naming columns or rows. Empty list: valid."""
    problems: list[str] = []
    classes = [str(c) for c in classes]
    probs = [prob_column(c) for c in classes]
    needed = [*REQUIRED, *probs, *subgroup_columns, *run_keys]
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
    unknown_prob = [c for c in df.columns if str(c).startswith("prob_") and str(c) not in probs]
    if unknown_prob:
        problems.append(
            f"column(s) {', '.join(unknown_prob)}: class(es) "
            f"{', '.join(str(c)[5:] for c in unknown_prob)} unknown to the task (classes: {', '.join(classes)})"
        )
    if len(df) == 0:
        problems.append("the table has no rows")
        return problems
    for col in ("case_id", "patient_id", "site", "split", "y_true"):
        if col in df.columns and df[col].isna().any():
            problems.append(describe_rows(df, df[col].isna(), f"{col} is missing"))
    if "y_true" in df.columns:
        bad = df["y_true"].notna() & ~df["y_true"].astype(str).isin(classes)
        if bad.any():
            vals = sorted(df.loc[bad, "y_true"].astype(str).unique())[:_SHOW]
            problems.append(
                describe_rows(
                    df,
                    bad,
                    f"y_true {', '.join(map(repr, vals))} unknown to the task (classes: {', '.join(classes)})",
                )
            )
    if "split" in df.columns:
        bad = df["split"].notna() & ~df["split"].astype(str).isin(PREDICTED_SPLITS)
        if bad.any():
            vals = sorted(df.loc[bad, "split"].astype(str).unique())[:_SHOW]
            problems.append(
                describe_rows(
                    df, bad, f"split {', '.join(map(repr, vals))} is not one of {', '.join(PREDICTED_SPLITS)}"
                )
            )
    problems += _probability_values(df, probs)
    if "patient_id" in df.columns and "split" in df.columns:
        # a patient scored in one split and seen in another (validation picks the operating point) leaks
        ok = df["patient_id"].notna() & df["split"].notna()
        n_splits = df[ok].groupby("patient_id")["split"].transform("nunique")
        both = pd.Series(False, index=df.index)
        both[n_splits.index] = n_splits.to_numpy() > 1
        if both.any():
            pats = sorted(df.loc[both, "patient_id"].astype(str).unique())
            shown = ", ".join(map(repr, pats[:_SHOW])) + (
                f" and {len(pats) - _SHOW} more" if len(pats) > _SHOW else ""
            )
            problems.append(
                describe_rows(
                    df, both, f"patient(s) {shown} appear in more than one split (splits are by patient)"
                )
            )
    if "case_id" in df.columns:
        keys = [k for k in run_keys if k in df.columns]
        dup = df.duplicated([*keys, "case_id"], keep=False) & df["case_id"].notna()
        if dup.any():
            scope = f" within run key ({', '.join(keys)})" if keys else ""
            problems.append(describe_rows(df, dup, f"duplicate case_id{scope}"))
    return problems
