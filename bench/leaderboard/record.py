"""The result record: one JSON file per (generator, run) on a leaderboard, versioned by `schema_version`.

The schema (`record.schema.json`, JSON Schema draft 2020-12) is the contract; `validate_record` lists every place a
record breaks it. Records hold hashes and aggregates only, never a patient or case identifier.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from bench.errors import BadInput
from bench.io import cache_dir, sha256_file
from bench.runfolder import BASELINE

SCHEMA_VERSION = "1.0"
REFERENCE_LABEL = "real-only"
# Records, predictions and pages are published: readable by everyone, writable by the owner.
PUBLISHED_MODE = 0o644
# An absolute path inside longer text: a "/" that does not follow a word character, ":" or "/" (URLs, ratios).
_EMBEDDED = re.compile(r"(?<![\w.:/~])/(?:[\w.@+-]+/)+[\w.@+-]*")
_ABSOLUTE = re.compile(r"^(?:/|~[/\\]|[A-Za-z]:[/\\]|\\\\)")


@functools.lru_cache(maxsize=1)
def record_schema() -> dict[str, Any]:
    return json.loads(resources.files("bench.leaderboard").joinpath("record.schema.json").read_text("utf-8"))


@functools.lru_cache(maxsize=1)
def _validator():
    # jsonschema is slow to import; only validating a record needs it
    import jsonschema

    schema = record_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_record(record: Any) -> list[str]:
    """Every schema violation, each naming the field path (e.g. `metrics.regimes.real.ci_low`)."""
    out = []
    for err in sorted(_validator().iter_errors(record), key=lambda e: [str(p) for p in e.absolute_path]):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        out.append(f"field {where!r}: {err.message}")
    return out


def check_record(record: Any, source: str) -> None:
    problems = validate_record(record)
    if problems:
        raise BadInput(f"{source}: record does not match schema {SCHEMA_VERSION}", problems)


@functools.lru_cache(maxsize=1)
def _schema_sha() -> str:
    return hashlib.sha256(json.dumps(record_schema(), sort_keys=True).encode("utf-8")).hexdigest()


class _Valid:
    """Digests of record files that matched the schema, kept in the medsynbench cache: a board of a thousand
    records is validated once, not at every build (the schema validator takes some 25 ms a record)."""

    def __init__(self) -> None:
        self.path = cache_dir() / "valid-records.json"
        try:
            seen = json.loads(self.path.read_text())
        except (OSError, ValueError):
            seen = []
        self.seen = set(seen) if isinstance(seen, list) else set()
        self.fresh: set[str] = set()

    def digest(self, data: bytes) -> str:
        return hashlib.sha256(_schema_sha().encode() + b"\0" + data).hexdigest()

    def save(self) -> None:
        if not self.fresh:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(sorted(self.seen | self.fresh)))
            os.replace(tmp, self.path)


def remember_valid(paths: Iterable[Path]) -> None:
    """Record files just written after `check_record` passed: the next build need not validate them again."""
    valid = _Valid()
    for p in paths:
        with contextlib.suppress(OSError):
            valid.fresh.add(valid.digest(Path(p).read_bytes()))
    valid.save()


def read_record(path: str | Path, valid: _Valid | None = None) -> dict[str, Any]:
    path = Path(path)
    try:
        data = path.read_bytes()
        rec = json.loads(data)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable JSON record: {e}") from e
    digest = valid.digest(data) if valid is not None else None
    if digest is None or digest not in valid.seen:  # type: ignore[union-attr]
        check_record(rec, str(path))
        if valid is not None and digest is not None:
            valid.fresh.add(digest)
    if rec["id"] != path.stem:
        raise BadInput(f"{path}: field 'id' is {rec['id']!r} but the file is named {path.name!r}")
    return rec


def read_records(records_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a leaderboard, sorted by creation time then id (stable build output)."""
    d = Path(records_dir)
    if not d.is_dir():
        return []
    recs = []
    problems = []
    valid = _Valid()
    for p in sorted(d.glob("*.json")):
        try:
            recs.append(read_record(p, valid))
        except BadInput as e:
            problems.append(str(e))
    valid.save()
    if problems:
        raise BadInput(f"{d}: {len(problems)} invalid record(s)", problems)
    return sorted(recs, key=lambda r: (r["created"], r["id"]))


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return (s or "x")[:40]


