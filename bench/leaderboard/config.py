"""`leaderboard.yaml`: what a leaderboard accepts and how it ranks.

A leaderboard pins a task name and version, the regimes and seeds every submission must contain, optionally the
hashes of the real manifest and of the evaluation case set, and the primary metric it ranks by. Fields left empty
(`null`) are not checked; the seeding script fills the pins once the reference records exist.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from bench.errors import BadInput
from bench.schema import Strict, read_yaml_mapping, validate_model

CONFIG_FILE = "leaderboard.yaml"
DEFAULT_MAX_ARCHIVE_BYTES = 2 * 1024**3


class TaskPin(Strict):
    name: str
    version: str
    spec_sha256: str | None = Field(
        None, description="SHA-256 of the task definition (all fields but `source`); null: not pinned"
    )


class ProtocolPin(Strict):
    regimes: list[str] | None = Field(None, description="required regimes; null: the task's protocol")
    seeds: list[int] | None = Field(None, description="required seeds; null: the task's protocol")
    backbone: str | None = Field(None, description="required backbone; null: any single backbone")


class ManifestPins(Strict):
    real: str | None = None


class Pins(Strict):
    manifests: ManifestPins = ManifestPins()
    eval_cases_sha256: str | None = Field(
        None, description="SHA-256 of the sorted test + external case ids every run must predict"
    )


class Bootstrap(Strict):
    n: int = Field(1000, ge=20)
    seed: int = 0


class LeaderboardConfig(Strict):
    schema_version: str = "1.0"
    title: str = ""
    task: TaskPin
    protocol: ProtocolPin = ProtocolPin()
    primary_metric: str | None = Field(None, description="null: the task's metrics.primary")
    pins: Pins = Pins()
    id_salt: str = Field(
        min_length=8, description="salt of the hashed case and patient ids stored with records"
    )
    bootstrap: Bootstrap = Bootstrap()
    require_privacy: bool = True
    max_archive_bytes: int = Field(DEFAULT_MAX_ARCHIVE_BYTES, gt=0)
    path: Path | None = Field(default=None, exclude=True)

    @property
    def folder(self) -> Path:
        assert self.path is not None
        return self.path.parent

    @property
    def records_dir(self) -> Path:
        return self.folder / "records"

    @property
    def predictions_dir(self) -> Path:
        return self.folder / "predictions"


def load_config(board: str | Path) -> LeaderboardConfig:
    """Read `board/leaderboard.yaml` (or the file itself). Problems name the file and the field."""
    p = Path(board)
    path = p / CONFIG_FILE if p.is_dir() else p
    if not path.is_file():
        raise BadInput(f"{path}: leaderboard file not found (a leaderboard folder holds {CONFIG_FILE})")
    raw = read_yaml_mapping(path, "leaderboard file")
    if isinstance(raw.get("task"), dict) and not isinstance(raw["task"].get("version", ""), str):
        raw["task"]["version"] = str(raw["task"]["version"])
    cfg = validate_model(LeaderboardConfig, raw, path, "leaderboard file")
    return cfg.model_copy(update={"path": path.resolve()})
