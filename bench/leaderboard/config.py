"""`leaderboard.yaml`: what a leaderboard accepts and how it ranks.

A leaderboard pins a task name and version, the regimes and seeds every submission must contain, optionally the
hashes of the real manifest and of the evaluation case set, and the primary metric it ranks by. Fields left empty
(`null`) are not checked; the seeding script fills the pins once the reference records exist.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from bench.errors import BadInput
from bench.io import sha256_file
from bench.leaderboard.key import KEY_FILE, AnswerKey, key_path, masks_path
from bench.leaderboard.spec import ScoringSpec, task_problems
from bench.schema import Strict, read_yaml_mapping, validate_model
from bench.tasks import Task, load_task

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


class MasksRef(Strict):
    path: str = Field(
        description="the truth label maps of the key's cases (medsynbench-labelmaps/1, salted case ids), relative "
        "to this file's folder or absolute"
    )
    sha256: str | None = Field(None, description="SHA-256 of the masks file; null: not checked")


class AnswerKeyRef(Strict):
    path: str = Field(
        description="the answer key (Parquet), relative to this file's folder or absolute (a path the host controls)"
    )
    sha256: str | None = Field(None, description="SHA-256 of the key file; null: not checked")
    masks: MasksRef | None = Field(
        None,
        description="segmentation boards: the truth label map of every key case; null: a classification board",
    )


class Eligibility(Strict):
    """Which generators are ranked. `exclude`: listed under "not ranked" with the reason, never ranked or drawn on
    the Pareto front; `show`: ranked, with the flag shown in its column."""

    privacy_flagged: Literal["exclude", "show"] = "exclude"
    contamination: Literal["exclude", "show"] = "exclude"


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
    answer_key: AnswerKeyRef | None = Field(
        None,
        description="the reference of every evaluation case; scoring reads labels, sites and subgroups here",
    )
    eligibility: Eligibility = Eligibility()
    max_archive_bytes: int = Field(DEFAULT_MAX_ARCHIVE_BYTES, gt=0)
    image_size: int | str | None = Field(
        None,
        description="segmentation boards: the side (pixels, or a task size preset) of the label maps submissions are "
        "scored at, which `leaderboard key` writes the truth masks at; null: the task's image.size",
    )
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

    @property
    def task_file(self) -> Path:
        """A task definition kept with the leaderboard (used instead of the installed task when present)."""
        return self.folder / "task.yaml"


def load_key(cfg: LeaderboardConfig) -> AnswerKey:
    """The leaderboard's answer key (with its masks on a segmentation board), checked against the sha256s in
    leaderboard.yaml."""
    ref = cfg.answer_key
    if ref is None:
        raise BadInput(
            f"{cfg.path}: no answer_key: a leaderboard scores against its own answer key "
            "(write one with `medsynbench leaderboard key BOARD --real MANIFEST`)"
        )
    masks = None if ref.masks is None else key_path(cfg.folder, ref.masks.path)
    return AnswerKey.read(
        key_path(cfg.folder, ref.path),
        ref.sha256,
        masks=masks,
        masks_sha256=None if ref.masks is None else ref.masks.sha256,
    )


def answer_key_digest(cfg: LeaderboardConfig) -> str:
    """What scores depend on of the answer key, for cache keys: the key file's sha256, and on a segmentation board
    its masks file's too (a changed mask changes every recounted number)."""
    ref = cfg.answer_key
    assert ref is not None
    sha = sha256_file(key_path(cfg.folder, ref.path))
    if ref.masks is None:
        return sha
    return hashlib.sha256(
        f"{sha}\x1f{sha256_file(key_path(cfg.folder, ref.masks.path))}".encode()
    ).hexdigest()


