"""Reading a submission: a run folder (or unpacked bundle) read into a `SubmissionCase`, and the functions of the
submission-stage checks that `bench.leaderboard.checks.CHECKS` lists (`bench.leaderboard.checks.collect` runs
them). Nothing is scored here."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.evaluation.controls import controls_from_predictions, read_privacy, run_controls
from bench.generators.card import read_card
from bench.io import read_json, sha256_file
from bench.leaderboard.config import LeaderboardConfig, board_spec
from bench.leaderboard.segboard import run_sha256, seg_reference_controls
from bench.leaderboard.spec import (
    ScoringSpec,
    changed_fields,
    task_fields,
    task_problems,
    task_spec_sha256,
)
from bench.manifest import manifest_hash, read_manifest
from bench.metrics.validate import validate_predictions
from bench.regimes import parse_regime
from bench.runfolder import (
    BASELINE,
    CARD_FILE,
    PREDICTIONS_FILE,
    RUN_KEYS,
    SCORED_SPLITS,
    SEG_PREDICTIONS_FILE,
    ManifestRef,
    MatrixInfo,
    RunConfig,
    RunDir,
)
from bench.tasks import Task, load_task

log = logging.getLogger(__name__)


def eval_cases_sha256(case_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(map(str, case_ids))).encode()).hexdigest()


@dataclass
class Run:
    folder: Path
    keys: tuple[str, str, int, str]  # generator, regime, seed, backbone
    preds: pd.DataFrame  # a segmentation run: its count table (only its case columns and run keys are read)
    sha256: str
    config: dict[str, Any] = field(default_factory=dict)
    maps: Path | None = None  # a segmentation run's labelmaps.npz

    @property
    def file(self) -> str:
        """The run's predictions file, as messages name it."""
        return SEG_PREDICTIONS_FILE if self.maps is not None else PREDICTIONS_FILE


@dataclass
class Submission:
    root: Path
    task: Task
    matrix: MatrixInfo
    runs: list[Run]
    generators: list[str]
    cards: dict[str, dict[str, Any]]
    privacy: dict[str, dict[str, Any] | None]
    manifests: dict[str, Any]
    eval_ids: list[str]
    backbone: str
    notes: list[str]
    controls: list[dict[str, Any]] = field(default_factory=list)


def _regime(name: str) -> tuple[str, bool]:
    r = parse_regime(name)
    return r.name, r.uses_synthetic


def _sha_of(ref: ManifestRef | None) -> str | None:
    return ref.sha256 if ref is not None else None


def _read_json_file(path: Path, problems: list[str]) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        problems.append(f"{path}: not readable JSON: {e}")
        return None


def _expected_eval_ids(root: Path, matrix: MatrixInfo, task: Task, notes: list[str]) -> set[str] | None:
    """Test and external case ids from the real manifest, when the bundle carries it and its hash matches."""
    entry = matrix.real_manifest()
    path = entry.path if entry is not None else None
    if not path:
        return None
    p = Path(path)
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        notes.append(
            "real manifest not in the submission: coverage checked across runs and against the pinned case set"
        )
        return None
    m = read_manifest(p)
    want = entry.sha256
    if want and manifest_hash(m.df) != want:
        return None  # reported by the hash check
    real = m.df[m.df["origin"].astype(str) == "real"] if "origin" in m.df.columns else m.df
    return set(real.loc[real["split"].astype(str).isin(SCORED_SPLITS), "case_id"].astype(str))


@dataclass
class SubmissionCase:
    """A submission as read from its folder, before any check: what the submission-stage checks look at. Checks
    that parse a file (card, privacy audit) keep what they read here."""

    root: Path
    cfg: LeaderboardConfig
    spec: ScoringSpec | None
    task: Task
    run_dir: RunDir
    matrix: MatrixInfo
    matrix_ok: bool
    runs: list[Run]
    backbones: list[str]
    generators: list[str]
    all_generators: list[str]
    only: Sequence[str] | None
    expected_ids: set[str] | None
    notes: list[str] = field(default_factory=list)
    read_problems: list[str] = field(default_factory=list)
    cards: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    controls: list[Any] = field(default_factory=list)

    @property
    def backbone(self) -> str:
        return self.cfg.protocol.backbone or (self.backbones[0] if len(self.backbones) == 1 else "")

    def eval_ids(self, run: Run) -> set[str]:
        ev = run.preds[run.preds["split"].astype(str).isin(SCORED_SPLITS)]
        return set(ev["case_id"].astype(str))

    @functools.cached_property
    def universe(self) -> set[str]:
        """The test and external cases every run must predict: the real manifest's, else every run's together."""
        if self.expected_ids is not None:
            return self.expected_ids
        out: set[str] = set()
        for r in self.runs:
            out |= self.eval_ids(r)
        return out

    def submission(self, controls: list[Any]) -> Submission:
        real_sha = _sha_of(self.matrix.real_manifest())
        manifests = {}
        for g in self.generators:
            train_sha = ((self.cards.get(g) or {}).get("training") or {}).get("manifest_sha256")
            manifests[g] = {
                "real": real_sha,
                "synthetic": _sha_of(self.matrix.synthetic_manifest(g)),
                "generator_training": train_sha,
            }
        return Submission(
            self.root,
            self.task,
            self.matrix,
            self.runs,
            self.generators,
            dict(self.cards),
            dict(self.privacy),
            manifests,
            sorted(self.universe),
            self.backbone,
            self.notes,
            [c.to_dict() for c in controls],
        )


