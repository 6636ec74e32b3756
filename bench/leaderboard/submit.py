"""`medsynbench submit`: validate a run, re-score it from its predictions, add one record per generator.

Nothing is written until every check has passed and every record is scored and schema-valid. Files land by atomic
rename, predictions before the record that points at them, under an exclusive lock on the leaderboard folder, so two
submits at the same time both land and a reader never sees a record without its predictions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.evaluation.controls import controls_from_predictions, failures, read_privacy, run_controls
from bench.io import read_json, sha256_file, write_json, write_table
from bench.leaderboard.archive import opened_run
from bench.leaderboard.build import remember_scores, scoring_settings
from bench.leaderboard.config import LeaderboardConfig, load_config, load_key
from bench.leaderboard.fidelity import record_fidelity
from bench.leaderboard.key import AnswerKey, hash_ids, row_names
from bench.leaderboard.model_privacy import record_model_privacy
from bench.leaderboard.record import (
    PUBLISHED_MODE,
    SCHEMA_VERSION,
    check_record,
    local_paths,
    new_record_id,
    now_iso,
    redact,
    scrub_local_paths,
)
from bench.leaderboard.score import score_all, score_submission
from bench.protocol.plan import package_versions
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


def task_spec_sha256(task: Task) -> str:
    """Identity of a task definition: every field but `source` (which only says where the data lives)."""
    spec = task.spec()
    spec.pop("source", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    if task is not None:
        if task.name != cfg.task.name or task.version != cfg.task.version:
            problems.append(
                f"{task_file}: task {task.name} {task.version} does not match the leaderboard's "
                f"{cfg.task.name} {cfg.task.version}"
            )
        elif cfg.task.spec_sha256 and task_spec_sha256(task) != cfg.task.spec_sha256:
            problems.append(
                f"{task_file}: the task definition differs from the one the leaderboard pins for "
                f"{cfg.task.name} {cfg.task.version} (spec sha256 {task_spec_sha256(task)[:12]}... != "
                f"{cfg.task.spec_sha256[:12]}...)"
            )

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


def _environment(sub: Submission) -> dict[str, Any]:
    env: Any = sub.matrix.environment or None
    if not isinstance(env, dict):
        env = next(
            (r.config.get("environment") for r in sub.runs if isinstance(r.config.get("environment"), dict)),
            None,
        )
    if isinstance(env, dict):
        pk = env.get("packages") if isinstance(env.get("packages"), dict) else {}
        return {
            "packages": {str(k): str(v) for k, v in pk.items() if v is not None},
            "git": str(env["git"]) if env.get("git") else None,
            "device": str(env["device"]) if env.get("device") else None,
            "source": "run",
        }
    # The run recorded none: the versions installed where it is submitted, as the protocol records them.
    pk = {k: v for k, v in package_versions().items() if v is not None}
    return {"packages": pk, "git": None, "device": platform.machine() or None, "source": "submit"}


def _hpo_budget(matrix: MatrixInfo, configs: list[dict[str, Any]]) -> int | None:
    """Tuning trials per (generator, regime): the matrix's protocol, else what the runs' tuning results say."""
    trials = matrix.protocol.tune.get("trials")
    if isinstance(trials, int) and not isinstance(trials, bool):
        return trials
    for c in configs:
        t = (c.get("tuning") or {}).get("trials")
        if isinstance(t, int) and not isinstance(t, bool):
            return t
    return None


# Per-run identity and machine details: the record keeps them elsewhere (environment) or not at all.
_CONFIG_DROP = ("run_id", "identity", "environment", "manifests", "seed", "regime", "generator")


def _resolved_config(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """What every run of the record shares (per-run keys such as the seed or the regime drop out)."""
    if not configs:
        return {}
    common = {k: v for k, v in configs[0].items() if k not in _CONFIG_DROP}
    for c in configs[1:]:
        common = {k: v for k, v in common.items() if k in c and c[k] == v}
    return common


def _stored_predictions(preds: pd.DataFrame, task: Task) -> pd.DataFrame:
    """The contract columns only (ids already salted), in a stable order."""
    cols = [
        "case_id",
        "patient_id",
        "site",
        "split",
        *task.subgroups.columns,
        "y_true",
        *[f"prob_{c}" for c in task.classes],
        *RUN_KEYS,
    ]
    out = preds[[c for c in cols if c in preds.columns]].copy()
    for c in ["site", "split", "y_true", "generator", "regime", "backbone", *task.subgroups.columns]:
        if c in out.columns:
            out[c] = out[c].astype(str)
    out["seed"] = out["seed"].astype("int64")
    return out.sort_values(["generator", "regime", "seed", "case_id"], kind="mergesort").reset_index(
        drop=True
    )


def keyed_predictions(sub: Submission, runs: list[Run], key: AnswerKey, salt: str) -> pd.DataFrame:
    """The runs' probabilities on the answer key's cases, carrying the key's labels, sites, splits, patients and
    subgroups. A submitted value that disagrees with the key is a problem naming the file and row."""
    raw = pd.concat([r.preds for r in runs], ignore_index=True)
    names = pd.Series(
        np.concatenate(
            [row_names(r.preds, f"{r.folder.name}/predictions.parquet ").to_numpy() for r in runs]
        ),
        index=raw.index,
    )
    salted = raw.assign(
        case_id=hash_ids(raw["case_id"].astype(str), salt),
        patient_id=hash_ids(raw["patient_id"].astype(str), salt),
    )
    problems = key.cross_check(salted, names)
    if problems:
        raise BadInput(
            f"{sub.root}: submission rejected: the predictions disagree with the leaderboard's answer key "
            "(labels, sites, splits, patients and subgroups come from the key, never from a submission)",
            problems,
        )
    try:
        joined = key.join(salted, source=f"{sub.root}: predictions")
    except BadInput as e:
        raise BadInput(f"{sub.root}: submission rejected: {e.args[0]}", e.problems) from None
    return _stored_predictions(joined, sub.task)


def build_records(
    sub: Submission,
    cfg: LeaderboardConfig,
    *,
    submitter: str,
    contact: str | None = None,
    key: AnswerKey | None = None,
) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Score every generator of the submission (and the real-only reference) against the answer key; nothing is
    written here."""
    from bench import __version__

    key = key if key is not None else load_key(cfg)

    settings = scoring_settings(cfg, sub.task)
    primary, n_boot, boot_seed = settings["primary"], settings["n_boot"], settings["seed"]
    env = _environment(sub)
    spec_sha = task_spec_sha256(sub.task)
    secrets_ = set()
    for r in sub.runs:
        secrets_ |= set(r.preds["case_id"].astype(str)) | set(r.preds["patient_id"].astype(str))

    wanted = [BASELINE, *sub.generators]
    use = [r for r in sub.runs if r.keys[0] in wanted]
    everything = keyed_predictions(sub, use, key, cfg.id_salt)
    scored = score_all(everything, sub.task, primary=primary, n_boot=n_boot, seed=boot_seed)
    out = []
    for g in wanted:
        runs = [r for r in use if r.keys[0] in (g, BASELINE)]
        stored = everything[everything["generator"].isin([g, BASELINE])].reset_index(drop=True)
        metrics, split = score_submission(
            stored, sub.task, generator=g, primary=primary, n_boot=n_boot, seed=boot_seed, scored=scored
        )
        ev = stored[stored["split"] == split]
        from bench.metrics.core import get_metric

        own = [r for r in runs if r.keys[0] == g]
        is_ref = g == BASELINE
        card = sub.cards.get(g)
        if card is not None:
            card = dict(card)
            tr = dict(card.get("training") or {})
            if (
                "patients" in tr
            ):  # hashed training patients: the audit used them; a public record needs only the count
                tr["n_patients"] = tr.get("n_patients") or len(tr["patients"])
                tr.pop("patients")
            card["training"] = tr
        submitted = hashlib.sha256(
            "".join(r.sha256 for r in sorted(runs, key=lambda r: r.keys)).encode()
        ).hexdigest()
        record = {
            "schema_version": SCHEMA_VERSION,
            "id": "",
            "created": now_iso(),
            "kind": "reference" if is_ref else "generator",
            "task": {"name": sub.task.name, "version": sub.task.version, "spec_sha256": spec_sha},
            "submitter": {"name": submitter, "contact": contact},
            "generator": {
                "name": g,
                "version": (card or {}).get("version"),
                "link": _link((card or {}).get("link")),
                "card": card,
            },
            "manifests": sub.manifests.get(
                g,
                {
                    "real": _sha_of(sub.matrix.real_manifest()),
                    "synthetic": None,
                    "generator_training": None,
                },
            ),
            "protocol": {
                "regimes": sorted({r.keys[1] for r in own}),
                "seeds": sorted({r.keys[2] for r in own}),
                "backbone": sub.backbone or own[0].keys[3],
                "config": scrub_local_paths(
                    _resolved_config([r.config for r in own]), [sub.root, Path.cwd()]
                ),
                "hpo_budget": _hpo_budget(sub.matrix, [r.config for r in own]),
                "budget": sub.matrix.protocol.budget,
            },
            "environment": env,
            "evaluation": {
                "split": split,
                "sites": sorted(ev["site"].astype(str).unique()),
                "primary_metric": primary,
                "higher_is_better": get_metric(primary, sub.task.classes).higher_is_better,
                "n_boot": n_boot,
                "bootstrap_seed": boot_seed,
                "eval_cases_sha256": eval_cases_sha256(sub.eval_ids),
                "scored_with": f"medsynbench {__version__}",
            },
            "metrics": metrics,
            "privacy": None if is_ref else sub.privacy.get(g),
            "predictions_sha256": "0" * 64,
            "predictions": {
                "file": "predictions/x.parquet",
                "n_rows": len(stored),
                "n_runs": len(runs),
                "submitted_sha256": submitted,
            },
        }
        if sub.notes:
            record["notes"] = list(sub.notes)
        fid = None if is_ref else record_fidelity(RunDir(sub.root), g)
        if fid is not None:
            record["fidelity"] = fid
        mp = record_model_privacy(RunDir(sub.root), g)
        if mp is not None:
            record["model_privacy"] = mp
        if is_ref and sub.controls:
            record["controls"] = list(sub.controls)
        record = scrub_local_paths(redact(record, secrets_), [sub.root, Path.cwd()])
        left = local_paths(record)
        if left:
            raise BadInput(f"record for {g}: local path(s) would be published", left)
        out.append((record, stored))
    return out


