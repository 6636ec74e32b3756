"""The matrix's inputs: the real manifest, each generator's synthetic manifest and its card, checked up front."""

from __future__ import annotations

import logging
from pathlib import Path

from bench.errors import BadInput
from bench.generators.card import card_path_for, hash_id, read_card
from bench.manifest import Manifest, load_valid_manifest, read_manifest, validate_manifest
from bench.runfolder import PREDICTED_SPLITS, check_generator_name
from bench.tasks import Task

log = logging.getLogger(__name__)


def parse_synthetic_args(items: list[str] | None) -> dict[str, Path]:
    """`NAME=MANIFEST` items -> {name: path}; names become folder names, so they are kept file-system safe."""
    out: dict[str, Path] = {}
    for item in items or []:
        if "=" not in item:
            raise BadInput(f"--synthetic {item!r}: expected NAME=MANIFEST")
        name, path = (s.strip() for s in item.split("=", 1))
        check_generator_name(name, f"--synthetic {item!r}: generator name")
        if name in out:
            raise BadInput(f"--synthetic {item!r}: generator name {name!r} given twice")
        out[name] = Path(path)
    return out


def load_real(path: str | Path, task: Task) -> Manifest:
    """The real manifest: valid for the task, real rows only, with training and validation rows."""
    m = load_valid_manifest(path, task, check_images=False)
    df = m.df
    syn = df.index[df["origin"] != "real"]
    if len(syn):
        raise BadInput(
            f"{path}: the real manifest holds {len(syn)} row(s) of origin other than 'real' (rows "
            f"{', '.join(map(str, syn[:10]))}); pass synthetic images with --synthetic NAME=MANIFEST"
        )
    for split in ("train", "val"):
        if not (df["split"] == split).any():
            raise BadInput(f"{path}: the real manifest has no rows in the {split!r} split (column 'split')")
    return m


def find_card_file(manifest: Path) -> Path | None:
    """The generator card beside a synthetic manifest, if there is one."""
    cands = list(card_path_for(manifest)) + [manifest.with_name("card.json"), manifest.with_name("card.yml")]
    return next((p for p in cands if p.is_file()), None)


def load_synthetic(
    name: str, path: str | Path, task: Task, real: Manifest
) -> tuple[Manifest, dict | None, Path | None]:
    """Read and check one synthetic manifest and its card; every problem found is bad input (exit 2)."""
    path = Path(path)
    m = read_manifest(path)
    df = m.df
    problems: list[str] = []
    if "origin" in df.columns:
        bad = df.index[df["origin"].astype(str) == "real"]
        if len(bad):
            problems.append(
                f"column 'origin': {len(bad)} row(s) of origin 'real' in a synthetic manifest (rows "
                f"{', '.join(map(str, bad[:20]))}{', ...' if len(bad) > 20 else ''})"
            )
    problems += [
        p
        for p in validate_manifest(m, task, check_images=False, allow_origins=("synthetic",))
        if not p.startswith("column 'origin': must be one of")
    ]
    if problems:
        raise BadInput(
            f"{path}: synthetic manifest for generator {name!r}: {len(problems)} problem(s)", problems
        )

    card_path = find_card_file(path)
    if card_path is None:
        log.warning(
            "%s: no generator card beside the synthetic manifest; its provenance is not checked", path
        )
        return m, None, None
    card = read_card(card_path).to_dict()
    training = card.get("training") or {}
    ext = sorted(set(map(str, training.get("sites") or [])) & set(task.sites.external))
    if ext:
        problems.append(
            f"field 'training.sites': the generator was trained on data from external site(s) {ext}; external "
            "sites must stay unseen"
        )
    bad_splits = sorted(set(map(str, training.get("splits") or [])) - {"train", "reserve"})
    if bad_splits:
        problems.append(
            f"field 'training.splits': the generator was trained on split(s) {bad_splits}; only 'train' (or "
            "'reserve', the patients the positive control draws from)"
        )
    hashed = set(map(str, training.get("patients") or []))
    if hashed:
        rdf = real.df
        held = rdf[rdf["split"].isin(PREDICTED_SPLITS)]
        leaked = held[held["patient_id"].map(hash_id).isin(hashed)]
        if len(leaked):
            by_split = leaked.groupby("split")["patient_id"].nunique().to_dict()
            problems.append(
                f"field 'training.patients': the generator was trained on {leaked['patient_id'].nunique()} patient(s) "
                f"of the real manifest's held-out splits {by_split}; its synthetic images would leak them"
            )
    if problems:
        raise BadInput(f"{card_path}: generator card of {name!r} shows contamination", problems)
    return m, card, card_path
