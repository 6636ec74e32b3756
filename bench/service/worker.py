"""Workers: claim a queued submission, evaluate it against the host's hidden data, write the result once.

Several workers may run at once, on one machine (`medsynbench worker` several times) or many (Ray). A worker
renews its lease with a heartbeat; one that is killed stops renewing, its lease expires and the next worker takes
the job over. `db.finish` writes the result only while the writer holds the lease, so a job is scored once.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.generators.card import read_card, write_card
from bench.generators.importer import import_synthetic
from bench.io import write_json
from bench.labelmaps import LabelMaps, load_labelmaps
from bench.leaderboard.checks import service_exclusion
from bench.manifest import manifest_hash, read_manifest, write_manifest
from bench.privacy import audit
from bench.privacy.model import aggregate_figures
from bench.protocol import MatrixOptions, run_matrix
from bench.runfolder import RunDir, check_generator_name
from bench.service import db
from bench.service.bundle import read_labelmaps, read_predictions, unpack_bundle
from bench.service.host import Host, json_safe
from bench.service.pages import write_page
from bench.service.sandbox import LIMIT_NAMES, Limits, Outcome, run_limited
from bench.service.scoring import labelmap_limits, salt_ids, score_parts, validate_labelmaps
from bench.service.settings import ServiceSettings

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()[:30]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class _Heartbeat(threading.Thread):
    def __init__(self, host: Host, job: str, worker: str) -> None:
        super().__init__(daemon=True)
        self.host, self.job, self.worker = host, job, worker
        self.stop = threading.Event()
        self.lost = False

    def run(self) -> None:
        lease = self.host.settings.worker.lease_s
        while not self.stop.wait(max(lease / 3, 0.05)):
            try:
                if not db.heartbeat(self.host.engine, self.job, self.worker, lease):
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a database hiccup: try again at the next beat
                log.warning("heartbeat for %s failed", self.job, exc_info=True)


# -- the work ------------------------------------------------------------------------------------------------------


class HostSideError(Exception):
    """A failure in the part of a job that reads the host's data: its message is for the host's log only."""


def score_prediction_file(host: Host, path: Path, filename: str) -> dict[str, Any]:
    lim = host.settings.limits
    preds: pd.DataFrame | LabelMaps
    if host.key.is_segmentation:
        preds = read_labelmaps(path, filename, **labelmap_limits(host.key))
        problems = validate_labelmaps(host.key, preds, host.task)
        if problems:
            raise BadInput(f"{filename}: {len(problems)} problem(s) in the label maps", problems)
    else:
        preds = read_predictions(path, filename, lim.max_prediction_rows, lim.max_prediction_columns)
    return {"scores": score_parts(host.key, preds, host.task, host.spec), "spec": _spec_summary(host)}


def _spec_summary(host: Host) -> dict[str, Any]:
    """What the scores depend on (bench.leaderboard.spec), stored with every result so that it can be re-scored."""
    sp = host.spec
    return {**sp.settings(), "task": sp.record_task(), "registry": sp.registry, "scorer": sp.scorer}


def _host_train_manifest(host: Host, out: Path) -> Path:
    """The host's real training rows: what the privacy audit compares the synthetic images with."""
    m = read_manifest(host.settings.real_manifest)
    df = m.df.assign(image=[str(p) for p in m.image_paths()])
    # A segmentation task's masks are relative to the manifest's folder, like the images.
    if "mask_path" in df.columns:
        df["mask_path"] = [None if v is None else str(m.image_path(str(v))) for v in df["mask_path"]]
    keep = df["split"].astype(str) == "train"
    if "origin" in df.columns:
        keep &= df["origin"].astype(str) == "real"
    return write_manifest(df[keep].reset_index(drop=True), out)