def read_submission(root: Path, cfg: LeaderboardConfig, only: Sequence[str] | None = None) -> SubmissionCase:
    """Read what a submission holds (task, matrix, runs); unreadable files are `read_problems`. A run folder without
    a readable task stops here (BadInput): nothing else can be checked without it."""
    problems: list[str] = []
    notes: list[str] = []
    run_dir = RunDir(root)
    task_file = run_dir.task_file
    task = None
    if not task_file.is_file():
        problems.append(f"{task_file}: missing (a run folder holds the resolved task it ran)")
    else:
        try:
            task = load_task(task_file)
        except BadInput as e:
            problems.append(str(e))
    spec = None
    try:
        spec = board_spec(cfg)[1]
    except BadInput as e:
        problems.append(str(e))
    matrix_file = run_dir.matrix_file
    matrix, matrix_ok = MatrixInfo(), False
    if not matrix_file.is_file():
        problems.append(f"{matrix_file}: missing")
    else:
        try:
            matrix, matrix_ok = run_dir.matrix(), True
        except BadInput as e:
            problems += [e.args[0], *e.problems]
    if task is None:
        raise BadInput(f"{root}: submission rejected, {len(problems)} problem(s)", problems)

    runs = _read_runs(run_dir, task, problems)
    backbones = sorted({r.keys[3] for r in runs})
    if cfg.protocol.backbone:
        runs = [r for r in runs if r.keys[3] == cfg.protocol.backbone]
    all_gens = sorted({r.keys[0] for r in runs if r.keys[0] != BASELINE})
    if only:
        gens = [g for g in all_gens if g in only]
    else:
        # Controls that run only the regimes their checks need are checked, not ranked as entries.
        control_only = set(matrix.protocol.controls)
        gens = [g for g in all_gens if g not in control_only]
        if control_only & set(all_gens):
            notes.append(f"control run(s) {sorted(control_only & set(all_gens))} checked, not ranked")
    if not gens and not only:
        notes.append("no generator runs: only the real-only reference is submitted")
    expected = _expected_eval_ids(root, matrix, task, notes) if matrix_ok else None
    return SubmissionCase(
        root,
        cfg,
        spec,
        task,
        run_dir,
        matrix,
        matrix_ok,
        runs,
        backbones,
        gens,
        all_gens,
        only,
        expected,
        notes,
        problems,
    )


# ------------------------------------------------------------------------------------------------ submission checks
# Each takes the case and returns its problems; the list that names them is bench.leaderboard.checks.CHECKS.


def check_task(c: SubmissionCase) -> list[str]:
    where = str(c.run_dir.task_file)
    found = task_problems(c.task, c.cfg.task.name, c.cfg.task.version, None, where)
    if not found and c.spec is not None and task_spec_sha256(c.task) != c.spec.task_sha256:
        changed = ", ".join(changed_fields(task_fields(c.task), c.spec.fields_map()))
        found = [
            f"{where}: the task definition differs from the leaderboard's {c.cfg.task.name} {c.cfg.task.version} "
            f"in field(s) {changed}; a change that can alter a score needs a new task version"
        ]
    return found


def check_real_manifest(c: SubmissionCase) -> list[str]:
    real_sha = _sha_of(c.matrix.real_manifest())
    pin = c.cfg.pins.manifests.real
    if not real_sha:
        return [f"{c.run_dir.matrix_file}: field 'manifests.real.sha256' is missing"]
    if pin and real_sha != pin:
        return [
            f"{c.run_dir.matrix_file}: real manifest sha256 {real_sha[:12]}... does not match the pinned "
            f"{pin[:12]}... (the leaderboard's real data)"
        ]
    return []


def check_generators_named(c: SubmissionCase) -> list[str]:
    if not c.only:
        return []
    found = ", ".join(c.all_generators) or "none"
    return [
        f"--generator {g!r}: no runs of this generator in {c.root} (found: {found})"
        for g in sorted(set(c.only) - set(c.all_generators) - {BASELINE})
    ]


