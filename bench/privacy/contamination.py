"""Inputs of the generator audit and its contamination checks: which real images are the generator's training data,
which are an unseen holdout, and whether any training data overlaps what the task evaluates on (see
`bench.privacy.memorization` for the rules)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.generators.card import GeneratorCard, find_card, hash_id, read_card
from bench.generators.importer import check_image_set, image_shape
from bench.manifest import Manifest, load_valid_manifest, manifest_hash
from bench.privacy.memorization import (
    MIN_HOLDOUT,
    pixel_features,
    shift_tolerant_nearest,
    short_hash,
    train_audit_classifier,
)
from bench.tasks import Task, load_task

# -- inputs ------------------------------------------------------------------------------------------------------


@dataclass
class AuditInputs:
    task: Task
    card: GeneratorCard
    card_path: Path
    synthetic: Manifest
    train: Manifest
    calibration: Manifest
    fresh: Manifest
    evaluation: (
        pd.DataFrame
    )  # val / test / external real rows for contamination, with a resolved `path` column
    size: int


def _select_holdout(holdout: Manifest, train: Manifest, task: Task) -> pd.DataFrame:
    df = holdout.df
    train_patients = set(train.df["patient_id"].astype(str))
    train_cases = set(train.df["case_id"].astype(str))
    keep = (
        (df["origin"] == "real")
        & df["site"].isin(task.sites.train)
        & (df["split"] != "external")
        & ~df["patient_id"].astype(str).isin(train_patients)
        & ~df["case_id"].astype(str).isin(train_cases)
    )
    return df[keep].reset_index(drop=True)


def _split_halves(df: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Calibration and fresh halves of the holdout, split by patient within each site (sites differ in noise and
    field of view, hence in typical distances; an unbalanced split would shift one half against the other)."""
    per_patient = df.groupby(df["patient_id"].astype(str), sort=True)["site"].first()
    rng = np.random.default_rng(seed)
    cal: set[str] = set()
    odd = 0
    for _, pts in per_patient.groupby(per_patient, sort=True):
        ids = np.array(sorted(pts.index))
        perm = rng.permutation(len(ids))
        # Odd-sized sites alternate which half gets the extra patient.
        k = len(ids) // 2 + (len(ids) % 2) * (1 - odd)
        odd ^= len(ids) % 2
        cal |= set(ids[perm[:k]])
    mask = df["patient_id"].astype(str).isin(cal)
    return df[mask].reset_index(drop=True), df[~mask].reset_index(drop=True)


def _with_paths(m: Manifest) -> pd.DataFrame:
    """Rows with each image's absolute `path`, and a segmentation manifest's masks absolute too (the rows are read
    later under another root)."""
    df = m.df.assign(path=[str(p) for p in m.image_paths()])
    if "mask_path" in df.columns:
        df["mask_path"] = [str(m.image_path(v)) if isinstance(v, str) else None for v in df["mask_path"]]
    return df


def prepare(
    task: Task | str | Path,
    synthetic: str | Path,
    train: str | Path,
    holdout: str | Path,
    *,
    card: str | Path | None = None,
    test: str | Path | None = None,
    size: int | None = None,
    seed: int = 0,
) -> AuditInputs:
    """Read and check every input; BadInput (exit 2) names the file and what is wrong."""
    task = load_task(task)
    syn = load_valid_manifest(synthetic, task)
    not_syn = syn.df.index[syn.df["origin"] != "synthetic"]
    if len(not_syn):
        raise BadInput(f"{synthetic}: rows {list(not_syn[:20])} are not origin 'synthetic'")
    card_path = find_card(synthetic, card)
    c = read_card(card_path)
    tr = load_valid_manifest(train, task)
    if not c.training.manifest_sha256:
        raise BadInput(
            f"{card_path}: field 'training.manifest_sha256' is missing: the audit cannot tell which images the "
            "generator was trained on"
        )
    got = manifest_hash(tr.df)
    if got != c.training.manifest_sha256:
        raise BadInput(
            f"{card_path}: training.manifest_sha256 {c.training.manifest_sha256} does not match --train {train} "
            f"(sha256 {got}); pass the training manifest the generator was trained on"
        )
    paths = syn.image_paths()
    names = [f"{synthetic} row {i} ({rel})" for i, rel in enumerate(syn.df["image"])]
    problems = check_image_set(paths, names, task.image.channels)
    if problems:
        raise BadInput(f"{synthetic}: {len(problems)} synthetic image problem(s)", problems)
    h, w, _ = image_shape(paths[0])
    s = int(size) if size else int(min(h, w, task.image.size))

    ho = load_valid_manifest(holdout, task)
    hold = _select_holdout(ho, tr, task)
    if len(hold) < MIN_HOLDOUT:
        raise BadInput(
            f"--holdout {holdout}: {len(hold)} usable holdout image(s) (real, training sites, not external, patients "
            f"not in the training manifest); at least {MIN_HOLDOUT} are needed to calibrate a percentile"
        )
    cal, fresh = _split_halves(hold, seed)
    ev = [_with_paths(ho)]
    if test is not None:
        ev.append(_with_paths(load_valid_manifest(test, task)))
    evaluation = pd.concat(ev, ignore_index=True)
    evaluation = evaluation[
        evaluation["split"].isin(["val", "test", "external"]) & (evaluation["origin"] == "real")
    ]
    evaluation = evaluation.drop_duplicates("case_id").reset_index(drop=True)
    return AuditInputs(
        task=task,
        card=c,
        card_path=Path(card_path),
        synthetic=syn,
        train=tr,
        calibration=Manifest(cal, ho.root, ho.path),
        fresh=Manifest(fresh, ho.root, ho.path),
        evaluation=evaluation,
        size=s,
    )


