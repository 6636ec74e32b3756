"""Source `folder`: any dataset given as image files plus one CSV, mapped onto the manifest contract without code.

Options (in the task's `source.options`, on the command line as `--option KEY=VALUE` with YAML values, or in a
YAML file named by `mapping`; options given directly override the file's):

  csv           the label table, relative to the root (or absolute); default `labels.csv`, else the only *.csv
                at the root
  columns       {manifest field: CSV column}, e.g. {case_id: id, patient_id: subject, image: file, label: dx,
                site: hospital, sex: gender, age: age_years}; any further field (e.g. scanner) is carried over as
                a column. Unmapped fields fall back to a CSV column of the same name.
  image_dir     folder the image paths are relative to (relative to the root); default the root
  image_suffix  appended to every image value that has none (for CSVs that list ids such as `ISIC_0024306`)
  label_map     {CSV value: task class}, renames classes; values not in the map are kept as they are
  site          a constant site for single-site data without a site column
  mapping       a YAML file (relative to the root) holding any of the options above
  pseudonymize  replace case_id and patient_id by `pseudonym(value, salt)` (for hospital identifiers); default false
  salt          the pseudonym salt; required with pseudonymize

Without a case_id the image path (relative to image_dir, without suffix) is the case id. Without a patient_id
every image is its own patient: images of one patient may then land in different splits and leak, so a warning
says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BadInput
from bench.schema import read_yaml_mapping
from bench.sources import pseudonym, register_source
from bench.tasks import Task

log = logging.getLogger(__name__)

OPTIONS = {
    "csv",
    "columns",
    "image_dir",
    "image_suffix",
    "label_map",
    "site",
    "mapping",
    "pseudonymize",
    "salt",
    "root",
}
FIELDS = ["case_id", "patient_id", "image", "label", "site", "sex", "age"]


@register_source("folder")
def folder_source(task: Task, root: Path, options: dict[str, Any]) -> pd.DataFrame:
    root = Path(root)
    opts = _merged_options(root, options)
    csv_path = _find_csv(root, opts.get("csv"))
    table = _read_csv(csv_path)
    columns = _mapping(opts.get("columns"), "columns")
    label_map = {str(k): str(v) for k, v in _mapping(opts.get("label_map"), "label_map").items()}

    # Resolve each manifest field to a CSV column: explicit mapping first, then a column of the same name.
    source_of: dict[str, str] = {}
    problems: list[str] = []
    for field, col in columns.items():
        if col not in table.columns:
            problems.append(f"columns.{field}: CSV column {col!r} not found (columns: {list(table.columns)})")
        else:
            source_of[field] = col
    # The task's predefined-split column (splits.from_column) travels like a subgroup column.
    carried = [task.splits.from_column] if task.splits.from_column else []
    for field in FIELDS + list(task.subgroups.columns) + carried:
        if field not in columns and field in table.columns:
            source_of[field] = field
    for field in ("image", "label"):
        if field not in columns and field not in source_of:
            problems.append(f"field {field!r}: no CSV column; map one with columns: {{{field}: COLUMN}}")
    if "site" not in source_of and not opts.get("site"):
        problems.append(
            "field 'site': no CSV column; map one with columns: {site: COLUMN} or give a constant site"
        )
    if problems:
        raise BadInput(f"{csv_path}: cannot map the CSV onto the manifest", problems)

    out = pd.DataFrame(index=table.index)
    for field, col in source_of.items():
        out[field] = table[col]
    if "site" not in out.columns:
        out["site"] = str(opts["site"])
    for field in ("image", "label", "site"):
        col = source_of.get(field, field)
        bad = out.index[out[field].isna() | (out[field].astype(str).str.strip() == "")]
        if len(bad):
            problems.append(f"column {col!r} ({field}): empty on {_lines(bad)}")
    if problems:
        raise BadInput(f"{csv_path}: required values missing", problems)

    for field in ("image", "label", "site", "case_id", "patient_id", "sex"):
        if field in out.columns:
            out[field] = out[field].map(lambda v: v if pd.isna(v) else str(v).strip())

    if label_map:
        out["label"] = out["label"].map(lambda v: label_map.get(v, v))
    bad = out.index[~out["label"].isin(task.classes)]
    if len(bad):
        vals = sorted(set(out.loc[bad, "label"]))
        hint = " after label_map" if label_map else "; rename them with label_map: {VALUE: CLASS}"
        problems.append(
            f"column {source_of['label']!r} (label): {vals} not among the task's classes {task.classes}{hint} "
            f"({_lines(bad)})"
        )
    if "site" in source_of:
        bad = out.index[~out["site"].isin(task.all_sites)]
        if len(bad):
            vals = sorted(set(out.loc[bad, "site"]))
            problems.append(
                f"column {source_of['site']!r} (site): {vals} not among the task's sites {task.all_sites} "
                f"({_lines(bad)})"
            )
    elif str(opts["site"]) not in task.all_sites:
        problems.append(f"option site: {opts['site']!r} is not among the task's sites {task.all_sites}")

    image_dir = _resolve(root, opts["image_dir"]) if opts.get("image_dir") else root
    suffix = str(opts.get("image_suffix") or "")
    if suffix and not suffix.startswith("."):
        suffix = "." + suffix
    rel = out["image"].map(lambda v: v + suffix if suffix and not Path(v).suffix else v)
    paths = rel.map(lambda v: _resolve(image_dir, v))
    exists = paths.map(lambda p: p.is_file())
    for i in out.index[~exists]:
        problems.append(f"line {i + 2}: image {rel[i]!r} not found ({paths[i]})")
    if problems:
        head = f"{csv_path}: {len(problems)} problem(s)"
        if not exists.any():
            head += f" (no image found at all: check image_dir ({image_dir}) and image_suffix)"
        raise BadInput(head, problems)
    out["image"] = paths.map(lambda p: str(p.resolve()))

    if "case_id" not in out.columns:
        out["case_id"] = rel.map(lambda v: Path(v).with_suffix("").as_posix())
    bad = out.index[out["case_id"].isna() | (out["case_id"].astype(str) == "")]
    if len(bad):
        problems.append(f"column {source_of['case_id']!r} (case_id): empty on {_lines(bad)}")
    dup = out["case_id"].dropna()
    dup = dup[dup.duplicated(keep=False)]
    col = source_of.get("case_id", "image")
    for cid, idx in dup.groupby(dup).groups.items():
        problems.append(f"column {col!r} (case_id): {cid!r} appears on {_lines(idx)}")
    if "patient_id" in out.columns:
        bad = out.index[out["patient_id"].isna() | (out["patient_id"].astype(str) == "")]
        if len(bad):
            problems.append(f"column {source_of['patient_id']!r} (patient_id): empty on {_lines(bad)}")
    if "age" in out.columns:
        age = pd.to_numeric(out["age"], errors="coerce")
        bad = out.index[age.isna() & out["age"].notna() & (out["age"].astype(str).str.strip() != "")]
        if len(bad):
            problems.append(f"column {source_of['age']!r} (age): not a number on {_lines(bad)}")
        out["age"] = age
    if problems:
        raise BadInput(f"{csv_path}: {len(problems)} problem(s)", problems)

    if "patient_id" not in out.columns:
        log.warning(
            "%s: no patient_id column mapped; every image counts as its own patient, so images of one patient "
            "may land in different splits (leakage). Map columns: {patient_id: COLUMN} if the data has one.",
            csv_path,
        )
        out["patient_id"] = out["case_id"]
    if _as_bool(opts.get("pseudonymize", False), "pseudonymize"):
        salt = opts.get("salt")
        if not salt:
            raise BadInput("option pseudonymize: needs a salt (--option salt=SECRET); keep it private")
        out["case_id"] = out["case_id"].map(lambda v: pseudonym(v, str(salt)))
        out["patient_id"] = out["patient_id"].map(lambda v: pseudonym(v, str(salt)))
    front = ["case_id", "patient_id", "image", "label", "site"]
    return out[front + [c for c in out.columns if c not in front]].reset_index(drop=True)


def _merged_options(root: Path, options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise BadInput(f"source folder: unknown option(s) {unknown} (known: {sorted(OPTIONS - {'root'})})")
    opts: dict[str, Any] = {}
    if options.get("mapping"):
        path = _resolve(root, options["mapping"])
        if not path.is_file():
            raise BadInput(f"{path}: mapping file (option mapping) not found")
        raw = read_yaml_mapping(path, "mapping file")
        bad = sorted(set(raw) - (OPTIONS - {"mapping", "root"}))
        if bad:
            raise BadInput(f"{path}: unknown key(s) {bad} (known: {sorted(OPTIONS - {'mapping', 'root'})})")
        opts.update(raw)
    for k, v in options.items():
        if k == "mapping":
            continue
        if k in ("columns", "label_map") and isinstance(opts.get(k), dict) and isinstance(v, dict):
            opts[k] = {**opts[k], **v}
        else:
            opts[k] = v
    return opts


def _find_csv(root: Path, option: Any) -> Path:
    if option:
        p = _resolve(root, str(option))
        if not p.is_file():
            raise BadInput(f"{p}: label CSV (option csv) not found")
        return p
    if (root / "labels.csv").is_file():
        return root / "labels.csv"
    cands = sorted(root.glob("*.csv"))
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise BadInput(f"{root}: no label CSV; name it with --option csv=FILE")
    raise BadInput(f"{root}: several CSV files; choose one with --option csv=FILE", [c.name for c in cands])


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        # Strings throughout: ids such as 007 must not turn into numbers.
        df = pd.read_csv(path, dtype=str, keep_default_na=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise BadInput(f"{path}: cannot be read as CSV: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise BadInput(f"{path}: the CSV has no data rows")
    return df.reset_index(drop=True)


def _mapping(v: Any, name: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str | int) for k in v):
        raise BadInput(f"option {name}: expected a mapping such as {{label: dx}}, got {v!r}")
    if name == "columns":
        unknown = [k for k, c in v.items() if not isinstance(c, str) or not c]
        if unknown:
            raise BadInput(f"option columns: fields {unknown} must name a CSV column")
    return dict(v)


def _resolve(base: Path, p: str | Path) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def _as_bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in {"true", "false", "yes", "no", "1", "0"}:
        return v.lower() in {"true", "yes", "1"}
    raise BadInput(f"option {name}: expected true or false, got {v!r}")


def _lines(idx, limit: int = 20) -> str:
    """CSV line numbers (header = line 1) of 0-based data rows."""
    idx = [int(i) + 2 for i in idx]
    s = ("line " if len(idx) == 1 else "lines ") + ", ".join(str(i) for i in idx[:limit])
    return s + (f", ... ({len(idx)} lines)" if len(idx) > limit else "")