def check_one_backbone(c: SubmissionCase) -> list[str]:
    if not c.cfg.protocol.backbone and len(c.backbones) > 1:
        return [f"{c.root}: runs with several backbones {c.backbones}; a record covers one backbone"]
    return []


def check_required_runs(c: SubmissionCase) -> list[str]:
    problems: list[str] = []
    cfg, task = c.cfg, c.task
    required = cfg.protocol.regimes if cfg.protocol.regimes is not None else list(task.protocol.regimes)
    seeds = cfg.protocol.seeds if cfg.protocol.seeds is not None else list(task.protocol.seeds)
    req_real, req_syn = [], []
    for r in required:
        try:
            name, syn = _regime(r)
        except BadInput as e:
            problems.append(f"leaderboard regime: {e}")
            continue
        (req_syn if syn else req_real).append(name)
    have = {r.keys[:3] for r in c.runs}
    bb = f", backbone {c.backbone!r}" if c.backbone else ""
    for gen, regimes in [(BASELINE, req_real), *[(g, req_syn) for g in c.generators]]:
        for r in regimes:
            missing = [s for s in seeds if (gen, r, s) not in have]
            if missing:
                problems.append(
                    f"{c.root}: required run(s) missing or unfinished (no DONE): generator {gen!r}, regime {r!r}, "
                    f"seed(s) {missing}{bb}"
                )
    return problems


def check_coverage(c: SubmissionCase) -> list[str]:
    problems = []
    for r in c.runs:
        got = c.eval_ids(r)
        missing, extra = sorted(c.universe - got), sorted(got - c.universe)
        where = r.folder / r.file
        if missing:
            problems.append(
                f"{where}: {len(missing)} test/external case(s) not predicted (e.g. {', '.join(map(repr, missing[:5]))})"
            )
        if extra:
            problems.append(
                f"{where}: {len(extra)} case(s) predicted as test/external that the real manifest does not hold there "
                f"(e.g. {', '.join(map(repr, extra[:5]))})"
            )
    return problems


def check_consistent_cases(c: SubmissionCase) -> list[str]:
    if not c.runs:
        return []
    cols = ["case_id", "patient_id", "site", "split", "y_true"]
    allrows = pd.concat([r.preds[cols].astype(str) for r in c.runs]).drop_duplicates()
    bad = allrows["case_id"][allrows["case_id"].duplicated()].unique()
    if len(bad):
        return [
            f"{len(bad)} case(s) have different patient_id/site/split/y_true in different runs "
            f"(e.g. {', '.join(map(repr, bad[:5]))})"
        ]
    return []


def check_eval_cases_pin(c: SubmissionCase) -> list[str]:
    pin, universe = c.cfg.pins.eval_cases_sha256, c.universe
    if pin and universe and eval_cases_sha256(sorted(universe)) != pin:
        return [
            f"{c.root}: the test + external cases ({len(universe)}) are not the set the leaderboard pins "
            f"(eval_cases_sha256 {eval_cases_sha256(sorted(universe))[:12]}... != {pin[:12]}...)"
        ]
    return []


def check_cards(c: SubmissionCase) -> list[str]:
    problems: list[str] = []
    for g in c.generators:
        c.cards[g] = _read_card(c.run_dir, g, problems)
    return problems


def check_privacy(c: SubmissionCase) -> list[str]:
    problems: list[str] = []
    for g in c.generators:
        c.privacy[g] = _read_privacy(c.run_dir, g, c.cfg.require_privacy, problems)
    return problems


def check_synthetic_manifests(c: SubmissionCase) -> list[str]:
    return [
        f"{c.run_dir.matrix_file}: no sha256 for the synthetic manifest of generator {g!r}"
        for g in c.generators
        if not _sha_of(c.matrix.synthetic_manifest(g))
    ]


def reference_controls(root: Path, task: Task, runs: list[Run], cfg: LeaderboardConfig) -> list[Any]:
    """The run's controls, re-scored from its predictions with the board's bootstrap (a segmentation run's from its
    label maps recounted against the answer key: `segboard.seg_reference_controls`)."""
    if task.is_segmentation:
        return seg_reference_controls(root, task, runs, cfg)
    ctl = run_controls(root)
    preds = [r.preds for r in runs if r.keys[0] in (BASELINE, *ctl)]
    if not preds:
        return []
    return controls_from_predictions(
        pd.concat(preds, ignore_index=True),
        task,
        ctl,
        read_privacy(root, list(ctl)),
        n_boot=cfg.bootstrap.n,
        seed=cfg.bootstrap.seed,
    )