# -- contamination -----------------------------------------------------------------------------------------------


def contamination_problems(
    card: GeneratorCard, task: Task, train: pd.DataFrame, evaluation: pd.DataFrame
) -> list[str]:
    """Overlap of the generator's training data with what the task evaluates on (sites, patients, splits)."""
    problems = []
    ext = sorted(set(card.training.sites) & set(task.sites.external))
    if ext:
        problems.append(
            f"card training.sites includes the task's external site(s) {ext}: external evaluation is no longer "
            "independent of the generator"
        )
    ext_rows = train["site"].isin(task.sites.external)
    if ext_rows.any():
        problems.append(f"training manifest: {int(ext_rows.sum())} row(s) from external site(s)")
    # `reserve` patients are never trained on or evaluated: the positive control's pool, not a leak.
    bad_split = ~train["split"].isin(["train", "reserve"])
    if bad_split.any():
        counts = train.loc[bad_split, "split"].value_counts().to_dict()
        problems.append(f"training manifest: rows outside split 'train' {counts}")
    trained = set(card.training.patients) | {hash_id(p) for p in train["patient_id"]}
    for split in ("val", "test", "external"):
        pts = {hash_id(p) for p in evaluation.loc[evaluation["split"] == split, "patient_id"]}
        both = sorted(trained & pts)
        if both:
            problems.append(
                f"{len(both)} {split} patient(s) are among the generator's training patients "
                f"(hashed: {', '.join(h[:16] for h in both[:5])}{', ...' if len(both) > 5 else ''})"
            )
    return problems


def find_duplicates(
    syn_images: np.ndarray,
    syn_ids: list[str],
    ev_images: np.ndarray,
    evaluation: pd.DataFrame,
    threshold: float,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Synthetic images that are exact (identical pixels) or near (shift-tolerant pixel-feature distance below
    `threshold`) copies of a validation, test or external image."""
    if len(ev_images) == 0 or len(syn_images) == 0:
        return []
    d, idx = shift_tolerant_nearest(syn_images, pixel_features(ev_images), device=device)
    out = []
    for i in np.flatnonzero(d < threshold):
        j = int(idx[i])
        exact = bool(np.array_equal(syn_images[i], ev_images[j]))
        out.append(
            {
                "synthetic": str(syn_ids[i]),
                "real": short_hash(evaluation.at[j, "case_id"]),
                "split": str(evaluation.at[j, "split"]),
                "site": str(evaluation.at[j, "site"]),
                "distance": 0.0 if exact else float(d[i]),
                "kind": "exact" if exact else "near",
            }
        )
    out.sort(key=lambda r: r["distance"])
    return out


def _audit_model(
    checkpoint: str | Path | None,
    t: Task,
    x_tr: np.ndarray,
    train_df: pd.DataFrame,
    seed: int,
    dev: str,
    epochs: int,
) -> Any:
    if checkpoint is None:
        y = train_df["label"].map({c: i for i, c in enumerate(t.classes)}).to_numpy(np.int64)
        return train_audit_classifier(x_tr, y, len(t.classes), seed=seed, device=dev, epochs=epochs)
    # torch (bench.train): only with a classifier checkpoint
    from bench.train import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    spec = getattr(model, "bench_spec", {}) or {}
    if spec.get("in_chans") not in (None, t.image.channels):
        raise BadInput(
            f"--checkpoint {checkpoint}: the model takes {spec['in_chans']} channel(s), the task {t.image.channels}"
        )
    if spec.get("num_classes") not in (None, len(t.classes)):
        raise BadInput(
            f"--checkpoint {checkpoint}: the model has {spec['num_classes']} classes, the task {len(t.classes)}"
        )
    return model
