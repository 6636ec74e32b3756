"""Strict configuration models and the one way user YAML becomes one of them.

Every file a user writes (task, preset, protocol, generator card, leaderboard.yaml) goes through
`load_yaml_model`, so all of them report problems alike: exit 2, the file named, each field named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from bench.errors import BadInput

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Unknown keys are errors (a typo must not be silently ignored); instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StrictMutable(BaseModel):
    model_config = ConfigDict(extra="forbid")


def pydantic_problems(e: ValidationError) -> list[str]:
    """One line per field: `field 'a.b': what is wrong (got ...)`."""
    out = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            out.append(f"field {field!r}: unknown key")
        elif err["type"] == "missing":
            out.append(f"field {field!r}: required field is missing")
        else:
            out.append(f"field {field!r}: {err['msg']} (got {err.get('input')!r})")
    return out


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A user's text file as UTF-8; unreadable or wrongly encoded files are bad input naming the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{p}: {what} not found") from None
    except IsADirectoryError:
        raise BadInput(f"{p}: {what} is a folder, expected a file") from None
    except OSError as e:
        raise BadInput(f"{p}: {what} cannot be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BadInput(
            f"{p}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); save it as UTF-8"
        ) from None


# Nodes a document may expand to, aliases counted at every use: a few hundred bytes of nested aliases would
# otherwise become gigabytes once validated or written out again.
MAX_YAML_NODES = 1_000_000


def _expanded_nodes(root: yaml.Node, budget: int) -> int:
    """How many nodes `root` stands for with every alias expanded; stops past `budget` or at a cycle."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise BadInput("holds a recursive YAML alias")
        active.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                n += size(child)
                if n > budget:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                n += size(k) + size(v)
                if n > budget:
                    break
        active.discard(key)
        sizes[key] = n
        return n

    return size(root)


def safe_load_bounded(text: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """`yaml.safe_load` that refuses, before constructing anything, a document expanding past `max_nodes` nodes.

    Raises yaml.YAMLError for bad YAML and BadInput (without a file name) for a document over the budget."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_nodes(node, max_nodes)
        if n > max_nodes:
            raise BadInput(
                f"expands to more than {max_nodes:,} YAML nodes (aliases counted at every use); write it out plainly"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    text = read_text_file(p, what)
    try:
        raw = safe_load_bounded(text)
    except yaml.YAMLError as e:
        raise BadInput(f"{p}: not valid YAML: {e}") from None
    except BadInput as e:
        raise BadInput(f"{p}: {what} {e.args[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadInput(f"{p}: a {what} must be a mapping of fields, got {type(raw).__name__}")
    return raw


def read_mapping_file(path: str | Path, what: str) -> dict[str, Any]:
    """`read_yaml_mapping`, except that a `.json` file is read as JSON (YAML 1.1 would take `1e-05` for a string)."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        return read_yaml_mapping(p, what)
    text = read_text_file(p, what)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{p}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{p}: a {what} must be a mapping of fields, got {type(raw).__name__}")
    return raw


def validate_model(model: type[M], raw: Any, where: str | Path, what: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise BadInput(f"{where}: invalid {what}", problems=pydantic_problems(e)) from None


def load_yaml_model(path: str | Path, model: type[M], what: str) -> M:
    """Read `path` as YAML and validate it as `model`; every problem is exit 2 naming the file and field."""
    return validate_model(model, read_yaml_mapping(path, what), path, what)
