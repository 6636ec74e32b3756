"""Every leaderboard check, as one named list: what it verifies, at which stage, and where it applies.

Stages:
- `submission`: `medsynbench submit` on a run folder or bundle, before anything is scored (`collect` below; the
  functions live in `bench.leaderboard.collect`, which reads the folder);
- `controls`: the submitted run's control checks, re-scored from its predictions once the submission passes;
- `record`: `leaderboard build` on each stored record, before its numbers are re-scored (`verify_records`);
- `board`: `leaderboard build` on the records together (the reference run's controls);
- `eligibility`: whether a verified record is ranked (`leaderboard.yaml`'s `eligibility` rules).

Where: `board` (a leaderboard kept in a repository) and `service` (the hosted evaluation service). Adding a check is
one `Check(...)` entry in `CHECKS`; every stage runs the entries of its own stage, in order. The hosted service
calls `service_prediction_problems` and `service_exclusion`, which run the entries marked `service`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BadInput
from bench.evaluation.controls import failures
from bench.leaderboard import collect as C
from bench.leaderboard.key import AnswerKey
from bench.leaderboard.record import local_paths
from bench.leaderboard.segboard import verify_record_maps
from bench.leaderboard.spec import ScoringSpec
from bench.runfolder import BASELINE
from bench.tasks import Task

BOARD = "board"
SERVICE = "service"
STAGES = ("submission", "controls", "record", "board", "eligibility")


@dataclass(frozen=True)
class Check:
    """One named check. `run(context)` returns the problems found (submission, record) or the reasons a record is
    not ranked (eligibility); empty: it passes."""

    name: str
    verifies: str
    stage: str
    where: frozenset[str]
    run: Callable[[Any], list[str]]
    # A record check whose answer depends only on what the score cache key holds (the predictions, the answer key,
    # the generator): a cache entry records that it passed, and a build that finds the entry need not run it again.
    cacheable: bool = False


# ------------------------------------------------------------------------------------------------ record stage


@dataclass(frozen=True)
class RecordCase:
    """A stored record with its predictions, the board's answer key and the spec it scores with.

    `source` is the predictions table, or a function that reads it: a build whose score cache vouches for every
    check that reads the table never reads it."""

    record: Mapping[str, Any]
    source: pd.DataFrame | Callable[[], pd.DataFrame]
    key: AnswerKey
    spec: ScoringSpec | None = None
    # A segmentation board's: where the record's label maps lie, and the task naming its mask classes.
    folder: Path | None = None
    task: Task | None = None

    @functools.cached_property
    def predictions(self) -> pd.DataFrame:
        return self.source if isinstance(self.source, pd.DataFrame) else self.source()

    @property
    def rid(self) -> str:
        return str(self.record.get("id", "?"))


def _no_local_paths(c: RecordCase) -> list[str]:
    left = local_paths(dict(c.record))
    return [f"record {c.rid}: holds local paths ({'; '.join(left[:3])})"] if left else []


def _own_predictions(c: RecordCase) -> list[str]:
    gen = c.record["generator"]["name"]
    df = c.predictions
    gens = set(df["generator"].astype(str).unique()) if "generator" in df.columns else set()
    if gen not in gens or gens - {gen, BASELINE}:
        return [
            f"record {c.rid}: its predictions file holds generator(s) {sorted(gens)}, not {gen!r} (and "
            f"{BASELINE!r}): predictions of another record"
        ]
    return []


class _RowNames:
    """`row_names` computed for the rows a problem names only: a board of many records is checked often and its
    predictions almost never disagree with the key."""

    def __init__(self, predictions: pd.DataFrame, where: str) -> None:
        self.predictions, self.where = predictions, where

    def __getitem__(self, label: Any) -> str:
        pos = self.predictions.index.get_loc(label)
        return f"{self.where}row {pos + 1} (case {self.predictions['case_id'].iloc[pos]})"


def _agrees_with_key(c: RecordCase) -> list[str]:
    where = (c.record.get("predictions") or {}).get("file", "predictions")
    found = c.key.cross_check(c.predictions, _RowNames(c.predictions, f"{where} "))  # type: ignore[arg-type]
    return [f"record {c.rid}: {p}" for p in found]


def _label_maps(c: RecordCase) -> list[str]:
    if c.task is None or c.folder is None or not c.task.is_segmentation:
        return []
    return verify_record_maps(c.record, c.folder, c.predictions, c.key, c.task)


def _scored_under_spec(c: RecordCase) -> list[str]:
    return [] if c.spec is None else c.spec.record_problems(c.record)


# ------------------------------------------------------------------------------------------------ eligibility


@dataclass(frozen=True)
class Eligible:
    """A record (or the service's result) and the board's eligibility rules (`leaderboard.yaml` `eligibility`)."""

    record: Mapping[str, Any]
    privacy_flagged: str = "exclude"
    contamination: str = "exclude"


def _privacy_flag(e: Eligible) -> list[str]:
    if e.record.get("kind", "generator") != "generator" or e.privacy_flagged != "exclude":
        return []
    priv = e.record.get("privacy") or {}
    if not priv.get("flagged"):
        return []
    rate, nominal = priv.get("memorization_rate"), priv.get("nominal_rate")
    detail = f": memorization rate {rate:.3f}" if isinstance(rate, int | float) else ""
    if detail and isinstance(nominal, int | float):
        detail += f" against a nominal {nominal:.3f}"
    return [f"flagged by the privacy audit{detail}"]


def _contamination(e: Eligible) -> list[str]:
    if e.record.get("kind", "generator") != "generator" or e.contamination != "exclude":
        return []
    cont = (e.record.get("privacy") or {}).get("contamination") or {}
    if cont.get("status") in (None, "pass"):
        return []
    found = "; ".join(map(str, cont.get("problems") or []))
    return [f"contamination checks {cont.get('status')}" + (f" ({found})" if found else "")]


# ------------------------------------------------------------------------------------------------ controls


def _reference_controls(c: C.SubmissionCase) -> list[str]:
    """Re-scores the run's controls (kept on the case for the reference record); the failures are the problems."""
    results = C.reference_controls(c.root, c.task, c.runs, c.cfg)
    c.controls = results
    return failures(results)


def _board_controls(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return failures(
        [ctl for r in records if r.get("kind") == "reference" for ctl in (r.get("controls") or [])]
    )


# ------------------------------------------------------------------------------------------------ the list

_BOTH = frozenset({BOARD, SERVICE})
_BOARD = frozenset({BOARD})

CHECKS: list[Check] = [
    Check(
        "task-definition",
        "the run's task is the board's: name, version, every scored field",
        "submission",
        _BOTH,
        C.check_task,
    ),
    Check(
        "real-manifest",
        "matrix.json names the real manifest's sha256, and it is the pinned one",
        "submission",
        _BOARD,
        C.check_real_manifest,
    ),
    Check(
        "generators-named",
        "every --generator names a generator the run holds",
        "submission",
        _BOARD,
        C.check_generators_named,
    ),
    Check("one-backbone", "a record covers runs of one backbone", "submission", _BOARD, C.check_one_backbone),
    Check(
        "required-runs",
        "every required regime and seed finished, for the reference and each generator",
        "submission",
        _BOARD,
        C.check_required_runs,
    ),
    Check(
        "coverage",
        "every run predicts every test and external case, and no other",
        "submission",
        _BOTH,
        C.check_coverage,
    ),
    Check(
        "consistent-cases",
        "a case has the same patient, site, split and label in every run",
        "submission",
        _BOARD,
        C.check_consistent_cases,
    ),
    Check(
        "eval-cases-pin",
        "the test + external case set is the one the board pins",
        "submission",
        _BOARD,
        C.check_eval_cases_pin,
    ),
    Check("generator-card", "each generator has a valid card", "submission", _BOTH, C.check_cards),
    Check(
        "privacy-audit",
        "each generator has a readable privacy audit (when the board requires one)",
        "submission",
        _BOARD,
        C.check_privacy,
    ),
    Check(
        "synthetic-manifest",
        "matrix.json names each generator's synthetic manifest sha256",
        "submission",
        _BOARD,
        C.check_synthetic_manifests,
    ),
    Check(
        "reference-controls",
        "the run's control checks pass, re-scored from its predictions",
        "controls",
        _BOARD,
        _reference_controls,
    ),
    Check("no-local-paths", "a record holds no absolute local path", "record", _BOTH, _no_local_paths),
    Check(
        "own-predictions",
        "a record's predictions file holds its own generator and the real-only reference only",
        "record",
        _BOARD,
        _own_predictions,
        cacheable=True,
    ),
    Check(
        "answer-key",
        "labels, sites, splits, patients and subgroups of the predictions agree with the answer key",
        "record",
        _BOTH,
        _agrees_with_key,
        cacheable=True,
    ),
    # Not cacheable: the score cache's key holds the predictions file, not the label maps file.
    Check(
        "label-maps",
        "a segmentation record's stored counts are its stored label maps recounted against the answer key's masks",
        "record",
        _BOARD,
        _label_maps,
    ),
    Check(
        "scoring-spec",
        "a record was scored under the board's spec: task definition (field by field), primary metric, bootstrap",
        "record",
        _BOARD,
        _scored_under_spec,
    ),
    Check("board-controls", "the reference records' control checks pass", "board", _BOARD, _board_controls),
    Check(
        "privacy-flag",
        "a generator the privacy audit flags is not ranked",
        "eligibility",
        _BOTH,
        _privacy_flag,
    ),
    Check(
        "contamination",
        "a generator whose contamination checks did not pass is not ranked",
        "eligibility",
        _BOTH,
        _contamination,
    ),
]


def checks(stage: str, where: str = BOARD) -> list[Check]:
    """The checks of one stage that apply to a board or to the service, in order."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    return [c for c in CHECKS if c.stage == stage and where in c.where]


def run_checks(stage: str, context: Any, where: str = BOARD, skip: Iterable[str] = ()) -> list[str]:
    skip = set(skip)
    return [p for c in checks(stage, where) if c.name not in skip for p in c.run(context)]


def cacheable_checks() -> list[str]:
    """Names of the record checks a score cache entry can vouch for."""
    return [c.name for c in CHECKS if c.stage == "record" and c.cacheable]


def record_problems(case: RecordCase, where: str = BOARD, skip: Iterable[str] = ()) -> list[str]:
    """Every record-stage problem of one stored record; `skip`: cacheable checks a cache entry says passed."""
    cacheable = set(cacheable_checks())
    return run_checks("record", case, where, [s for s in skip if s in cacheable])


def exclusion(record: Mapping[str, Any], rules: Any, where: str = BOARD) -> str | None:
    """Why the eligibility rules keep a record out of the ranking (None: ranked). `rules` has `privacy_flagged`
    and `contamination` (`leaderboard.yaml`'s `eligibility`)."""
    reasons = run_checks("eligibility", Eligible(record, rules.privacy_flagged, rules.contamination), where)
    return "; ".join(reasons) or None


def service_prediction_problems(
    key: AnswerKey, predictions: pd.DataFrame, record: Mapping[str, Any]
) -> list[str]:
    """The record-stage checks the hosted service shares: `record` is what the service will publish (id, privacy,
    predictions file name), `predictions` its salted predictions."""
    return record_problems(RecordCase(record, predictions, key), SERVICE)


def service_exclusion(privacy: Mapping[str, Any] | None, rules: Any) -> str | None:
    """Why the service's eligibility rules keep a generator out of its ranking (None: ranked)."""
    return exclusion({"kind": "generator", "privacy": privacy or {}}, rules, SERVICE)


def collect(root: Path, cfg: Any, only: Sequence[str] | None = None) -> C.Submission:
    """Read a submission and run every submission-stage check on it, then its controls; BadInput lists every
    problem found (a run whose controls fail is not published)."""
    case = C.read_submission(root, cfg, only)
    problems = case.read_problems + run_checks("submission", case)
    if problems:
        raise BadInput(f"{root}: submission rejected, {len(problems)} problem(s)", problems)
    failed = run_checks("controls", case)
    if failed:
        raise BadInput(
            f"{root}: not published: the reference run fails {len(failed)} control check(s); a benchmark whose "
            "controls fail cannot rank generators",
            failed,
        )
    return case.submission(case.controls)


def describe(where: str | None = None) -> list[dict[str, str]]:
    """The list as data (name, stage, what it verifies, where): for docs and `--help`."""
    return [
        {"name": c.name, "stage": c.stage, "verifies": c.verifies, "where": ", ".join(sorted(c.where))}
        for c in CHECKS
        if where is None or where in c.where
    ]


def names(stage: str | None = None) -> Sequence[str]:
    return [c.name for c in CHECKS if stage is None or c.stage == stage]