def _privacy(host: Host, synthetic: Path, work: Path) -> dict[str, Any] | None:
    """Memorization of the host's training images; only summary numbers leave this function."""
    p = host.settings.privacy
    if not p.enabled:
        return None
    train = _host_train_manifest(host, work / "host_train.parquet")
    card_path = synthetic.with_name(synthetic.stem + ".card.yaml")
    card = read_card(card_path)
    # The team never saw the host's data, so its card cannot name it; the audit asks whether the images copy it.
    card.training.manifest_sha256 = manifest_hash(read_manifest(train).df)
    card.training.manifest = None
    card.training.patients = []
    audit_card = write_card(work / "audit.card.yaml", card)
    r = audit(
        host.task,
        synthetic,
        train,
        host.settings.real_manifest,
        work / "privacy",
        card=audit_card,
        features=tuple(p.features),
        percentile=p.percentile,
        n_boot=p.bootstrap,
        device="cpu",
        cache_dir=host.cache,
    )
    cont = r.get("contamination") or {}
    return json_safe(
        {
            "feature": r.get("feature"),
            "memorization_rate": r.get("memorization_rate"),
            "ci_low": r.get("ci_low"),
            "ci_high": r.get("ci_high"),
            "nominal_rate": r.get("nominal_rate"),
            "flagged": bool(r.get("flagged")),
            "contamination": cont.get("status", "unknown"),
            "contamination_problems": len(cont.get("problems") or []),
        }
    )


def score_synthetic_bundle(host: Host, path: Path, work: Path) -> dict[str, Any]:
    st = host.settings
    root, labels, card = unpack_bundle(path, work / "bundle", st.limits.max_unpacked_bytes)
    gen = check_generator_name(read_card(card).name, "generator card field 'name'")
    synthetic = import_synthetic(host.task, root, labels, card, work / "synthetic.parquet")
    try:
        return _evaluate_synthetic(host, synthetic, gen, work)
    except BadInput as e:
        # The team's files were accepted above: what fails from here on is about the host's data.
        raise HostSideError(str(e)) from e


def _evaluate_synthetic(host: Host, synthetic: Path, gen: str, work: Path) -> dict[str, Any]:
    st = host.settings
    pr = st.protocol
    run = work / "run"
    run_matrix(
        MatrixOptions(
            task=st.task,
            real=st.real_manifest,
            out=run,
            synthetic={gen: synthetic},
            regimes=pr.regimes,
            seeds=pr.seeds,
            backbone=pr.backbone,
            preset=pr.preset,
            epochs=pr.epochs,
            threads=pr.threads,
            device=pr.device,
            wandb="disabled",
            progress=False,
            cache_dir=host.cache,
        )
    )
    regime = pr.regimes[0]
    runs = [
        r for r in RunDir(run).finished_runs() if r.config().generator == gen and r.config().regime == regime
    ]
    if not runs:
        raise RuntimeError(f"no finished run of regime {regime!r} for generator {gen!r}")
    preds: pd.DataFrame | LabelMaps
    if host.task.is_segmentation:
        preds = seed_vote(host, [load_labelmaps(r.labelmaps) for r in runs])
    else:
        frames = pd.concat([pd.read_parquet(r.predictions) for r in runs], ignore_index=True)
        probs = [f"prob_{c}" for c in host.task.classes]
        frames = frames.assign(case_id=salt_ids(frames["case_id"], st.id_salt).to_numpy())
        frames = frames[frames["case_id"].isin(host.key.case_id_set)]
        # Several seeds: score the seed-averaged probabilities (one prediction per case, as the key expects).
        preds = frames.groupby("case_id", as_index=False)[probs].mean()
    privacy = _privacy(host, synthetic, work)
    return {
        "scores": score_parts(host.key, preds, host.task, host.spec),
        "spec": _spec_summary(host),
        "generator": gen,
        "regime": regime,
        "privacy": privacy,
        # The repository board's eligibility checks, from the one named list (bench.leaderboard.checks).
        "excluded": _exclusion(privacy, st.eligibility),
        "model_privacy": _model_privacy(host, run),
    }


def seed_vote(host: Host, runs: list[LabelMaps]) -> LabelMaps:
    """One label map per evaluation case from the runs of several seeds: each pixel's most frequent class (ties go
    to the lower class value, background first), the counterpart of averaging a classifier's probabilities.
    Ids are salted into the key's form and cases outside the key dropped."""
    size = host.key.image_size
    k = len(host.task.mask_classes) + 1
    votes: dict[str, np.ndarray] = {}
    for m in runs:
        if size is not None and tuple(m.maps.shape[1:]) != size:
            # The host's configuration, not the team's files: the key was built at another resolution.
            raise RuntimeError(
                f"the runs' label maps are {tuple(m.maps.shape[1:])} but the answer key's masks {size}: rebuild "
                "the key at the protocol's preset (`medsynbench host init --rebuild-key`)"
            )
        salted = salt_ids(m.case_ids, host.settings.id_salt).tolist()
        for cid, lab in zip(salted, m.maps, strict=True):
            if cid in host.key.case_id_set:
                v = votes.setdefault(cid, np.zeros((k, *lab.shape), np.int32))
                v += lab[None] == np.arange(k, dtype=np.uint8)[:, None, None]
    ids = sorted(votes)
    maps = (
        np.stack([votes[c].argmax(axis=0).astype(np.uint8) for c in ids])
        if ids
        else np.zeros((0, 1, 1), np.uint8)
    )
    return LabelMaps(ids, maps, k)


