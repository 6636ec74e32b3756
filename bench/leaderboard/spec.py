"""What a leaderboard score depends on, in one frozen spec that owns the score cache key.

A record's numbers are a function of its predictions, the answer key and a `ScoringSpec`: the task definition (every
field but `source`, by hash and field by field), the primary metric, the bootstrap settings, the metric registry
(a fingerprint of every registered metric), the record schema and the scorer's version. `submit`, `leaderboard
build`, `leaderboard.yaml`'s task pin and the hosted service all build their spec here, and the score cache is keyed
by `ScoringSpec.cache_key`, so a build's verdict never depends on whether the cache is warm: the task checks run
before any score is looked up, and anything that could change a score changes the key.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import bench.leaderboard.score as score_module
import bench.metrics as metrics_package
from bench import __version__
from bench.io import cache_dir, read_json, write_json
from bench.leaderboard.record import SCHEMA_VERSION
from bench.metrics.core import metric_specs
from bench.tasks import Task

# Fields of a task that say where its data lives, not how it is scored.
UNSCORED_TASK_FIELDS = ("source",)


def _sha(blob: Any) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def task_spec(task: Task) -> dict[str, Any]:
    """The scored part of a task definition as plain data."""
    spec = task.spec()
    for k in UNSCORED_TASK_FIELDS:
        spec.pop(k, None)
    return spec


def task_spec_sha256(task: Task) -> str:
    """Identity of a task definition: every field but `source` (which only says where the data lives)."""
    return _sha(task_spec(task))


def _leaves(value: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for k in sorted(value):
            yield from _leaves(value[k], f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, value


def task_fields(task: Task) -> dict[str, str]:
    """A short hash of every scored leaf field (`metrics.ece_bins`, ...), so a changed definition names its field."""
    return {path: _sha(v)[:16] for path, v in _leaves(task_spec(task), "")}


def changed_fields(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Field paths whose value differs, was added or was removed between two `task_fields` maps."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def registry_fingerprint() -> str:
    """Hash of every registered metric's declaration: a metric added, removed or re-parametrised changes it."""
    out = []
    for m in metric_specs():
        d = {}
        for f in fields(m):
            v = getattr(m, f.name)
            d[f.name] = f"{v.__module__}.{v.__qualname__}" if callable(v) else v
        out.append(d)
    return _sha(json.loads(json.dumps(out, default=str)))


@functools.lru_cache(maxsize=1)
def scorer_fingerprint() -> str:
    """The medsynbench version and a hash of the scoring code (the metric library and the record scorer), so a
    score cached by one build of the code is never read by another, even without a version bump."""
    h = hashlib.sha256(__version__.encode())
    files = sorted(Path(metrics_package.__file__).parent.glob("*.py")) + [Path(score_module.__file__)]
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:16]}"


def task_problems(task: Task, name: str, version: str, spec_sha256: str | None, where: str) -> list[str]:
    """Why `task` is not the pinned one (name, version, and the spec hash when pinned); empty when it is."""
    if (task.name, task.version) != (name, version):
        return [f"{where}: task {task.name} {task.version} is not the leaderboard's {name} {version}"]
    sha = task_spec_sha256(task)
    if spec_sha256 and sha != spec_sha256:
        return [
            f"{where}: the task definition differs from the one the leaderboard pins for {name} {version} "
            f"(spec sha256 {sha[:12]}... != {spec_sha256[:12]}...); a change that can alter a score needs a new "
            "task version"
        ]
    return []


