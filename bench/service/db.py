"""The service's database (SQLAlchemy 2): teams, hashed API tokens, phases, submissions (the job queue) and scores.

Times are UNIX seconds (floats): the same on SQLite and PostgreSQL, no time-zone surprises.

The queue: a worker claims a job by taking a lease (`lease_owner`, `lease_expires_at`) and renews it with a
heartbeat while it works. A job whose lease expired (its worker was killed) is claimed again by the next worker.
The result is written only if the writer still holds the lease, in the same transaction that stores the scores, and
scores are unique per (submission, part): a job is scored once however often it is retried.

A team's quota is counted and its submission inserted in one transaction that holds the team (`lock_team`):
simultaneous uploads of one team are recorded one after the other, each counting those before it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

QUEUED, RUNNING, SCORED, FAILED = "queued", "running", "scored", "failed"
STATUSES = (QUEUED, RUNNING, SCORED, FAILED)
TOKEN_PREFIX = "msb_"


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Phase(Base):
    __tablename__ = "phases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    opened_at: Mapped[float] = mapped_column(Float)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Submission(Base):
    __tablename__ = "submissions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    phase_id: Mapped[int | None] = mapped_column(ForeignKey("phases.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    upload_path: Mapped[str] = mapped_column(Text)
    upload_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True, default=QUEUED)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Score(Base):
    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("submission_id", "part", name="one_score_per_part"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[str] = mapped_column(ForeignKey("submissions.id"), index=True)
    part: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(64))
    higher_is_better: Mapped[bool] = mapped_column(default=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_cases: Mapped[int] = mapped_column(Integer)
    n_patients: Mapped[int] = mapped_column(Integer)


# -- engine --------------------------------------------------------------------------------------------------------


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # noqa: ANN001 - DB-API connection
            # WAL: readers do not block the writer; several worker processes share one file.
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def init_db(engine: Engine) -> None:
    Base.metadata.create_all(engine)


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def now() -> float:
    return time.time()


# -- teams and tokens ------------------------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_team(s: Session, name: str) -> Team:
    team = Team(name=name, created_at=now())
    s.add(team)
    s.flush()
    return team


def issue_token(s: Session, team: Team) -> str:
    """A new API token for `team`; only its SHA-256 and first characters are stored, so it is shown once."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    s.add(Token(team_id=team.id, prefix=token[:12], sha256=hash_token(token), created_at=now()))
    s.flush()
    return token


def team_for_token(s: Session, token: str) -> Team | None:
    row = s.execute(
        select(Team)
        .join(Token, Token.team_id == Team.id)
        .where(Token.sha256 == hash_token(token), Token.revoked_at.is_(None))
    ).scalar_one_or_none()
    return row


def revoke_tokens(s: Session, prefix: str) -> int:
    res = s.execute(
        update(Token).where(Token.prefix == prefix, Token.revoked_at.is_(None)).values(revoked_at=now())
    )
    return int(res.rowcount or 0)


# -- phases ----------------------------------------------------------------------------------------------------------


def open_phase(s: Session) -> Phase | None:
    return s.execute(
        select(Phase).where(Phase.closed_at.is_(None)).order_by(Phase.id.desc()).limit(1)
    ).scalar_one_or_none()


def last_phase(s: Session, lock: bool = False) -> Phase | None:
    """The last phase. With `lock`, held until `s`'s transaction ends: a `host phase-close` waits for an upload
    being recorded, or the upload sees the phase closed. (On SQLite the team lock's write lock already orders the
    two.)"""
    q = select(Phase).order_by(Phase.id.desc()).limit(1)
    if lock and s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update()
    return s.execute(q).scalar_one_or_none()


def visible_part(s: Session) -> tuple[str, Phase | None]:
    """`public` while a phase is open (or none was ever opened); `private` once the last phase has closed."""
    ph = last_phase(s)
    if ph is None or ph.closed_at is None:
        return "public", ph
    return "private", ph


# -- quota -----------------------------------------------------------------------------------------------------------


def recent_submissions(s: Session, team_id: int, since: float) -> tuple[int, float | None]:
    """How many submissions the team made since `since`, and the oldest of them."""
    n, oldest = s.execute(
        select(func.count(Submission.id), func.min(Submission.created_at)).where(
            Submission.team_id == team_id, Submission.created_at >= since
        )
    ).one()
    return int(n), oldest