def _exclusion(privacy: dict[str, Any] | None, rules: Any) -> str | None:
    """The eligibility checks read a record's privacy block; the service keeps a summary of it (no problem texts:
    they name host files), so the contamination status is passed with a count of its problems."""
    if privacy is None:
        return None
    n = int(privacy.get("contamination_problems") or 0)
    rec = {
        **privacy,
        "contamination": {
            "status": privacy.get("contamination"),
            "problems": [f"{n} problem(s)"] if n else [],
        },
    }
    return service_exclusion(rec, rules)


def _model_privacy(host: Host, run: Path) -> dict[str, Any] | None:
    """Membership inference against the models trained on the host's data; only aggregate figures (per run key,
    with intervals) leave this function, never a patient, case or seed."""
    p = host.settings.privacy
    if not (p.enabled and p.model_audit):
        return None
    try:
        return json_safe(aggregate_figures(run, n_boot=p.bootstrap, cache_dir=host.cache))
    except BadInput as e:
        # The reason names host files; the team learns only that the audit could not run.
        log.warning("model privacy audit not run: %s", e)
        return {"status": "not run", "reason": "the host's data allow no membership audit of these models"}


# -- one job -------------------------------------------------------------------------------------------------------


def write_record(host: Host, sub: db.Submission, team: str, result: dict[str, Any]) -> Path:
    rec = {
        "submission": sub.id,
        "team": team,
        "kind": sub.kind,
        "created": sub.created_at,
        "scored": db.now(),
        "upload_sha256": sub.upload_sha256,
        **result,
    }
    return write_json(host.records / f"{sub.id}.json", json_safe(rec))


def _job(settings: ServiceSettings, kind: str, upload: str, filename: str, work: str) -> dict[str, Any]:
    """A job's evaluation, as the child process of `process` runs it. BadInput: the team's files are at fault;
    its message, paths shown as the team knows them, is the reason the team reads."""
    host = Host(settings)
    try:
        if kind == "predictions":
            return score_prediction_file(host, Path(upload), filename)
        try:
            return score_synthetic_bundle(host, Path(upload), Path(work))
        except BadInput as e:

            def fix(t: str) -> str:
                return host.hide_paths(t.replace(f"{work}/bundle/", f"{filename}!").replace(upload, filename))

            raise BadInput(fix(e.args[0] if e.args else ""), [fix(p) for p in e.problems]) from None
    finally:
        host.dispose()


def job_limits(settings: ServiceSettings, kind: str = "predictions") -> Limits:
    """The limits of one job. The address-space limit is left off for a synthetic job that may train on a GPU
    (protocol.device other than cpu): CUDA reserves far more address space than it ever uses."""
    w = settings.worker
    on_cpu = kind == "predictions" or (settings.protocol.device or "").startswith("cpu")
    return Limits(w.job_memory_bytes if on_cpu else None, w.job_cpu_s, w.job_file_bytes, w.job_wall_s)


OWNER_FILE = ".owner"


def clean_work(host: Host) -> int:
    """Remove work folders no running job owns (their worker was killed); returns how many were removed.

    A folder holds `.owner` (the worker that made it); it stays while that worker holds the job's lease."""
    if not host.work.is_dir():
        return 0
    removed = 0
    with host.sessions() as s:
        for d in host.work.iterdir():
            job = d.name.split("-", 1)[0]
            try:
                owner = (d / OWNER_FILE).read_text().strip()
            except OSError:
                owner = None
            sub = s.get(db.Submission, job)
            alive = (
                sub is not None
                and sub.status == db.RUNNING
                and owner is not None
                and sub.lease_owner == owner
                and (sub.lease_expires_at or 0) > db.now()
            )
            if not alive:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                removed += 1
    return removed