def board_image_size(cfg: LeaderboardConfig, task: Task, override: int | str | None = None) -> int:
    """The side of the label maps a segmentation board scores at: `override` (`leaderboard key --image-size`),
    else leaderboard.yaml's `image_size`, else the task's `image.size`; a size preset names one of the task's
    `image.presets`. An override that contradicts a pinned `image_size` is BadInput."""

    def side(v: int | str, where: str) -> int:
        if isinstance(v, str) and not v.isdigit():
            if v not in task.image.presets:
                raise BadInput(
                    f"{where}: no image size preset {v!r} in task {task.name} ({sorted(task.image.presets)})"
                )
            return int(task.image.presets[v])
        if int(v) <= 0:
            raise BadInput(f"{where}: {v} is not a positive image size")
        return int(v)

    pinned = None if cfg.image_size is None else side(cfg.image_size, f"{cfg.path}: field 'image_size'")
    if override is not None:
        got = side(override, "--image-size")
        if pinned is not None and got != pinned:
            raise BadInput(
                f"--image-size {override}: {cfg.path} pins image_size {cfg.image_size} ({pinned} px)"
            )
        return got
    return pinned if pinned is not None else int(task.image.size)


def load_board_task(cfg: LeaderboardConfig) -> Task:
    """The task the leaderboard scores with: its own task.yaml, else the installed task of that name. Its name and
    version must match leaderboard.yaml; the spec hash pin is checked by `ScoringSpec.pin_problems`, which can name
    the changed field from the records."""
    task = load_task(cfg.task_file if cfg.task_file.is_file() else cfg.task.name)
    where = cfg.task_file if cfg.task_file.is_file() else f"installed task {cfg.task.name!r}"
    problems = task_problems(task, cfg.task.name, cfg.task.version, None, str(where))
    if problems:
        raise BadInput(problems[0])
    return task


def board_spec(cfg: LeaderboardConfig, records: Sequence[Mapping[str, Any]] = ()) -> tuple[Task, ScoringSpec]:
    """The board's task and the spec it scores with; BadInput when the task is not the one leaderboard.yaml pins
    (naming the changed fields when a record carries them)."""
    task = load_board_task(cfg)
    spec = ScoringSpec.for_board(cfg, task)
    where = cfg.task_file if cfg.task_file.is_file() else f"installed task {cfg.task.name!r}"
    problems = spec.pin_problems(cfg.task.spec_sha256, records, str(where))
    if problems:
        raise BadInput(problems[0])
    return task, spec


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


def set_answer_key(board: str | Path, key: AnswerKey, path: str | Path | None = None) -> Path:
    """Write `key` (default: answer_key.parquet beside leaderboard.yaml) and point leaderboard.yaml at it with
    its sha256, keeping the file's comments. A key with masks (segmentation) also writes them beside the key file
    (`answer_key.masks.npz`: `masks_path`) and records their path and sha256 under `answer_key.masks`. Returns the
    key file."""
    cfg = load_config(board)
    assert cfg.path is not None
    target = Path(path) if path is not None else cfg.folder / KEY_FILE
    target = target if target.is_absolute() else cfg.folder / target

    def shown(p: Path) -> str:
        try:
            return p.resolve().relative_to(cfg.folder.resolve()).as_posix()
        except ValueError:
            return str(p.resolve())

    masks_block = ""
    if key.masks is not None:
        mtarget = masks_path(target)
        msha = key.write_masks(mtarget)
        masks_block = f"  masks:\n    path: {shown(mtarget)}\n    sha256: {msha}\n"
    sha = key.write(target)
    block = f"answer_key:\n  path: {shown(target)}\n  sha256: {sha}\n{masks_block}"
    text = cfg.path.read_text(encoding="utf-8")
    pattern = re.compile(r"(?m)^answer_key:.*\n(?:[ \t]+.*\n?)*")
    text = pattern.sub(block, text, count=1) if pattern.search(text) else text.rstrip("\n") + "\n" + block
    tmp = cfg.path.with_name(f".{cfg.path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, cfg.path)
    load_config(board)  # the edited file must still be valid
    return target
