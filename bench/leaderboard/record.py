"""The result record: one JSON file per (generator, run) on a leaderboard, versioned by `schema_version`.

The schema (`record.schema.json`, JSON Schema draft 2020-12) is the contract; `validate_record` lists every place a
record breaks it. Records hold hashes and aggregates only, never a patient or case identifier.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from bench.errors import BadInput
from bench.io import read_json
from bench.runfolder import BASELINE

SCHEMA_VERSION = "1.0"
REFERENCE_GENERATOR = BASELINE
REFERENCE_LABEL = "real-only"


@functools.lru_cache(maxsize=1)
def record_schema() -> dict[str, Any]:
    return json.loads(resources.files("bench.leaderboard").joinpath("record.schema.json").read_text("utf-8"))


@functools.lru_cache(maxsize=1)
def _validator():
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


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        rec = read_json(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable JSON record: {e}") from e
    check_record(rec, str(path))
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
    for p in sorted(d.glob("*.json")):
        try:
            recs.append(read_record(p))
        except BadInput as e:
            problems.append(str(e))
    if problems:
        raise BadInput(f"{d}: {len(problems)} invalid record(s)", problems)
    return sorted(recs, key=lambda r: (r["created"], r["id"]))


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return (s or "x")[:40]


def new_record_id(generator: str, when: datetime | None = None) -> str:
    """Time-ordered and unique without coordination: two submits at the same second differ in the random tail."""
    when = when or datetime.now(timezone.utc)
    label = REFERENCE_LABEL if generator == REFERENCE_GENERATOR else generator
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