def lock_team(s: Session, team_id: int) -> None:
    """Hold the team until `s`'s transaction ends, so that its quota count and the insert that follows are one step.

    Call it first in the transaction: a concurrent upload of the same team waits here until this one commits, and
    then counts it.
    """
    if s.get_bind().dialect.name == "postgresql":
        # Under READ COMMITTED the count after the lock is a new snapshot: it sees the upload that held the lock.
        s.execute(select(Team.id).where(Team.id == team_id).with_for_update())
        return
    # SQLite has no row locks, and a transaction that reads first takes the write lock only at its first write,
    # after its count. A write to the team row takes the database's write lock now, before the count.
    s.execute(update(Team).where(Team.id == team_id).values(name=Team.name))


# -- the queue -------------------------------------------------------------------------------------------------------


def _claimable(t: float):  # noqa: ANN202 - a SQL expression
    return or_(
        Submission.status == QUEUED,
        (Submission.status == RUNNING) & (Submission.lease_expires_at < t),
    )


def fail_exhausted(s: Session, max_attempts: int) -> int:
    """Jobs whose workers died `max_attempts` times are failed rather than retried forever."""
    t = now()
    res = s.execute(
        update(Submission)
        .where(
            Submission.status == RUNNING,
            Submission.lease_expires_at < t,
            Submission.attempts >= max_attempts,
        )
        .values(
            status=FAILED,
            finished_at=t,
            lease_owner=None,
            reason=f"the evaluation stopped {max_attempts} times without finishing; the host has been notified",
        )
    )
    return int(res.rowcount or 0)


def claim(engine: Engine, worker: str, lease_s: float, max_attempts: int) -> str | None:
    """Take the oldest claimable job (queued, or running with an expired lease); None when there is none."""
    with Session(engine) as s, s.begin():
        fail_exhausted(s, max_attempts)
    t = now()
    values = dict(
        status=RUNNING,
        lease_owner=worker,
        lease_expires_at=t + lease_s,
        heartbeat_at=t,
        started_at=t,
        attempts=Submission.attempts + 1,
        reason=None,
    )
    with Session(engine) as s, s.begin():
        if engine.dialect.name == "postgresql":
            # Row locks: concurrent workers skip each other's candidate instead of waiting on it.
            job = s.execute(
                select(Submission.id)
                .where(_claimable(t))
                .order_by(Submission.created_at, Submission.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if job is None:
                return None
            s.execute(update(Submission).where(Submission.id == job).values(**values))
            return job
        # SQLite has one writer at a time: a single UPDATE ... RETURNING is atomic across processes.
        sub = (
            select(Submission.id)
            .where(_claimable(t))
            .order_by(Submission.created_at, Submission.id)
            .limit(1)
            .scalar_subquery()
        )
        row = s.execute(
            update(Submission)
            .where(Submission.id == sub, _claimable(t))
            .values(**values)
            .returning(Submission.id)
        ).first()
        return row[0] if row else None


def heartbeat(engine: Engine, job: str, worker: str, lease_s: float) -> bool:
    """Renew the lease; False when another worker has taken the job over."""
    t = now()
    with Session(engine) as s, s.begin():
        res = s.execute(
            update(Submission)
            .where(Submission.id == job, Submission.lease_owner == worker, Submission.status == RUNNING)
            .values(heartbeat_at=t, lease_expires_at=t + lease_s)
        )
        return bool(res.rowcount)


def finish(
    engine: Engine,
    job: str,
    worker: str,
    *,
    scores: dict[str, dict[str, Any]] | None,
    summary: dict[str, Any] | None,
    reason: str | None = None,
) -> bool:
    """Write the outcome if `worker` still holds the lease: scored with its scores, or failed with `reason`.

    Returns False (nothing written) when the lease was lost: the job is someone else's now.
    """
    t = now()
    with Session(engine) as s, s.begin():
        res = s.execute(
            update(Submission)
            .where(Submission.id == job, Submission.lease_owner == worker, Submission.status == RUNNING)
            .values(
                status=SCORED if scores is not None else FAILED,
                reason=reason,
                finished_at=t,
                lease_owner=None,
                lease_expires_at=None,
                summary=summary,
            )
        )
        if not res.rowcount:
            return False
        if scores is not None:
            existing = set(s.execute(select(Score.part).where(Score.submission_id == job)).scalars())
            for part, sc in scores.items():
                if part in existing:
                    continue
                s.add(Score(submission_id=job, part=part, **sc))
        return True


def ping(engine: Engine) -> None:
    with engine.connect() as c:
        c.execute(text("SELECT 1"))
