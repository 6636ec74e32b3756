"""Memorization and contamination audit of a synthetic set against the generator's training data.

Memorization. Every image is embedded with fixed features:

- `pixel`: the image area-averaged to at most 16 x 16 pixels, each image's mean subtracted, L2-normalized (so the
  distance is a function of the correlation between two images and ignores global brightness). Distances are
  taken up to a translation of the query by at most one pixel per axis (the minimum over the 9 shifts), because a
  copy moved by a pixel is still a copy but on textured images sits as far from its source as a stranger;
- `classifier`: the penultimate features of a classifier trained by the suite on the real training images (a run's
  `checkpoint.pt`, or a small one trained here), L2-normalized. No downloaded weights.

For each synthetic image the distance to its nearest generator-training image is compared with the same distance
for real holdout images the generator never saw (training sites, patients not in the training set). The holdout is
split by patient into two halves: the *calibration* half sets the threshold `t` = its `percentile`-th percentile of
nearest-training distances; the *fresh* half is scored exactly like the synthetic set, so its rate shows what an
independent draw from the real distribution gets (the nominal rate, `percentile` / 100, up to sampling error).

    memorization_rate = share of synthetic images with distance < t

The interval is a percentile bootstrap that resamples calibration patients (re-deriving `t`) and synthetic images.
A feature space flags the set when **rate >= 2 x nominal and the interval's lower bound > nominal** (`RULE`): twice
the rate a real unseen sample would show, and not explainable by sampling error. The set is flagged if any feature
space flags it; the headline numbers are those of the feature space with the highest rate.

Contamination. The card's training sites must not include the task's external sites; its training patients (hashed)
must not be validation, test or external patients; the training manifest must hold only `split == train` rows;
and no synthetic image may be an exact (identical pixels) or near duplicate of a validation, test or external image
(shift-tolerant pixel-feature distance below `near_duplicate`, or below half the smallest distance between any real
holdout image and a training image if that is lower: closer than two distinct real patients ever are). Any of
these fails the check.

Only hashed ids (SHA-256, first 16 hex characters for cases) leave in the outputs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.generators.card import GeneratorCard, find_card, hash_id, read_card
from bench.io import atomic_dir, write_json, write_table
from bench.manifest import Manifest, load_valid_manifest, manifest_hash
from bench.tasks import Task, load_task

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FEATURES = ("pixel", "classifier")
PIXEL_SIZE = 16
MAX_SHIFT = 1
MARGIN = 2.0
RULE = "flagged if memorization_rate >= 2 x nominal_rate and ci_low > nominal_rate (in any feature space)"
NEAR_DUPLICATE = 0.1
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MIN_HOLDOUT = 20
AUDIT_BACKBONE = "resnet10t"


def short_hash(value: Any) -> str:
    return hash_id(value)[:16]


# -- features ----------------------------------------------------------------------------------------------------


def pixel_features(
    images: np.ndarray, size: int = PIXEL_SIZE, shift: tuple[int, int] = (0, 0), batch: int = 4096
) -> np.ndarray:
    """float32 `[N, C*s*s]`: optionally translated by `shift` = (dy, dx) whole pixels (edges repeated), then
    area-downsampled to s = min(size, S), mean-centred and L2-normalized."""
    import torch
    import torch.nn.functional as F

    n = len(images)
    s = min(int(size), int(images.shape[-1]))
    dy, dx = (int(v) for v in shift)
    pad = max(abs(dy), abs(dx))
    out = np.empty((n, images.shape[1] * s * s), dtype=np.float32)
    for k in range(0, n, batch):
        x = torch.from_numpy(np.ascontiguousarray(images[k : k + batch])).float()
        if pad:
            S = x.shape[-1]
            x = F.pad(x, (pad, pad, pad, pad), mode="replicate")[
                :, :, pad - dy : pad - dy + S, pad - dx : pad - dx + S
            ]
        if x.shape[-1] != s:
            x = F.interpolate(x, size=(s, s), mode="area")
        x = x.flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        # A flat image has no direction; it maps to the zero vector (distance 1 from every unit vector).
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
        out[k : k + batch] = x.numpy()
    return out


def shift_tolerant_nearest(
    query_images: np.ndarray, ref_feats: np.ndarray, max_shift: int = MAX_SHIFT, device: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-space nearest neighbour up to a translation of the query by at most `max_shift` pixels per axis.

    A copy moved by a pixel is still a copy, but on textured images (noise, CT grain) it is as far from its source
    in plain pixel space as an unrelated image. Real holdout images are scored the same way, so the calibration
    stays like for like.
    """
    best_d = np.full(len(query_images), np.inf)
    best_i = np.zeros(len(query_images), dtype=np.int64)
    r = range(-int(max_shift), int(max_shift) + 1)
    for dy in r:
        for dx in r:
            d, i = nearest_neighbors(pixel_features(query_images, shift=(dy, dx)), ref_feats, device=device)
            better = d < best_d
            best_d[better], best_i[better] = d[better], i[better]
    return best_d, best_i