def _seg_problems(df: pd.DataFrame, task: Task) -> list[str]:
    """A count table's case columns and run keys (its counts are never read: the board recounts them)."""
    need = ["case_id", "patient_id", "site", "split", "y_true", *task.subgroups.columns, *RUN_KEYS]
    missing = [c for c in need if c not in df.columns]
    if missing:
        return [f"missing column(s): {', '.join(missing)}"]
    blank = [c for c in ("case_id", "patient_id", "split", *RUN_KEYS) if df[c].isna().any()]
    out = [f"column {c!r} has empty values" for c in blank]
    seed = pd.to_numeric(df["seed"], errors="coerce")
    if "seed" not in blank and (seed.isna() | (seed != seed.round())).any():
        out.append("column 'seed' holds values that are not whole numbers")
    return out


def _read_runs(run_dir: RunDir, task: Task, problems: list[str]) -> list[Run]:
    runs = []
    seg = task.is_segmentation
    # Unfinished runs are left out; a required one is reported as missing.
    for run in run_dir.finished_runs():
        d, pf = run.path, run.seg_predictions if seg else run.predictions
        if not pf.is_file():
            problems.append(f"{pf}: missing (a {task.kind} run of task {task.name} stores it)")
            continue
        try:
            df = pd.read_parquet(pf)
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            problems.append(f"{pf}: cannot be read as parquet: {e}")
            continue
        df = task.add_subgroup_columns(df)
        if seg:
            found = _seg_problems(df, task)
        else:
            found = validate_predictions(
                df, task.classes, subgroup_columns=task.subgroups.columns, run_keys=list(RUN_KEYS)
            )
        if found:
            problems += [f"{pf}: {p}" for p in found]
            continue
        keys = df[list(RUN_KEYS)].drop_duplicates()
        if len(keys) != 1:
            problems.append(
                f"{pf}: holds {len(keys)} runs (generator, regime, seed, backbone); one run per folder"
            )
            continue
        g, r, s, b = keys.iloc[0].tolist()
        try:
            r = _regime(str(r))[0]
        except BadInput as e:
            problems.append(f"{pf}: column 'regime': {e}")
            continue
        df["regime"] = r
        df["seed"] = df["seed"].astype(int)
        config: dict[str, Any] = {}
        if run.config_path.is_file():
            try:
                config = _config_dict(run.config())
            except BadInput as e:
                problems += [e.args[0], *e.problems]
                continue
        if seg:
            sha = run_sha256(pf, run.labelmaps)
            runs.append(Run(d, (str(g), r, int(s), str(b)), df, sha, config, run.labelmaps))
        else:
            runs.append(Run(d, (str(g), r, int(s), str(b)), df, sha256_file(pf), config))
    dup: dict[tuple, list[Path]] = {}
    for r in runs:
        dup.setdefault(r.keys, []).append(r.folder)
    for k, folders in dup.items():
        if len(folders) > 1:
            problems.append(f"run {k} appears in several folders: {', '.join(f.name for f in folders)}")
    return runs


def _config_dict(config: RunConfig) -> dict[str, Any]:
    """The run's config as written (fields the file did not hold are not filled in with defaults)."""
    return config.model_dump(mode="json", exclude_unset=True)


def _read_card(run_dir: RunDir, g: str, problems: list[str]) -> dict[str, Any] | None:
    card = run_dir.card_file(g)
    for path in (card, card.with_name("card.yaml"), card.with_name("card.yml")):
        if path.is_file():
            try:
                return read_card(path).to_dict()
            except BadInput as e:
                problems.append(str(e))
                return None
    problems.append(f"{card.parent}: generator card missing ({CARD_FILE} or card.yaml)")
    return None


def _read_privacy(run_dir: RunDir, g: str, required: bool, problems: list[str]) -> dict[str, Any] | None:
    path = run_dir.privacy_file(g)
    if not path.is_file():
        if required:
            problems.append(
                f"{path}: missing (this leaderboard requires the privacy audit: medsynbench privacy ...)"
            )
        return None
    raw = _read_json_file(path, problems)
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a JSON object")
        return None
    cont = raw.get("contamination") or {}
    status = cont.get("status") if isinstance(cont, dict) else None
    if status not in ("pass", "fail"):
        problems.append(f"{path}: field 'contamination.status' must be 'pass' or 'fail' (got {status!r})")
    rate = raw.get("memorization_rate")
    if not isinstance(rate, int | float) or not 0 <= rate <= 1:
        problems.append(f"{path}: field 'memorization_rate' must be a number in [0, 1] (got {rate!r})")

    def num(k: str) -> float | None:
        v = raw.get(k)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) else None

    flagged = raw.get("flagged")
    return {
        "memorization_rate": num("memorization_rate"),
        "ci_low": num("ci_low"),
        "ci_high": num("ci_high"),
        "flagged": flagged if isinstance(flagged, bool) else None,
        "nominal_rate": num("nominal_rate"),
        "percentile": num("percentile"),
        "contamination": {
            "status": status if status in ("pass", "fail") else "unknown",
            "problems": [str(p) for p in (cont.get("problems") or [])] if isinstance(cont, dict) else [],
        },
    }
