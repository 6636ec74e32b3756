"""The web API and the page (FastAPI). `create_app(settings)` builds it; `medsynbench serve` runs it with uvicorn.

Teams authenticate with `Authorization: Bearer <token>` (`bench.service.gate` checks it, and the size of an upload,
before the body is read). What a response may hold: the caller's own submissions
(status, the reason of a failure, the score on the visible part of the evaluation cases) and the leaderboard (team
names and aggregate scores). Never the real data: no images, labels, case or patient ids, host paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import select

from bench.errors import BadInput
from bench.service import db
from bench.service.bundle import check_bundle, check_filename, read_labelmaps, read_predictions, rename
from bench.service.gate import Gate
from bench.service.host import Host
from bench.service.pages import leaderboard, render_page
from bench.service.scoring import labelmap_limits, validate_labelmaps, validate_predictions
from bench.service.settings import ServiceSettings

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


class ScoreOut(BaseModel):
    part: str
    metric: str
    higher_is_better: bool
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n_cases: int


class SubmissionOut(BaseModel):
    id: str
    team: str
    kind: str
    filename: str
    status: Literal["queued", "running", "scored", "failed"]
    reason: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    score: ScoreOut | None
    details: dict[str, Any] | None


class TeamOut(BaseModel):
    team: str
    quota_submissions: int
    quota_period_s: float
    used_in_period: int


class BoardRow(BaseModel):
    rank: int
    team: str
    submission: str
    kind: str
    value: float
    ci_low: float | None
    ci_high: float | None
    n_cases: int


class BoardOut(BaseModel):
    title: str
    phase: str | None
    phase_open: bool
    part: str
    metric: str
    higher_is_better: bool
    rows: list[BoardRow]


class Problem(BaseModel):
    detail: str
    problems: list[str] = []


_bearer = HTTPBearer(auto_error=False, description="the team's API token (`medsynbench host token add`)")


def current_team(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> db.Team:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(
            401, "missing API token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"}
        )
    host: Host = request.app.state.host
    with host.sessions() as s:
        t = db.team_for_token(s, creds.credentials)
    if t is None:
        raise HTTPException(401, "unknown or revoked API token", {"WWW-Authenticate": "Bearer"})
    return t


Team = Annotated[db.Team, Depends(current_team)]


def create_app(settings: ServiceSettings, host: Host | None = None) -> FastAPI:
    host = host or Host(settings)
    host.init()
    app = FastAPI(
        title="medsynbench hosted evaluation",
        version="1",
        description="Submit synthetic data or predictions; the host scores them on data that never leaves it.",
    )
    app.state.host = host
    app.add_middleware(Gate, host=host)
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": Problem},
        401: {"model": Problem},
        429: {"model": Problem},
    }

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, exc: BadInput) -> JSONResponse:
        # Host paths only: hiding the ids the host holds would tell a team which of its guesses are real.
        return JSONResponse(
            {
                "detail": host.hide_paths(exc.args[0] if exc.args else ""),
                "problems": [host.hide_paths(p) for p in exc.problems],
            },
            status_code=400,
        )

    def out(s: Any, sub: db.Submission, team_name: str) -> SubmissionOut:
        part, _ = db.visible_part(s)
        sc = s.execute(
            select(db.Score).where(db.Score.submission_id == sub.id, db.Score.part == part)
        ).scalar_one_or_none()
        return SubmissionOut(
            id=sub.id,
            team=team_name,
            kind=sub.kind,
            filename=sub.filename,
            status=sub.status,  # type: ignore[arg-type]
            reason=sub.reason,
            created_at=sub.created_at,
            started_at=sub.started_at,
            finished_at=sub.finished_at,
            attempts=sub.attempts,
            score=None
            if sc is None
            else ScoreOut(
                part=part,
                metric=sc.metric,
                higher_is_better=sc.higher_is_better,
                value=sc.value,
                ci_low=sc.ci_low,
                ci_high=sc.ci_high,
                n_cases=sc.n_cases,
            ),
            details=sub.summary,
        )

    def check_open(phase: db.Phase | None) -> None:
        if phase is not None and phase.closed_at is not None:
            raise HTTPException(403, f"phase {phase.name!r} is closed: no submissions are accepted")

    def check_quota(s: Any, team_id: int) -> None:
        lim = host.settings.limits
        n, oldest = db.recent_submissions(s, team_id, db.now() - lim.quota_period_s)
        if n >= lim.quota_submissions:
            wait = max(1, math.ceil((oldest or db.now()) + lim.quota_period_s - db.now()))
            raise HTTPException(
                429,
                f"quota reached: {lim.quota_submissions} submissions per {lim.quota_period_s:g} s; try again in {wait} s",
                {"Retry-After": str(wait)},
            )

    @app.get("/api/health")
    def health() -> dict[str, str]:
        db.ping(host.engine)
        return {"status": "ok"}

    @app.get("/api/me", responses=errors)
    def me(t: Team) -> TeamOut:
        lim = host.settings.limits
        with host.sessions() as s:
            n, _ = db.recent_submissions(s, t.id, db.now() - lim.quota_period_s)
        return TeamOut(
            team=t.name,
            quota_submissions=lim.quota_submissions,
            quota_period_s=lim.quota_period_s,
            used_in_period=n,
        )

    @app.post(
        "/api/submissions",
        status_code=202,
        responses={**errors, 403: {"model": Problem}, 413: {"model": Problem}},
    )
    def submit(
        t: Team,
        kind: Annotated[Literal["synthetic", "predictions"], Form()],
        file: Annotated[
            UploadFile,
            File(
                description="synthetic bundle (.zip/.tar.gz) or predictions (.csv/.parquet; a segmentation "
                "board: label maps .npz)"
            ),
        ],
    ) -> SubmissionOut:
        lim = host.settings.limits
        filename = Path(file.filename or "").name
        if not filename:
            raise BadInput("field 'file': the upload has no file name")
        seg = host.task.is_segmentation
        check_filename(kind, filename, segmentation=seg)
        with host.sessions() as s:
            check_open(db.last_phase(s))
            # Refuses early, before the upload is read; the count that decides is taken again below, under the lock.
            check_quota(s, t.id)
        sid = uuid.uuid4().hex
        ext = ".tar.gz" if filename.lower().endswith(".tar.gz") else Path(filename).suffix.lower()
        dest = host.uploads / f"{sid}{ext}"
        part_file = dest.with_name(f".part-{dest.name}")  # keeps the suffix the checks read
        h, size = hashlib.sha256(), 0
        recorded = False
        try:
            with os.fdopen(os.open(part_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                while block := file.file.read(_CHUNK):
                    size += len(block)
                    if size > lim.max_upload_bytes:
                        raise HTTPException(
                            413, f"{filename}: larger than the limit of {lim.max_upload_bytes:,} bytes"
                        )
                    h.update(block)
                    f.write(block)
            if size == 0:
                raise BadInput(f"{filename}: empty file")
            try:
                if kind == "predictions" and seg:
                    maps = read_labelmaps(part_file, filename, **labelmap_limits(host.key))
                    problems = validate_labelmaps(host.key, maps, host.task)
                    if problems:
                        raise BadInput(f"{filename}: {len(problems)} problem(s) in the label maps", problems)
                elif kind == "predictions":
                    table = read_predictions(
                        part_file, filename, lim.max_prediction_rows, lim.max_prediction_columns
                    )
                    problems = validate_predictions(host.key, table, host.task)
                    if problems:
                        raise BadInput(f"{filename}: {len(problems)} problem(s) in the predictions", problems)
                else:
                    check_bundle(part_file, filename, lim.max_unpacked_bytes, lim.max_bundle_members)
            except BadInput as e:
                raise rename(e, part_file, filename) from None
            with host.sessions() as s, s.begin():
                db.lock_team(s, t.id)
                check_quota(s, t.id)
                # The phase may have closed while the file was read and checked: what decides is its state now.
                phase = db.last_phase(s, lock=True)
                check_open(phase)
                # Before the commit: a worker may claim the job as soon as the row is visible.
                part_file.replace(dest)
                sub = db.Submission(
                    id=sid,
                    team_id=t.id,
                    phase_id=phase.id if phase else None,
                    kind=kind,
                    filename=filename,
                    upload_path=str(dest),
                    upload_sha256=h.hexdigest(),
                    size_bytes=size,
                    status=db.QUEUED,
                    created_at=db.now(),
                    attempts=0,
                )
                s.add(sub)
            recorded = True
            with host.sessions() as s:
                return out(s, sub, t.name)
        except BaseException:
            with contextlib.suppress(OSError):
                part_file.unlink()
            if not recorded:
                with contextlib.suppress(OSError):
                    dest.unlink()
            raise

    @app.get("/api/submissions", responses=errors)
    def my_submissions(t: Team) -> list[SubmissionOut]:
        with host.sessions() as s:
            subs = s.execute(
                select(db.Submission).where(db.Submission.team_id == t.id).order_by(db.Submission.created_at)
            ).scalars()
            return [out(s, sub, t.name) for sub in subs]

    @app.get("/api/submissions/{submission_id}", responses={**errors, 404: {"model": Problem}})
    def my_submission(submission_id: str, t: Team) -> SubmissionOut:
        with host.sessions() as s:
            sub = s.get(db.Submission, submission_id)
            if sub is None or sub.team_id != t.id:
                raise HTTPException(404, "no such submission of your team")
            return out(s, sub, t.name)

    @app.get("/api/leaderboard")
    def board() -> BoardOut:
        b = leaderboard(host)
        return BoardOut(**{k: v for k, v in b.items() if k != "task"})

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(render_page(leaderboard(host)))

    return app
