"""The generator audit: memorization in each feature space plus contamination, written atomically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.generators.pipeline import load_pixels
from bench.io import atomic_dir, portable_path, write_json, write_table
from bench.manifest import Manifest, manifest_hash
from bench.privacy.contamination import _audit_model, contamination_problems, find_duplicates, prepare
from bench.privacy.memorization import (
    AUDIT_BACKBONE,
    FEATURES,
    MARGIN,
    NEAR_DUPLICATE,
    PIXEL_SIZE,
    RULE,
    SCHEMA_VERSION,
    classifier_features,
    memorization_stats,
    nearest_neighbors,
    pixel_features,
    shift_tolerant_nearest,
    short_hash,
)
from bench.tasks import Task

log = logging.getLogger(__name__)


# -- the audit ---------------------------------------------------------------------------------------------------


def audit(
    task: Task | str | Path,
    synthetic: str | Path,
    train: str | Path,
    holdout: str | Path,
    out: str | Path,
    *,
    card: str | Path | None = None,
    features: tuple[str, ...] | list[str] = FEATURES,
    checkpoint: str | Path | None = None,
    percentile: float = 5.0,
    test: str | Path | None = None,
    size: int | None = None,
    n_boot: int = 1000,
    near_duplicate: float = NEAR_DUPLICATE,
    seed: int = 0,
    device: str | None = None,
    classifier_epochs: int = 15,
    cache_dir: Path | None = None,
    n_pairs: int = 8,
) -> dict[str, Any]:
    """Run the audit and write OUT/privacy.json, OUT/distances.parquet and OUT/closest_pairs.png (atomically)."""
    features = tuple(features)
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise BadInput(
            f"--features {','.join(features)}: unknown {unknown} (choose from {', '.join(FEATURES)})"
        )
    if not 0 < percentile < 50:
        raise BadInput(f"--percentile {percentile}: must be in (0, 50)")
    if not near_duplicate > 0:
        raise BadInput(f"--near-duplicate {near_duplicate}: must be positive")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "privacy.json").exists():
        raise BadInput(f"--out {out}: a non-empty folder that is not a previous audit; choose another")
    inp = prepare(task, synthetic, train, holdout, card=card, test=test, size=size, seed=seed)
    t, s = inp.task, inp.size

    x_syn = load_pixels(inp.synthetic, t, s, cache_dir)
    x_tr = load_pixels(inp.train, t, s, cache_dir)
    x_cal = load_pixels(inp.calibration, t, s, cache_dir)
    x_fr = load_pixels(inp.fresh, t, s, cache_dir)
    ev_m = Manifest(inp.evaluation.assign(image=inp.evaluation["path"]), "/")
    x_ev = (
        load_pixels(ev_m, t, s, cache_dir) if len(ev_m) else np.zeros((0, t.image.channels, s, s), np.uint8)
    )

    dev = device or "auto"
    nn_dev = None if dev == "auto" else dev
    # Each feature space: (embed the reference set, nearest-reference search for query images).
    spaces: dict[str, Any] = {}
    if "pixel" in features:
        spaces["pixel"] = (pixel_features, lambda x, ref: shift_tolerant_nearest(x, ref, device=nn_dev))
    if "classifier" in features:
        model = _audit_model(checkpoint, t, x_tr, inp.train.df, seed, dev, classifier_epochs)
        # torch (bench.train): only for the classifier feature space
        from bench.train import resolve_device

        cdev = str(resolve_device(dev))

        def emb(x, _m=model):
            return classifier_features(_m, x, device=cdev)

        spaces["classifier"] = (emb, lambda x, ref, _e=emb: nearest_neighbors(_e(x), ref, device=nn_dev))

    by_feature: dict[str, Any] = {}
    rows = []
    nearest: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    holdout_px: dict[str, np.ndarray] = {}
    syn_ids = inp.synthetic.df["case_id"].astype(str).tolist()
    tr_ids = inp.train.df["case_id"].astype(str).tolist()
    for name, (embed_ref, search) in spaces.items():
        f_tr = embed_ref(x_tr)
        parts = {}
        for role, x, m in (
            ("synthetic", x_syn, inp.synthetic),
            ("holdout_calibration", x_cal, inp.calibration),
            ("holdout_fresh", x_fr, inp.fresh),
        ):
            d, idx = search(x, f_tr)
            parts[role] = (d, idx, m)
        st = memorization_stats(
            parts["synthetic"][0],
            parts["holdout_calibration"][0],
            parts["holdout_fresh"][0],
            percentile,
            cal_groups=inp.calibration.df["patient_id"].astype(str).to_numpy(),
            fresh_groups=inp.fresh.df["patient_id"].astype(str).to_numpy(),
            n_boot=n_boot,
            seed=seed,
        )
        by_feature[name] = st
        nearest[name] = parts["synthetic"][:2]
        holdout_px[name] = np.concatenate([parts["holdout_calibration"][0], parts["holdout_fresh"][0]])
        for role, (d, idx, m) in parts.items():
            ids = m.df["case_id"].astype(str)
            rows.append(
                pd.DataFrame(
                    {
                        "feature": name,
                        "role": role,
                        "case": ids if role == "synthetic" else ids.map(short_hash),
                        "nearest_train": [short_hash(tr_ids[j]) for j in idx],
                        "distance": d,
                        "below_threshold": d < st["threshold"],
                    }
                )
            )

    worst = max(by_feature, key=lambda k: (by_feature[k]["memorization_rate"], -list(by_feature).index(k)))
    head = by_feature[worst]

    problems = contamination_problems(inp.card, t, inp.train.df, inp.evaluation)
    # A near duplicate must be closer than any two distinct real patients are: the threshold is the stated one,
    # or half the smallest distance between a holdout image and a training image in this task, if that is lower.
    if "pixel" in holdout_px:
        real_min = float(holdout_px["pixel"].min())
    else:
        f_tr_px = pixel_features(x_tr)
        real_min = float(
            min(shift_tolerant_nearest(x, f_tr_px, device=nn_dev)[0].min() for x in (x_cal, x_fr) if len(x))
        )
    dup_threshold = float(min(near_duplicate, real_min / 2))
    dups = find_duplicates(x_syn, syn_ids, x_ev, inp.evaluation, dup_threshold, nn_dev)
    if dups:
        kinds = pd.Series([d["kind"] for d in dups]).value_counts().to_dict()
        problems.append(f"{len(dups)} synthetic image(s) duplicate validation/test/external images {kinds}")
    result = {
        "schema_version": SCHEMA_VERSION,
        "task": {"name": t.name, "version": t.version},
        "generator": inp.card.name,
        "generator_version": inp.card.version,
        "features": list(by_feature),
        "feature": worst,
        "percentile": float(percentile),
        "nominal_rate": head["nominal_rate"],
        "memorization_rate": head["memorization_rate"],
        "ci_low": head["ci_low"],
        "ci_high": head["ci_high"],
        "flagged": any(v["flagged"] for v in by_feature.values()),
        "flagged_by": [k for k, v in by_feature.items() if v["flagged"]],
        "rule": RULE,
        "margin": MARGIN,
        "holdout_rate": head["holdout_rate"],
        "n_synthetic": len(x_syn),
        "n_train": len(x_tr),
        "n_holdout": len(x_cal) + len(x_fr),
        "n_holdout_calibration": len(x_cal),
        "n_holdout_fresh": len(x_fr),
        "image_size": s,
        "pixel_feature_size": min(PIXEL_SIZE, s),
        "classifier": (
            None
            if "classifier" not in by_feature
            else {
                "checkpoint": portable_path(checkpoint, (out.parent.parent, Path.cwd()))
                if checkpoint
                else None,
                "backbone": AUDIT_BACKBONE if not checkpoint else None,
            }
        ),
        "by_feature": by_feature,
        "contamination": {
            "status": "fail" if problems else "pass",
            "problems": problems,
            "duplicates": dups,
            "near_duplicate_threshold": dup_threshold,
            "near_duplicate_rule": (
                f"pixel-feature distance < min({near_duplicate:g}, half the smallest real holdout-to-training "
                f"distance {real_min:.4f})"
            ),
            "n_checked": len(x_ev),
        },
        "manifests": {
            "synthetic": inp.synthetic.sha256,
            "train": inp.train.sha256,
            "holdout": manifest_hash(pd.concat([inp.calibration.df, inp.fresh.df], ignore_index=True)),
        },
        "n_bootstrap": n_boot,
        "seed": seed,
    }
    with atomic_dir(out, overwrite=True) as tmp:
        write_table(tmp / "distances.parquet", pd.concat(rows, ignore_index=True))
        d, idx = nearest[worst]
        closest_pairs_png(tmp / "closest_pairs.png", x_syn, x_tr, d, idx, head["threshold"], worst, n_pairs)
        write_json(tmp / "privacy.json", result)
    return result


def closest_pairs_png(
    path: Path,
    x_syn: np.ndarray,
    x_tr: np.ndarray,
    dist: np.ndarray,
    idx: np.ndarray,
    threshold: float,
    feature: str,
    n_pairs: int = 8,
) -> None:
    """A grid: the synthetic images closest to a training image (top row) above that training image (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(dist, kind="stable")[:n_pairs]
    k = max(1, len(order))
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.6), squeeze=False)
    for col in range(k):
        for row in range(2):
            axes[row, col].axis("off")
        if col >= len(order):
            continue
        i = int(order[col])
        for row, img in ((0, x_syn[i]), (1, x_tr[int(idx[i])])):
            a = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
            axes[row, col].imshow(a, cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=255)
        mark = " *" if dist[i] < threshold else ""
        axes[0, col].set_title(f"d={dist[i]:.3f}{mark}", fontsize=8)
    axes[0, 0].text(
        -0.15, 0.5, "synthetic", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right"
    )
    axes[1, 0].text(
        -0.15, 0.5, "nearest\ntraining", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right"
    )
    fig.suptitle(
        f"closest synthetic-training pairs ({feature} features; * below holdout threshold {threshold:.3f})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
