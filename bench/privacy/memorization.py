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
from typing import Any

import numpy as np
from scipy.stats import binom

from bench.generators.card import hash_id

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

    # torch (bench.models, bench.train): only when features are computed
    from bench.models import embed
    from bench.train import to_float

    dev = torch.device(device)
    model = model.to(dev).eval()
    feats = []
    for k in range(0, len(images), batch):
        x = to_float(torch.from_numpy(np.ascontiguousarray(images[k : k + batch])).to(dev))
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
    # torch (bench.train): only when the audit trains its own classifier
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
