"""`medsynbench submit`: validate a run, re-score it from its predictions, add one record per generator.

Nothing is written until every check has passed and every record is scored and schema-valid. Files land by atomic
rename, predictions before the record that points at them, under an exclusive lock on the leaderboard folder, so two
submits at the same time both land and a reader never sees a record without its predictions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import __version__
from bench.errors import BadInput
from bench.io import read_json, sha256_file, write_json, write_table
from bench.labelmaps import LabelMaps, save_labelmaps
from bench.leaderboard.archive import opened_run
from bench.leaderboard.checks import cacheable_checks, collect
from bench.leaderboard.collect import (
    Run,
    Submission,
    _sha_of,
    eval_cases_sha256,
    reference_controls,
)
from bench.leaderboard.config import LeaderboardConfig, answer_key_digest, load_config, load_key
from bench.leaderboard.fidelity import record_fidelity
from bench.leaderboard.key import AnswerKey, hash_ids, row_names, stored_table
from bench.leaderboard.model_privacy import record_model_privacy
from bench.leaderboard.rank import prime_replicates
from bench.leaderboard.record import (
    PUBLISHED_MODE,
    SCHEMA_VERSION,
    check_record,
    local_paths,
    new_record_id,
    now_iso,
    redact,
    remember_valid,
    scrub_local_paths,
)
from bench.leaderboard.score import metric_classes, score_all, score_submission
from bench.leaderboard.segboard import MAPS_SUFFIX, record_maps, recount_submission
from bench.leaderboard.spec import (
    ScoringSpec,
    remember_scores,
    task_spec_sha256,
)
from bench.metrics.core import get_metric
from bench.protocol.plan import package_versions
from bench.runfolder import (
    BASELINE,
    MatrixInfo,
    RunDir,
)
from bench.tasks import Task

log = logging.getLogger(__name__)

__all__ = ["collect", "eval_cases_sha256", "reference_controls", "submit", "task_spec_sha256"]


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
    return stored_table(preds, task.subgroups.columns, [f"prob_{c}" for c in task.classes])


def keyed_predictions(sub: Submission, runs: list[Run], key: AnswerKey, salt: str) -> pd.DataFrame:
    """The runs' probabilities on the answer key's cases, carrying the key's labels, sites, splits, patients and
    subgroups. A submitted value that disagrees with the key is a problem naming the file and row."""
    raw = pd.concat([r.preds for r in runs], ignore_index=True)
    names = pd.Series(
        np.concatenate([row_names(r.preds, f"{r.folder.name}/{r.file} ").to_numpy() for r in runs]),
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
    if sub.task.is_segmentation:
        return _stored_predictions(_join_per_run(sub, runs, key, salted), sub.task)
    try:
        joined = key.join(salted, source=f"{sub.root}: predictions")
    except BadInput as e:
        raise BadInput(f"{sub.root}: submission rejected: {e.args[0]}", e.problems) from None
    return _stored_predictions(joined, sub.task)


def _join_per_run(sub: Submission, runs: list[Run], key: AnswerKey, salted: pd.DataFrame) -> pd.DataFrame:
    """`key.join` run by run, so that a missing, repeated or unknown case names the run's own file (a segmentation
    submission's count tables; each run holds one run key, checked when it was read)."""
    frames, problems = [], []
    start = 0
    for r in runs:
        rows = salted.iloc[start : start + len(r.preds)]
        start += len(r.preds)
        try:
            frames.append(key.join(rows, source=str(r.folder / r.file)))
        except BadInput as e:
            problems += [e.args[0], *e.problems]
    if problems:
        raise BadInput(f"{sub.root}: submission rejected: the runs do not cover the answer key", problems)
    return pd.concat(frames, ignore_index=True)


# A record ready to write: the record, its stored predictions (a segmentation record: its recounted count table) and,
# for a segmentation record, the salted label maps the counts were recounted from.
Scored = tuple[dict[str, Any], pd.DataFrame, LabelMaps | None]


def build_records(
    sub: Submission,
    cfg: LeaderboardConfig,
    *,
    submitter: str,
    contact: str | None = None,
    key: AnswerKey | None = None,
) -> list[Scored]:
    """Score every generator of the submission (and the real-only reference) against the answer key; nothing is
    written here. A segmentation submission is scored from its label maps recounted against the key's masks."""
    key = key if key is not None else load_key(cfg)

    spec = ScoringSpec.for_board(cfg, sub.task)
    primary, n_boot, boot_seed = spec.primary, spec.n_boot, spec.seed
    env = _environment(sub)
    secrets_ = set()
    for r in sub.runs:
        secrets_ |= set(r.preds["case_id"].astype(str)) | set(r.preds["patient_id"].astype(str))

    wanted = [BASELINE, *sub.generators]
    use = [r for r in sub.runs if r.keys[0] in wanted]
    everything = keyed_predictions(sub, use, key, cfg.id_salt)
    run_maps = None
    if sub.task.is_segmentation:
        try:
            everything, run_maps = recount_submission(everything, use, key, cfg.id_salt, sub.task)
        except BadInput as e:
            raise BadInput(f"{sub.root}: submission rejected: {e.args[0]}", e.problems) from None
    scored = score_all(everything, sub.task, primary=primary, n_boot=n_boot, seed=boot_seed)
    out = []
    for g in wanted:
        runs = [r for r in use if r.keys[0] in (g, BASELINE)]
        stored = everything[everything["generator"].isin([g, BASELINE])].reset_index(drop=True)
        metrics, split = score_submission(
            stored, sub.task, generator=g, primary=primary, n_boot=n_boot, seed=boot_seed, scored=scored
        )
        ev = stored[stored["split"] == split]

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
            "task": spec.record_task(),
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
                "higher_is_better": get_metric(primary, metric_classes(sub.task)).higher_is_better,
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
        out.append((record, stored, None if run_maps is None else record_maps(stored, run_maps)))
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