def classifier_features(model: Any, images: np.ndarray, device: str = "cpu", batch: int = 256) -> np.ndarray:
    """L2-normalized penultimate features of `model` for uint8 images, normalized as bench.train does."""
    import torch

    from bench.models import embed
    from bench.train import _to_float

    dev = torch.device(device)
    model = model.to(dev).eval()
    feats = []
    for k in range(0, len(images), batch):
        x = _to_float(torch.from_numpy(np.ascontiguousarray(images[k : k + batch])).to(dev))
        f = embed(model, x).float()
        feats.append(torch.nn.functional.normalize(f, dim=1).cpu().numpy())
    return np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, 0), np.float32)


def train_audit_classifier(
    x: np.ndarray, y: np.ndarray, num_classes: int, *, seed: int = 0, device: str = "auto", epochs: int = 15
) -> Any:
    """A small classifier on the generator's training images, for the `classifier` feature space.

    Its checkpoint is selected on a seeded 20% of those same images: the holdout and the synthetic set must both be
    unseen by the feature extractor, or the comparison between them would be biased.
    """
    from bench.train import FitSettings, fit

    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    nv = max(2, len(x) // 5)
    val, tr = perm[:nv], perm[nv:]
    settings = FitSettings(
        backbone=AUDIT_BACKBONE,
        num_classes=num_classes,
        epochs=epochs,
        lr=1e-3,
        weight_decay=1e-4,
        batch_size=min(64, max(2, len(tr))),
        aug_strength=0.5,
        seed=seed,
        device=device,
        select="best_val",  # its validation images are its own training distribution
    )
    model, _ = fit(settings, x[tr], y[tr], x[val], y[val])
    return model


# -- nearest neighbours ------------------------------------------------------------------------------------------


def nearest_neighbors(
    query: np.ndarray,
    ref: np.ndarray,
    *,
    block: int = 2048,
    ref_block: int = 8192,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean nearest neighbour of every query row among `ref` rows: (distance float64, index int64).

    Blocked brute force with torch: ||r||^2 - 2 q.r in float32 over `block` x `ref_block` tiles, keeping
    a running best two per query; the two candidates are then re-scored in float64 and the closer kept (the lower
    index on a tie, as scikit-learn does). Working memory is about 4 * block * ref_block bytes (64 MiB by default)
    whatever the set sizes; on CUDA the tiles run on the GPU.
    """
    import torch

    q_np = np.ascontiguousarray(query, dtype=np.float32)
    r_np = np.ascontiguousarray(ref, dtype=np.float32)
    if q_np.ndim != 2 or r_np.ndim != 2 or q_np.shape[1] != r_np.shape[1]:
        raise ValueError(f"nearest_neighbors: shapes {q_np.shape} and {r_np.shape} do not match")
    n, m = len(q_np), len(r_np)
    if m == 0:
        raise ValueError("nearest_neighbors: empty reference set")
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    r = torch.from_numpy(r_np)
    if dev.type == "cuda":
        r = r.to(dev)
    r_sq = (r * r).sum(1)
    k = min(2, m)
    cand = np.empty((n, k), dtype=np.int64)
    with torch.no_grad():
        for i0 in range(0, n, block):
            # ||q||^2 is the same for every reference of a query, so ranking needs only ||r||^2 - 2 q.r.
            qb = torch.from_numpy(q_np[i0 : i0 + block]).to(dev) * -2.0  # a new tensor: q_np stays intact
            best_d = torch.full((len(qb), k), math.inf, device=dev)
            best_i = torch.zeros((len(qb), k), dtype=torch.long, device=dev)
            for j0 in range(0, m, ref_block):
                rb = r[j0 : j0 + ref_block].to(dev)
                score = torch.addmm(r_sq[j0 : j0 + ref_block].to(dev)[None, :], qb, rb.T)
                vals, idx = torch.topk(score, min(k, rb.shape[0]), dim=1, largest=False)
                all_d = torch.cat([best_d, vals], 1)
                all_i = torch.cat([best_i, idx + j0], 1)
                sel = torch.topk(all_d, k, dim=1, largest=False).indices
                best_d, best_i = all_d.gather(1, sel), all_i.gather(1, sel)
            cand[i0 : i0 + len(qb)] = best_i.cpu().numpy()
    # float64 re-scoring of the two candidates fixes float32 rounding in near ties.
    q64 = q_np.astype(np.float64)
    dist = np.stack(
        [np.sqrt(((q64 - r_np[cand[:, j]].astype(np.float64)) ** 2).sum(1)) for j in range(k)], axis=1
    )
    pick = np.zeros(n, dtype=np.int64)
    if k == 2:
        d0, d1 = dist[:, 0], dist[:, 1]
        pick = np.where((d1 < d0) | ((d1 == d0) & (cand[:, 1] < cand[:, 0])), 1, 0)
    rows = np.arange(n)
    return dist[rows, pick], cand[rows, pick]


# -- statistics --------------------------------------------------------------------------------------------------


def quantile_ci(values: np.ndarray, q: float, level: float = 0.95) -> tuple[float, float, float]:
    """The q-quantile with a distribution-free order-statistic interval (binomial ranks)."""
    from scipy.stats import binom

    v = np.sort(np.asarray(values, dtype=float))
    n = len(v)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    a = (1 - level) / 2
    lo = int(binom.ppf(a, n, q))
    hi = int(binom.ppf(1 - a, n, q))
    return float(np.quantile(v, q)), float(v[max(lo - 1, 0)]), float(v[min(hi, n - 1)])


class _ClusterSampler:
    """Patient-cluster bootstrap: draw patients with replacement, take all their rows (vectorized)."""

    def __init__(self, groups: np.ndarray):
        _, inv = np.unique(groups, return_inverse=True)
        self.order = np.argsort(inv, kind="stable")
        self.sizes = np.bincount(inv)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.singletons = bool((self.sizes == 1).all())

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        k = len(self.sizes)
        pick = rng.integers(k, size=k)
        if self.singletons:
            return self.order[pick]
        lengths = self.sizes[pick]
        # Row positions: each picked patient's start, then 0..size-1 within it.
        offs = np.repeat(self.starts[pick] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return self.order[offs + np.arange(lengths.sum())]


def memorization_stats(
    d_syn: np.ndarray,
    d_cal: np.ndarray,
    d_fresh: np.ndarray,
    percentile: float,
    *,
    cal_groups: np.ndarray | None = None,
    fresh_groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    margin: float = MARGIN,
) -> dict[str, Any]:
    """Memorization rate of `d_syn` against the calibration threshold, with bootstrap intervals (see module doc)."""
    d_syn, d_cal, d_fresh = (np.asarray(a, dtype=float) for a in (d_syn, d_cal, d_fresh))
    nominal = percentile / 100.0
    thr = float(np.percentile(d_cal, percentile))
    rate = float(np.mean(d_syn < thr))
    fresh_rate = float(np.mean(d_fresh < thr)) if len(d_fresh) else math.nan
    rng = np.random.default_rng(seed)
    cal_groups = np.arange(len(d_cal)) if cal_groups is None else np.asarray(cal_groups)
    fresh_groups = np.arange(len(d_fresh)) if fresh_groups is None else np.asarray(fresh_groups)
    syn_sorted = np.sort(d_syn)
    cal_sampler, fresh_sampler = (
        _ClusterSampler(cal_groups),
        _ClusterSampler(fresh_groups) if len(d_fresh) else None,
    )
    rates, fresh_rates = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        t_b = np.percentile(d_cal[cal_sampler(rng)], percentile)
        # A bootstrap resample of n synthetic images puts Binomial(n, F(t)) of them below t: no n-sized draw needed.
        p_b = np.searchsorted(syn_sorted, t_b, side="left") / len(d_syn)
        rates[b] = rng.binomial(len(d_syn), p_b) / len(d_syn)
        if len(d_fresh):
            fresh_rates[b] = np.mean(d_fresh[fresh_sampler(rng)] < t_b)
    lo, hi = (float(x) for x in np.percentile(rates, [2.5, 97.5]))
    out = {
        "nominal_rate": nominal,
        "threshold": thr,
        "memorization_rate": rate,
        "ci_low": lo,
        "ci_high": hi,
        "flagged": bool(rate >= margin * nominal and lo > nominal),
        "holdout_rate": fresh_rate,
    }
    if len(d_fresh):
        out["holdout_ci_low"], out["holdout_ci_high"] = (
            float(x) for x in np.percentile(fresh_rates, [2.5, 97.5])
        )
    out["quantiles"] = {
        "synthetic": _quantiles(d_syn),
        "holdout": _quantiles(np.concatenate([d_cal, d_fresh])),
    }
    med_h = np.median(np.concatenate([d_cal, d_fresh]))
    out["median_ratio"] = float(np.median(d_syn) / med_h) if med_h > 0 else math.nan
    return out


def _quantiles(v: np.ndarray) -> dict[str, dict[str, float]]:
    res = {}
    for q in QUANTILES:
        val, lo, hi = quantile_ci(v, q)
        res[f"q{int(round(q * 100)):02d}"] = {"value": val, "ci_low": lo, "ci_high": hi}
    return res


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
    from bench.generators.importer import check_image_set, image_shape

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
    ev = [ho.df.assign(path=[str(p) for p in ho.image_paths()])]
    if test is not None:
        tm = load_valid_manifest(test, task)
        ev.append(tm.df.assign(path=[str(p) for p in tm.image_paths()]))
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
    from bench.generators.pipeline import load_pixels

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
                "checkpoint": str(checkpoint) if checkpoint else None,
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