@dataclass(frozen=True)
class ScoringSpec:
    """Everything a leaderboard score depends on besides the predictions and the answer key."""

    task_name: str
    task_version: str
    task_sha256: str
    task_fields: tuple[tuple[str, str], ...]
    primary: str
    n_boot: int
    seed: int
    registry: str
    record_schema: str
    scorer: str

    @classmethod
    def of(cls, task: Task, *, n_boot: int, seed: int, primary: str | None = None) -> ScoringSpec:
        """The spec of scoring `task` with these bootstrap settings (primary metric: the task's by default). The
        hosted service builds its spec here from its settings."""
        return cls(
            task_name=task.name,
            task_version=task.version,
            task_sha256=task_spec_sha256(task),
            task_fields=tuple(sorted(task_fields(task).items())),
            primary=primary or task.metrics.primary,
            n_boot=int(n_boot),
            seed=int(seed),
            registry=registry_fingerprint(),
            record_schema=SCHEMA_VERSION,
            scorer=scorer_fingerprint(),
        )

    @classmethod
    def for_board(cls, cfg: Any, task: Task) -> ScoringSpec:
        """The spec a repository leaderboard (`leaderboard.yaml`, `LeaderboardConfig`) scores with."""
        return cls.of(task, n_boot=cfg.bootstrap.n, seed=cfg.bootstrap.seed, primary=cfg.primary_metric)

    def settings(self) -> dict[str, Any]:
        """The scoring settings a record states (`evaluation.primary_metric`, `n_boot`, `bootstrap_seed`)."""
        return {"primary": self.primary, "n_boot": self.n_boot, "seed": self.seed}

    def fields_map(self) -> dict[str, str]:
        return dict(self.task_fields)

    def record_task(self) -> dict[str, Any]:
        """The `task` block of a record scored under this spec."""
        return {
            "name": self.task_name,
            "version": self.task_version,
            "spec_sha256": self.task_sha256,
            "fields": self.fields_map(),
        }

    def cache_key(self, predictions_sha256: str, key_sha256: str, generator: str) -> str:
        """The score cache's key: these predictions, this answer key, this generator, under this spec."""
        blob = {
            "predictions": predictions_sha256,
            "key": key_sha256,
            "generator": generator,
            "spec": {f.name: getattr(self, f.name) for f in fields(self) if f.name != "task_fields"},
        }
        return _sha(blob)

    def record_problems(self, record: Mapping[str, Any]) -> list[str]:
        """Why a record was not scored under this spec (task definition, primary metric, bootstrap), naming the
        task fields that differ when the record carries them. Empty: it was."""
        rid = record.get("id", "?")
        out = []
        t = record.get("task") or {}
        if t.get("spec_sha256") != self.task_sha256:
            stored = t.get("fields")
            if isinstance(stored, dict):
                what = ", ".join(changed_fields(stored, self.fields_map())) or "spec_sha256"
                detail = f"task field(s) {what} differ"
            else:
                detail = "its task.spec_sha256 differs (the record predates per-field hashes)"
            out.append(
                f"record {rid}: scored under another definition of task {self.task_name} {self.task_version}: "
                f"{detail}; a change that can alter a score needs a new task version"
            )
        ev = record.get("evaluation") or {}
        used = {
            "primary": ev.get("primary_metric"),
            "n_boot": ev.get("n_boot"),
            "seed": ev.get("bootstrap_seed"),
        }
        if used != self.settings():
            out.append(
                f"record {rid}: scored with {used}, the leaderboard scores with {self.settings()}; re-submit it"
            )
        return out

    def pin_problems(
        self, spec_sha256: str | None, records: Sequence[Mapping[str, Any]], where: str
    ) -> list[str]:
        """Why the board's task does not match its `task.spec_sha256` pin, naming the fields that differ from the
        records' when a record carries them."""
        if not spec_sha256 or spec_sha256 == self.task_sha256:
            return []
        for r in records:
            t = r.get("task") or {}
            if t.get("spec_sha256") == spec_sha256 and isinstance(t.get("fields"), dict):
                what = ", ".join(changed_fields(t["fields"], self.fields_map()))
                return [
                    f"{where}: the task definition differs from the one the leaderboard pins for {self.task_name} "
                    f"{self.task_version}: field(s) {what} changed; a change that can alter a score needs a new "
                    "task version"
                ]
        return [
            f"{where}: the task definition differs from the one the leaderboard pins for {self.task_name} "
            f"{self.task_version} (spec sha256 {self.task_sha256[:12]}... != {spec_sha256[:12]}...); a change that "
            "can alter a score needs a new task version"
        ]


# ------------------------------------------------------------------------------------------------ score cache


def cache_file() -> Path:
    return cache_dir() / "leaderboard-scores.json"


def read_cache() -> dict[str, Any]:
    try:
        data = read_json(cache_file())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(cache: dict[str, Any], fresh: dict[str, Any]) -> None:
    if any(cache.get(k) != v for k, v in fresh.items()):
        # A cache that cannot be written only makes the next build slower.
        with contextlib.suppress(OSError):
            write_json(cache_file(), {**cache, **fresh})


def cached_scores(cache: Mapping[str, Any], key: str) -> tuple[dict[str, Any], str] | None:
    hit = cache.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("metrics"), dict) and isinstance(hit.get("split"), str):
        return hit["metrics"], hit["split"]
    return None


def remember_scores(
    spec: ScoringSpec,
    key_sha256: str,
    records: Sequence[Mapping[str, Any]],
    passed: Sequence[str] = (),
    stored_is_joined: Collection[str] = (),
) -> None:
    """Put scores just computed for `records` (written to the board) where `build` looks first: the same function
    of the same predictions, key and spec, so the next build need not recompute them. `passed`: cacheable record
    checks these predictions passed; `stored_is_joined`: ids of records whose stored predictions equal their join
    to the key. A build on another machine, without this cache, recomputes every number."""
    fresh = {
        spec.cache_key(r["predictions_sha256"], key_sha256, r["generator"]["name"]): {
            "metrics": json.loads(json.dumps(r["metrics"])),
            "split": r["evaluation"]["split"],
            "passed": list(passed),
            "stored_is_joined": r["id"] in stored_is_joined,
        }
        for r in records
    }
    write_cache(read_cache(), fresh)
