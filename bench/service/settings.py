"""The service's configuration file (`service.yaml`): where its database, storage and the host's real data live.

Relative paths are read against the folder holding the file, so a service folder can be moved as a whole.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from pydantic import Field

from bench.leaderboard.config import Eligibility
from bench.leaderboard.key import masks_path
from bench.schema import Strict, load_yaml_model

log = logging.getLogger(__name__)


class ProtocolSettings(Strict):
    """How a synthetic submission is trained and evaluated on the host's real data."""

    regimes: list[str] = Field(default_factory=lambda: ["synthetic"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    backbone: str | None = None
    preset: str | None = None
    epochs: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    device: str | None = None


class PrivacySettings(Strict):
    enabled: bool = True
    features: list[str] = Field(default_factory=lambda: ["pixel"], min_length=1)
    bootstrap: int = Field(200, ge=10)
    percentile: float = Field(5.0, gt=0, lt=50)
    # Membership inference against the models the protocol trained on the host's data (docs/PRIVACY.md).
    model_audit: bool = True


class Limits(Strict):
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1)
    max_unpacked_bytes: int = Field(1024 * 1024 * 1024, ge=1)
    quota_submissions: int = Field(5, ge=1, description="submissions per team per quota period")
    quota_period_s: float = Field(86400.0, gt=0)
    max_bundle_members: int = Field(50_000, ge=1, description="files and folders in one bundle")
    max_prediction_rows: int = Field(1_000_000, ge=1)
    max_prediction_columns: int = Field(200, ge=2)
    body_timeout_s: float = Field(
        30.0, gt=0, description="an upload that sends nothing for this long is cut off"
    )


class WorkerSettings(Strict):
    lease_s: float = Field(
        120.0, gt=0, description="a job whose worker sent no heartbeat for this long is retried"
    )
    max_attempts: int = Field(3, ge=1)
    poll_s: float = Field(1.0, gt=0)
    # Each job runs in a child process under these limits (None: no limit); one past a limit is failed, naming it.
    # The memory limit is on address space (RLIMIT_AS); it is not applied to synthetic jobs whose protocol.device
    # is not cpu (CUDA reserves far more address space than it uses).
    job_memory_bytes: int | None = Field(16 * 1024**3, ge=64 * 1024**2)
    job_cpu_s: int | None = Field(6 * 3600, ge=1, description="CPU seconds of one job, all its threads")
    job_file_bytes: int | None = Field(8 * 1024**3, ge=1024**2, description="largest file a job may write")
    job_wall_s: float | None = Field(12 * 3600.0, gt=0)
    # Testing aid: a worker sleeps this long after claiming a job (so a test can kill it mid-job).
    hold_s: float = Field(0.0, ge=0)


class ScoringSettings(Strict):
    n_boot: int = Field(500, ge=10)
    seed: int = 0


class ServiceSettings(Strict):
    title: str = "medsynbench hosted leaderboard"
    database: str = Field(
        "sqlite:///service.db", description="SQLAlchemy URL; sqlite:///FILE or postgresql://..."
    )
    storage: Path = Path("storage")
    task: str
    real_manifest: Path
    answer_key: Path = Path("answer_key.parquet")
    # A segmentation task's truth label maps (host-only, like the key); default: beside the key,
    # `answer_key.masks.npz` (bench.leaderboard.key.masks_path).
    answer_key_masks: Path | None = None
    id_salt: str = Field(min_length=8)
    private_fraction: float = Field(0.5, gt=0, lt=1)
    protocol: ProtocolSettings = ProtocolSettings()
    privacy: PrivacySettings = PrivacySettings()
    limits: Limits = Limits()
    worker: WorkerSettings = WorkerSettings()
    scoring: ScoringSettings = ScoringSettings()
    # Which generators are ranked: the repository board's rule (`leaderboard.yaml` `eligibility`), run by the same
    # named checks (bench.leaderboard.checks).
    eligibility: Eligibility = Eligibility()

    def resolved(self, base: Path) -> ServiceSettings:
        """Paths (and a relative SQLite file) read against `base`."""

        def fix(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        db = self.database
        prefix = "sqlite:///"
        if db.startswith(prefix) and not db.startswith(prefix + "/") and db != "sqlite:///:memory:":
            db = prefix + str(fix(Path(db[len(prefix) :])))
        task = self.task
        if task.endswith((".yaml", ".yml")) or "/" in task:
            task = str(fix(Path(task)))
        return self.model_copy(
            update={
                "database": db,
                "storage": fix(self.storage),
                "task": task,
                "real_manifest": fix(self.real_manifest),
                "answer_key": fix(self.answer_key),
                "answer_key_masks": fix(self.answer_key_masks or masks_path(self.answer_key)),
            }
        )

    def host_paths(self) -> list[str]:
        """Host paths no response may show."""
        paths = {
            str(self.storage),
            str(self.real_manifest),
            str(self.real_manifest.parent),
            str(self.answer_key),
        }
        if self.answer_key_masks is not None:
            paths.add(str(self.answer_key_masks))
        if "/" in self.task:
            paths.add(str(Path(self.task).parent))
        return sorted(paths, key=len, reverse=True)


def load_settings(path: str | Path) -> ServiceSettings:
    path = Path(path)
    s = load_yaml_model(path, ServiceSettings, "service settings")
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            log.warning("%s holds id_salt and is readable by other users: chmod 600 it", path)
    return s.resolved(path.resolve().parent)