def _reason(host: Host, job: str, kind: str, outcome: Outcome) -> str | None:
    if outcome.kind == "bad":
        msg, problems = outcome.value
        return "\n".join([msg, *problems]) if problems else msg
    if outcome.kind == "limit":
        lim = job_limits(host.settings, kind)
        amount = {
            "memory": lim.memory_bytes and f"{lim.memory_bytes:,} bytes",
            "cpu": lim.cpu_s and f"{lim.cpu_s:,} CPU seconds",
            "file": lim.file_bytes and f"{lim.file_bytes:,} bytes per file",
            "wall": lim.wall_s and f"{lim.wall_s:g} s",
        }.get(outcome.value)
        shown = f" ({amount})" if amount else ""
        return f"stopped: the evaluation went past {LIMIT_NAMES.get(outcome.value, outcome.value)}{shown}"
    if outcome.kind == "error":
        log.error("submission %s: evaluation failed\n%s", job, outcome.value)
        return f"the evaluation failed on the host's side (submission {job}); the host has the details"
    return None


def process(host: Host, job: str, worker: str) -> str:
    """Run one claimed job to its end; returns the status written (or 'lost' when the lease was taken over)."""
    beat = _Heartbeat(host, job, worker)
    beat.start()
    work = host.work / f"{job}-{uuid.uuid4().hex[:8]}"
    status = "lost"
    try:
        if host.settings.worker.hold_s:
            time.sleep(host.settings.worker.hold_s)
        with host.sessions() as s:
            sub = s.get(db.Submission, job)
            assert sub is not None
            team = s.get(db.Team, sub.team_id)
            team_name = team.name if team else "?"
        work.mkdir(mode=0o700, parents=True, exist_ok=True)
        (work / OWNER_FILE).write_text(worker)
        outcome = run_limited(
            _job,
            (host.settings, sub.kind, sub.upload_path, sub.filename, str(work)),
            job_limits(host.settings, sub.kind),
            should_stop=lambda: beat.lost,
        )
        if outcome.kind == "stopped":
            log.warning("submission %s: lease lost to another worker; job stopped", job)
            return status
        if outcome.kind != "ok":
            reason = _reason(host, job, sub.kind, outcome)
            if db.finish(host.engine, job, worker, scores=None, summary=None, reason=reason):
                status = db.FAILED
            return status
        result = outcome.value
        summary = {k: v for k, v in result.items() if k != "scores"}
        if beat.lost or not db.finish(host.engine, job, worker, scores=result["scores"], summary=summary):
            log.warning("submission %s: lease lost to another worker; result dropped", job)
            return status
        status = db.SCORED
        write_record(host, sub, team_name, result)
        write_page(host)
        return status
    finally:
        beat.stop.set()
        shutil.rmtree(work, ignore_errors=True)


def run_worker(
    host: Host, *, once: bool = False, max_jobs: int | None = None, idle_exit: bool = False
) -> int:
    """Take jobs until stopped: `once` processes at most one; `idle_exit` stops when the queue is empty."""
    wid = worker_id()
    w = host.settings.worker
    done = 0
    if n := clean_work(host):
        log.info("worker %s: removed %d abandoned work folder(s)", wid, n)
    while True:
        job = db.claim(host.engine, wid, w.lease_s, w.max_attempts)
        if job is None:
            if once or idle_exit:
                return done
            time.sleep(w.poll_s)
            continue
        log.info("worker %s: submission %s", wid, job)
        status = process(host, job, wid)
        if status != db.SCORED:
            clean_work(host)
        log.info("worker %s: submission %s %s", wid, job, status)
        done += 1
        if once or (max_jobs is not None and done >= max_jobs):
            return done


def run_on_ray(config: str | Path, workers: int, address: str | None, *, idle_exit: bool = False) -> int:
    """Start `workers` worker loops as Ray tasks (one per CPU they ask for), wait for them and return the number
    of submissions they processed. Each loop claims jobs through the database like any other worker, so Ray only
    places the loops; `idle_exit` ends each loop when the queue is empty."""
    import ray  # the optional `ray` extra; only this entry point needs it

    ray.init(address=address, ignore_reinit_error=True)

    @ray.remote(num_cpus=1)
    def loop(path: str, drain: bool) -> int:
        host = Host.from_file(path)
        try:
            return run_worker(host, idle_exit=drain)
        finally:
            host.dispose()

    path = str(Path(config).resolve())
    return int(sum(ray.get([loop.remote(path, idle_exit) for _ in range(workers)])))