def _link(v: Any) -> str | None:
    return v if isinstance(v, str) and v.startswith(("http://", "https://")) else None


@contextlib.contextmanager
def board_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on the leaderboard folder itself (fcntl.flock on the directory: no lock file to commit or
    clean up, and the OS releases it if the process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _existing_submissions(cfg: LeaderboardConfig) -> dict[tuple[str, str], str]:
    out = {}
    for p in sorted(cfg.records_dir.glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            r = read_json(p)
            out[(r["generator"]["name"], r["predictions"]["submitted_sha256"])] = r["id"]
    return out


def write_records(
    cfg: LeaderboardConfig, scored: list[tuple[dict[str, Any], pd.DataFrame]]
) -> list[dict[str, Any]]:
    """Assign ids, then write predictions and records under the leaderboard lock; all or nothing."""
    written: list[Path] = []
    with board_lock(cfg.folder):
        existing = _existing_submissions(cfg)

        def key(rec: dict[str, Any]) -> tuple[str, str]:
            return rec["generator"]["name"], rec["predictions"]["submitted_sha256"]

        dups = [
            f"generator {rec['generator']['name']!r}: these predictions are already on the leaderboard as record "
            f"{existing[key(rec)]}"
            for rec, _ in scored
            if key(rec) in existing and rec["kind"] != "reference"
        ]
        if dups:
            raise BadInput(f"{cfg.folder}: duplicate submission", dups)
        # The same run's real-only reference arrives again when its generators are submitted one at a time.
        for rec, _ in scored:
            if key(rec) in existing:
                log.info(
                    "real-only reference of this run is already record %s; not added again",
                    existing[key(rec)],
                )
        scored = [(rec, st) for rec, st in scored if key(rec) not in existing]
        if not scored:
            raise BadInput(
                f"{cfg.folder}: nothing new to add: every record of this run is already on the leaderboard"
            )
        done = []
        try:
            for rec, stored in scored:
                rid = new_record_id(rec["generator"]["name"])
                while (cfg.records_dir / f"{rid}.json").exists():
                    rid = new_record_id(rec["generator"]["name"])
                pred_path = cfg.predictions_dir / f"{rid}.parquet"
                write_table(pred_path, stored, PUBLISHED_MODE)
                written.append(pred_path)
                rec = {
                    **rec,
                    "id": rid,
                    "predictions_sha256": sha256_file(pred_path),
                    "predictions": {**rec["predictions"], "file": f"predictions/{rid}.parquet"},
                }
                check_record(rec, f"record {rid}")
                done.append(rec)
            for rec in done:
                write_json(cfg.records_dir / f"{rec['id']}.json", rec, PUBLISHED_MODE)
                written.append(cfg.records_dir / f"{rec['id']}.json")
        except BaseException:
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
    return done


def submit(
    run: str | Path,
    board: str | Path,
    *,
    submitter: str,
    contact: str | None = None,
    generators: Sequence[str] | None = None,
    dry_run: bool = False,
    max_archive_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """Validate, re-score and add the records of a run folder or bundle; returns the records (ids set unless
    `dry_run`)."""
    cfg = load_config(board)
    key = load_key(cfg)
    limit = max_archive_bytes or cfg.max_archive_bytes
    with opened_run(run, limit) as root:
        sub = collect(root, cfg, generators)
        scored = build_records(sub, cfg, submitter=submitter, contact=contact, key=key)
    for rec, _ in scored:
        check_record({**rec, "id": "dry-run-00000000"}, f"record for {rec['generator']['name']}")
    if dry_run:
        return [rec for rec, _ in scored]
    done = write_records(cfg, scored)
    remember_scores(cfg, sub.task, done)
    return done