def new_record_id(generator: str, when: datetime | None = None) -> str:
    """Time-ordered and unique without coordination: two submits at the same second differ in the random tail."""
    when = when or datetime.now(timezone.utc)
    label = REFERENCE_LABEL if generator == BASELINE else generator
    return f"{when:%Y%m%dt%H%M%S}-{slug(label)}-{secrets.token_hex(4)}"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def display_name(record: dict[str, Any]) -> str:
    g = record["generator"]["name"]
    return REFERENCE_LABEL if record["kind"] == "reference" else g


def redact(obj: Any, secrets_: Iterable[str], placeholder: str = "<redacted>") -> Any:
    """Replace any string that is, or contains, one of `secrets_` (identifiers that must not leave the machine).

    Identifiers shorter than 4 characters are matched only as whole strings, so that short ids do not blank
    every number-like text.
    """
    whole = {s for s in secrets_ if s}
    long_ids = sorted((s for s in whole if len(s) >= 4), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in long_ids)) if long_ids else None

    def fix(v: Any) -> Any:
        if isinstance(v, str):
            if v in whole:
                return placeholder
            return pattern.sub(placeholder, v) if pattern else v
        if isinstance(v, dict):
            return {fix(k) if isinstance(k, str) else k: fix(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [fix(x) for x in v]
        return v

    return fix(obj)


def _sha_of_file(path: str, roots: Iterable[Path]) -> str | None:
    p = Path(path).expanduser()
    for cand in [p] if p.is_absolute() else [Path(r) / p for r in roots]:
        if cand.is_file():
            return sha256_file(cand)
    return None


def scrub_local_paths(obj: Any, roots: Iterable[Path] = ()) -> Any:
    """The same data without anything that names a place on the submitter's machine.

    A mapping's `path` (a preset, protocol or manifest file) becomes the file's `sha256` (kept if given, else
    computed when the file is found as given or under one of `roots`; null otherwise): the content identifies
    the file, its location does not. Any other absolute path keeps only its file name, and the text of `roots`
    and the home folder inside longer strings is cut out.
    """
    roots = [Path(r) for r in roots]
    prefixes = sorted(
        {str(r.resolve()) for r in roots} | {str(Path.home())} - {"/", ""}, key=len, reverse=True
    )

    def text(v: str) -> str:
        if _ABSOLUTE.match(v):
            return re.split(r"[/\\]", v.rstrip("/\\"))[-1] or "<local path>"
        for pre in prefixes:
            v = v.replace(pre, "<local>")
        return _EMBEDDED.sub("<local path>", v)

    def fix(v: Any) -> Any:
        if isinstance(v, str):
            return text(v)
        if isinstance(v, dict):
            out = {k: fix(x) for k, x in v.items() if k != "path"}
            if "path" in v:
                given = v.get("sha256")
                path = v["path"]
                out["sha256"] = (
                    given
                    if isinstance(given, str)
                    else (_sha_of_file(path, roots) if isinstance(path, str) and path else None)
                )
            return out
        if isinstance(v, list | tuple):
            return [fix(x) for x in v]
        return v

    return fix(obj)


def local_paths(obj: Any, where: str = "") -> list[str]:
    """Fields of `obj` that hold an absolute path or a `path` entry (what `scrub_local_paths` removes)."""
    out: list[str] = []
    home = str(Path.home())

    def name(trail: tuple[Any, ...]) -> str:
        return ".".join(str(x) for x in ((where,) if where else ()) + trail)

    def walk(v: Any, trail: tuple[Any, ...]) -> None:
        # the field's dotted name is built only for a finding: a record holds thousands of leaves
        if isinstance(v, str):
            if _ABSOLUTE.match(v) or _EMBEDDED.search(v) or home in v:
                out.append(f"field {name(trail) or '(top level)'!r}: {v!r}")
        elif isinstance(v, dict):
            for k, x in v.items():
                if k == "path" and x not in (None, ""):
                    out.append(f"field {name((*trail, k))!r}: a local path ({x!r})")
                else:
                    walk(x, (*trail, k))
        elif isinstance(v, list | tuple):
            for i, x in enumerate(v):
                walk(x, (*trail, i))

    walk(obj, ())
    return out