def write_records(cfg: LeaderboardConfig, scored: list[Scored]) -> list[dict[str, Any]]:
    """Assign ids, then write predictions and records under the leaderboard lock; all or nothing."""
    written: list[Path] = []
    with board_lock(cfg.folder):
        existing = _existing_submissions(cfg)

        def key(rec: dict[str, Any]) -> tuple[str, str]:
            return rec["generator"]["name"], rec["predictions"]["submitted_sha256"]

        dups = [
            f"generator {rec['generator']['name']!r}: these predictions are already on the leaderboard as record "
            f"{existing[key(rec)]}"
            for rec, _, _ in scored
            if key(rec) in existing and rec["kind"] != "reference"
        ]
        if dups:
            raise BadInput(f"{cfg.folder}: duplicate submission", dups)
        # The same run's real-only reference arrives again when its generators are submitted one at a time.
        for rec, _, _ in scored:
            if key(rec) in existing:
                log.info(
                    "real-only reference of this run is already record %s; not added again",
                    existing[key(rec)],
                )
        scored = [s for s in scored if key(s[0]) not in existing]
        if not scored:
            raise BadInput(
                f"{cfg.folder}: nothing new to add: every record of this run is already on the leaderboard"
            )
        done = []
        try:
            for rec, stored, maps in scored:
                rid = new_record_id(rec["generator"]["name"])
                while (cfg.records_dir / f"{rid}.json").exists():
                    rid = new_record_id(rec["generator"]["name"])
                pred_path = cfg.predictions_dir / f"{rid}.parquet"
                write_table(pred_path, stored, PUBLISHED_MODE)
                written.append(pred_path)
                info = {**rec["predictions"], "file": f"predictions/{rid}.parquet"}
                if maps is not None:
                    maps_path = cfg.predictions_dir / f"{rid}{MAPS_SUFFIX}"
                    save_labelmaps(
                        maps_path, maps.case_ids, maps.maps, num_classes=maps.num_classes, mode=PUBLISHED_MODE
                    )
                    written.append(maps_path)
                    info["labelmaps"] = {
                        "file": f"predictions/{rid}{MAPS_SUFFIX}",
                        "sha256": sha256_file(maps_path),
                    }
                rec = {
                    **rec,
                    "id": rid,
                    "predictions_sha256": sha256_file(pred_path),
                    "predictions": info,
                }
                check_record(rec, f"record {rid}")
                done.append(rec)
            for rec in done:
                write_json(cfg.records_dir / f"{rec['id']}.json", rec, PUBLISHED_MODE)
                written.append(cfg.records_dir / f"{rec['id']}.json")
            remember_valid(p for p in written if p.suffix == ".json")
        except BaseException:
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
    return done


def _read_back(path: Path) -> pd.DataFrame | None:
    """A written predictions file as build will read it (None: unreadable; the build will say so)."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError):
        return None


def _is_joined(key: AnswerKey, stored: pd.DataFrame) -> bool:
    """Whether stored predictions equal their join to the key (only a cache hint: the records are already written,
    so any failure here just means the next build joins it)."""
    try:
        return key.join(stored).equals(stored)
    except (BadInput, ValueError):
        return False


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
    for rec, _, _ in scored:
        check_record({**rec, "id": "dry-run-00000000"}, f"record for {rec['generator']['name']}")
    if dry_run:
        return [rec for rec, _, _ in scored]
    done = write_records(cfg, scored)
    assert cfg.answer_key is not None
    # What build will read back: a stored file equal to its join to the key lets the next build skip the join.
    tables = {rec["id"]: _read_back(cfg.folder / rec["predictions"]["file"]) for rec in done}
    joined = {rid for rid, t in tables.items() if t is not None and _is_joined(key, t)}
    remember_scores(
        ScoringSpec.for_board(cfg, sub.task),
        answer_key_digest(cfg),
        done,
        # The records hold the key's own labels and only their generator and the reference, by construction.
        passed=cacheable_checks(),
        stored_is_joined=joined,
    )
    positive = sub.task.labels.binary_view.positive if sub.task.labels.binary_view else None
    for rec in done:
        if rec["id"] in joined:  # build ranks the joined table; a stored one that is its join is that table
            prime_replicates(
                tables[rec["id"]],  # type: ignore[arg-type]
                rec,
                list(sub.task.classes),
                n_boot=cfg.bootstrap.n,
                seed=cfg.bootstrap.seed,
                binary_positive=list(positive) if positive else None,
                mask_classes=sub.task.mask_classes if sub.task.is_segmentation else None,
            )
    return done
