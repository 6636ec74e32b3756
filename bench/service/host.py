"""What the app and the workers share: settings, the database engine, the task, the answer key, path hiding."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from bench.leaderboard.spec import ScoringSpec
from bench.service import db
from bench.service.scoring import AnswerKey, load_key
from bench.service.settings import ServiceSettings, load_settings
from bench.tasks import Task, load_task


class Host:
    def __init__(self, settings: ServiceSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else db.make_engine(settings.database)
        self.sessions = db.sessions(self.engine)

    @classmethod
    def from_file(cls, path: str | Path) -> Host:
        return cls(load_settings(path))

    def init(self) -> None:
        """Tables and folders; everything created here is the owner's only (uploads and the database are the
        teams' work and hold token hashes)."""
        url = self.settings.database
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            path = Path(url[len("sqlite:///") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.settings.storage.mkdir(mode=0o700, parents=True, exist_ok=True)
        db.init_db(self.engine)
        for d in (self.uploads, self.records, self.work):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.page_dir.mkdir(parents=True, exist_ok=True)  # the published page

    @property
    def uploads(self) -> Path:
        return self.settings.storage / "uploads"

    @property
    def records(self) -> Path:
        return self.settings.storage / "records"

    @property
    def page_dir(self) -> Path:
        return self.settings.storage / "page"

    @property
    def work(self) -> Path:
        return self.settings.storage / "work"

    @property
    def cache(self) -> Path:
        return self.settings.storage / "cache"

    @functools.cached_property
    def task(self) -> Task:
        return load_task(self.settings.task)

    @functools.cached_property
    def spec(self) -> ScoringSpec:
        """What every score of this host depends on, as a repository board defines it (bench.leaderboard.spec)."""
        s = self.settings.scoring
        return ScoringSpec.of(self.task, n_boot=s.n_boot, seed=s.seed)

    @functools.cached_property
    def key(self) -> AnswerKey:
        """The answer key; for a segmentation task with its truth label maps (`answer_key_masks`)."""
        masks = self.settings.answer_key_masks if self.task.is_segmentation else None
        return load_key(self.settings.answer_key, masks)

    def hide_paths(self, text: str) -> str:
        """Host paths replaced by `<host>`, and nothing else: were the ids the host holds hidden in text a team
        wrote, that an id comes back hidden would tell the team the host holds it."""
        for p in self.settings.host_paths():
            text = text.replace(p, "<host>")
        return text

    def dispose(self) -> None:
        self.engine.dispose()


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
