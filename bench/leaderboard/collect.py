"""Reading a submission: a run folder (or unpacked bundle) read into a `Submission`, then every submission-stage
check of `bench.leaderboard.checks` run on it. BadInput lists every problem found; nothing is scored here."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.evaluation.controls import controls_from_predictions, failures, read_privacy, run_controls
from bench.io import read_json, sha256_file
from bench.leaderboard.config import LeaderboardConfig, board_spec
from bench.leaderboard.spec import (
    changed_fields,
    task_fields,
    task_problems,
    task_spec_sha256,
)
from bench.runfolder import (
    BASELINE,
    CARD_FILE,
    RUN_KEYS,
    SCORED_SPLITS,
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
    preds: pd.DataFrame
    sha256: str
    config: dict[str, Any] = field(default_factory=dict)


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
    from bench.regimes import parse_regime

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
    from bench.manifest import manifest_hash, read_manifest

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


def collect(root: Path, cfg: LeaderboardConfig, only: Sequence[str] | None = None) -> Submission:
    """Read and check everything a submission must hold; BadInput lists every problem found."""
    problems: list[str] = []
    notes: list[str] = []

    # The task the run says it ran, checked against what the leaderboard pins.
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
    if task is not None:
        found = task_problems(task, cfg.task.name, cfg.task.version, None, str(task_file))
        if not found and spec is not None and task_spec_sha256(task) != spec.task_sha256:
            changed = ", ".join(changed_fields(task_fields(task), spec.fields_map()))
            found = [
                f"{task_file}: the task definition differs from the leaderboard's {cfg.task.name} "
                f"{cfg.task.version} in field(s) {changed}; a change that can alter a score needs a new task version"
            ]
        problems += found

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

    real_sha = _sha_of(matrix.real_manifest())
    if not real_sha:
        problems.append(f"{matrix_file}: field 'manifests.real.sha256' is missing")
    elif cfg.pins.manifests.real and real_sha != cfg.pins.manifests.real:
        problems.append(
            f"{matrix_file}: real manifest sha256 {real_sha[:12]}... does not match the pinned "
            f"{cfg.pins.manifests.real[:12]}... (the leaderboard's real data)"
        )

    runs = _read_runs(run_dir, task, problems)
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

    backbones = sorted({r.keys[3] for r in runs})
    backbone = cfg.protocol.backbone or (backbones[0] if len(backbones) == 1 else "")
    if cfg.protocol.backbone:
        runs = [r for r in runs if r.keys[3] == cfg.protocol.backbone]
    elif len(backbones) > 1:
        problems.append(f"{root}: runs with several backbones {backbones}; a record covers one backbone")

    have = {r.keys[:3] for r in runs}
    all_gens = sorted({r.keys[0] for r in runs if r.keys[0] != BASELINE})
    if only:
        unknown = sorted(set(only) - set(all_gens) - {BASELINE})
        for g in unknown:
            problems.append(
                f"--generator {g!r}: no runs of this generator in {root} (found: {', '.join(all_gens) or 'none'})"
            )
        gens = [g for g in all_gens if g in only]
    else:
        # Controls that run only the regimes their checks need are checked below, not ranked as entries.
        control_only = set(matrix.protocol.controls)
        gens = [g for g in all_gens if g not in control_only]
        if control_only & set(all_gens):
            notes.append(f"control run(s) {sorted(control_only & set(all_gens))} checked, not ranked")

    def need(gen: str, regimes: list[str]) -> None:
        for r in regimes:
            missing = [s for s in seeds if (gen, r, s) not in have]
            if missing:
                problems.append(
                    f"{root}: required run(s) missing or unfinished (no DONE): generator {gen!r}, regime {r!r}, "
                    f"seed(s) {missing}" + (f", backbone {backbone!r}" if backbone else "")
                )

    need(BASELINE, req_real)
    for g in gens:
        need(g, req_syn)

    # Coverage: every run predicts every test and external case exactly once (duplicates are found per run).
    eval_ids: set[str] = set()
    expected = _expected_eval_ids(root, matrix, task, notes) if matrix_ok else None
    per_run = {}
    for r in runs:
        ev = r.preds[r.preds["split"].astype(str).isin(SCORED_SPLITS)]
        per_run[r.folder] = set(ev["case_id"].astype(str))
        eval_ids |= per_run[r.folder]
    universe = expected if expected is not None else eval_ids
    for r in runs:
        got = per_run[r.folder]
        missing = sorted(universe - got)
        extra = sorted(got - universe)
        if missing:
            problems.append(
                f"{run_dir.run(r.folder.name).predictions}: {len(missing)} test/external case(s) not predicted "
                f"(e.g. {', '.join(map(repr, missing[:5]))})"
            )
        if extra:
            problems.append(
                f"{run_dir.run(r.folder.name).predictions}: {len(extra)} case(s) predicted as test/external that the real "
                f"manifest does not hold there (e.g. {', '.join(map(repr, extra[:5]))})"
            )
    if runs:
        _check_consistent_cases(runs, problems)
    if (
        cfg.pins.eval_cases_sha256
        and universe
        and eval_cases_sha256(sorted(universe)) != cfg.pins.eval_cases_sha256
    ):
        problems.append(
            f"{root}: the test + external cases ({len(universe)}) are not the set the leaderboard pins "
            f"(eval_cases_sha256 {eval_cases_sha256(sorted(universe))[:12]}... != {cfg.pins.eval_cases_sha256[:12]}...)"
        )

    cards, privacy, manifests = {}, {}, {}
    for g in gens:
        cards[g] = _read_card(run_dir, g, problems)
        privacy[g] = _read_privacy(run_dir, g, cfg.require_privacy, problems)
        syn_sha = _sha_of(matrix.synthetic_manifest(g))
        train_sha = ((cards[g] or {}).get("training") or {}).get("manifest_sha256")
        manifests[g] = {"real": real_sha, "synthetic": syn_sha, "generator_training": train_sha}
        if not syn_sha:
            problems.append(f"{matrix_file}: no sha256 for the synthetic manifest of generator {g!r}")
    if not gens and not only:
        notes.append("no generator runs: only the real-only reference is submitted")
    if problems:
        raise BadInput(f"{root}: submission rejected, {len(problems)} problem(s)", problems)
    controls = reference_controls(root, task, runs, cfg)
    return Submission(
        root,
        task,
        matrix,
        runs,
        gens,
        cards,
        privacy,
        manifests,
        sorted(universe),
        backbone,
        notes,
        [c.to_dict() for c in controls],
    )


def reference_controls(root: Path, task: Task, runs: list[Run], cfg: LeaderboardConfig) -> list[Any]:
    """The run's controls, re-scored from its predictions; a failed control refuses the submission (exit 2)."""
    ctl = run_controls(root)
    preds = [r.preds for r in runs if r.keys[0] in (BASELINE, *ctl)]
    if not preds:
        return []
    results = controls_from_predictions(
        pd.concat(preds, ignore_index=True),
        task,
        ctl,
        read_privacy(root, list(ctl)),
        n_boot=cfg.bootstrap.n,
        seed=cfg.bootstrap.seed,
    )
    failed = failures(results)
    if failed:
        raise BadInput(
            f"{root}: not published: the reference run fails {len(failed)} control check(s); a benchmark whose "
            "controls fail cannot rank generators",
            failed,
        )
    return results


def _read_runs(run_dir: RunDir, task: Task, problems: list[str]) -> list[Run]:
    from bench.metrics.validate import validate_predictions

    runs = []
    # Unfinished runs are left out; a required one is reported as missing.
    for run in run_dir.finished_runs():
        d, pf = run.path, run.predictions
        try:
            df = pd.read_parquet(pf)
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            problems.append(f"{pf}: cannot be read as parquet: {e}")
            continue
        df = task.add_subgroup_columns(df)
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


def _check_consistent_cases(runs: list[Run], problems: list[str]) -> None:
    cols = ["case_id", "patient_id", "site", "split", "y_true"]
    allrows = pd.concat([r.preds[cols].astype(str) for r in runs]).drop_duplicates()
    bad = allrows["case_id"][allrows["case_id"].duplicated()].unique()
    if len(bad):
        problems.append(
            f"{len(bad)} case(s) have different patient_id/site/split/y_true in different runs "
            f"(e.g. {', '.join(map(repr, bad[:5]))})"
        )


def _read_card(run_dir: RunDir, g: str, problems: list[str]) -> dict[str, Any] | None:
    from bench.generators.card import read_card

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
