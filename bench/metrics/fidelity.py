"""Fidelity, diversity and label-fidelity statistics of a synthetic image set: features in, numbers out.

Nothing here reads files or runs a network; `bench.fidelity` computes the features and calls these.

- Fréchet distance (Heusel et al. 2017): ||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^{1/2}), with unbiased
  covariances; interval: image bootstrap percentiles shifted by the bootstrap's bias estimate, clipped at 0. The trace of the square root is taken as the sum of square roots of the eigenvalues of
  S_r^{1/2} S_s S_r^{1/2} (the same spectrum as S_r S_s, but symmetric, so `eigh` applies and no complex
  rounding residue appears).
- KID (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
  averaged over random subsets of min(1000, half the smaller set) rows (`kid_subset_size`: a subset as large as
  the set would be the same rows every time); its interval is the 2.5-97.5 percentile range of the subset
  estimates (the spread of KID at that subset size: conservative for the mean).
- Precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020): each sample's k-NN
  ball (radius = distance to its k-th nearest neighbour in its own set, itself excluded); a point lies in a ball
  when its distance is <= the radius. Intervals resample the scored points with the balls held fixed.
- Diversity: within-class spread sqrt(2 tr S) (the root-mean-square distance between two distinct members: the
  mean of ||x_i - x_j||^2 over pairs i != j equals 2 tr S exactly), synthetic over real; and the share of synthetic
  images with a near duplicate among the other synthetic images (closer than the 1st percentile of real
  nearest-neighbour distances, so an independent real sample of the same size scores about 0.01).
- Label fidelity: accuracy and macro AUROC of a classifier's probabilities against the synthetic images'
  conditioning labels, with image bootstrap intervals.

Pairwise work (k-NN radii, ball membership, kernel sums) runs in torch over `tile` x `tile` blocks, on the GPU when
there is one: working memory is about 4 * tile^2 bytes plus the features themselves, whatever the set sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from bench.metrics.core import AurocKernel

TILE = 4096
K_NN = 5
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
DUPLICATE_PERCENTILE = 1.0


@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan

    def as_dict(self) -> dict[str, float | None]:
        return {
            k: _none_if_nan(v)
            for k, v in (("value", self.value), ("ci_low", self.ci_low), ("ci_high", self.ci_high))
        }


def _none_if_nan(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _device(device: str | None) -> Any:
    import torch  # heavy: only the pairwise kernels need it

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as2d(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64 if np.asarray(x).dtype == np.float64 else np.float32)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-d feature array, got shape {a.shape}")
    return a


def _percentile_ci(reps: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    reps = np.asarray(reps, dtype=float)
    reps = reps[np.isfinite(reps)]
    if len(reps) == 0:
        return math.nan, math.nan
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(reps, [a, 100 - a])
    return float(lo), float(hi)


def _multinomial_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


# -- Fréchet distance ----------------------------------------------------------------------------------------------


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) for Gaussians N(mu1, S1), N(mu2, S2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, float)), np.atleast_1d(np.asarray(mu2, float))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, float)), np.atleast_2d(np.asarray(sigma2, float))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def _factor(x: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and a factor A with A^T A = the unbiased covariance (integer bootstrap weights summing to n allowed)."""
    n = len(x)
    w = np.ones(n) if w is None else np.asarray(w, float)
    mu = w @ x / n
    return mu, np.sqrt(w / (n - 1))[:, None] * (x - mu)


def _frechet_factored(mu1: np.ndarray, a1: np.ndarray, mu2: np.ndarray, a2: np.ndarray) -> float:
    # With S = A^T A, Tr((S1 S2)^1/2) is the nuclear norm of A1 A2^T (the nonzero eigenvalues of S1 S2 are those
    # of (A1 A2^T)(A1 A2^T)^T): an n1 x n2 problem, cheaper than d x d when a set has fewer images than dimensions.
    if min(len(a1), len(a2)) >= a1.shape[1]:
        return frechet_distance(mu1, a1.T @ a1, mu2, a2.T @ a2)
    nuclear = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum())
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2.0 * nuclear)


def frechet_features(real: Any, synthetic: Any, *, n_boot: int = 0, seed: int = 0) -> Estimate:
    """Fréchet distance between the Gaussians fitted to two feature sets; a percentile bootstrap interval over
    images (both sets resampled) when n_boot > 0. Needs at least 2 rows per set."""
    r, s = _as2d(real, "real").astype(np.float64), _as2d(synthetic, "synthetic").astype(np.float64)
    if len(r) < 2 or len(s) < 2:
        return Estimate(math.nan)
    # Non-negative in exact arithmetic; rounding can leave -1e-14 for identical sets.
    value = max(0.0, _frechet_factored(*_factor(r), *_factor(s)))
    if n_boot <= 0:
        return Estimate(value)
    rng = np.random.default_rng(seed)
    wr, ws = _multinomial_weights(len(r), n_boot, rng), _multinomial_weights(len(s), n_boot, rng)
    reps = np.array([_frechet_factored(*_factor(r, wr[b]), *_factor(s, ws[b])) for b in range(n_boot)])
    # A resample repeats images, which alone inflates the distance: the percentile interval is shifted back by the
    # bootstrap's estimate of that bias (mean replicate minus estimate) and clipped at 0.
    bias = float(np.mean(reps) - value)
    lo, hi = _percentile_ci(reps)
    return Estimate(value, max(0.0, min(lo - bias, value)), max(hi - bias, value))


# -- tiled pairwise kernels ---------------------------------------------------------------------------------------


def _to_torch(x: np.ndarray, dev: Any) -> Any:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t.to(dev) if dev.type == "cuda" else t


def _sq_dist(a: Any, b: Any, a2: Any, b2: Any) -> Any:
    import torch

    d = torch.addmm(a2[:, None] + b2[None, :], a, b.T, alpha=-2.0)
    return d.clamp_min_(0.0)


def _centre(*sets: np.ndarray) -> list[np.ndarray]:
    # Distances do not change under a common shift; centring first keeps |a|^2 + |b|^2 - 2a.b well conditioned in
    # float32 (a copy then lands at ~0, not at the rounding error of two large norms).
    mu = np.concatenate([np.asarray(s, np.float64) for s in sets]).mean(0) if sets else 0
    return [np.asarray(s, np.float64) - mu for s in sets]


def knn_radii(x: Any, k: int = K_NN, *, tile: int = TILE, device: str | None = None) -> np.ndarray:
    """Distance of every row to its k-th nearest other row of the same set (float64; inf if the set has <= k rows)."""
    import torch

    (xc,) = _centre(_as2d(x, "x"))
    n = len(xc)
    if n <= k:
        return np.full(n, np.inf)
    dev = _device(device)
    t = _to_torch(xc, dev)
    t2 = (t * t).sum(1)
    out = np.empty(n)
    kk = k + 1  # the row itself is among the smallest (distance 0)
    with torch.no_grad():
        for i0 in range(0, n, tile):
            a, a2 = t[i0 : i0 + tile].to(dev), t2[i0 : i0 + tile].to(dev)
            best = torch.full((len(a), kk), math.inf, device=dev)
            for j0 in range(0, n, tile):
                d = _sq_dist(a, t[j0 : j0 + tile].to(dev), a2, t2[j0 : j0 + tile].to(dev))
                if j0 <= i0 < j0 + d.shape[1]:
                    # Self-distances are exactly 0 (float32 rounding could put a near twin below them).
                    idx = torch.arange(len(a), device=dev)
                    d[idx, idx + (i0 - j0)] = 0.0
                m = min(kk, d.shape[1])
                vals = torch.topk(d, m, dim=1, largest=False).values
                best = torch.topk(torch.cat([best, vals], 1), kk, dim=1, largest=False).values
            out[i0 : i0 + len(a)] = best[:, k].sqrt().double().cpu().numpy()
    return out


def nearest_other(x: Any, *, tile: int = TILE, device: str | None = None) -> np.ndarray:
    """Distance of every row to its nearest other row of the same set."""
    return knn_radii(x, 1, tile=tile, device=device)


@dataclass(frozen=True)
class Manifold:
    """Per-point results of one tiled pass over real x synthetic distances, before averaging."""

    real_radii: np.ndarray  # k-NN radius of each real point
    synthetic_radii: np.ndarray
    in_real_balls: np.ndarray  # per synthetic point: how many real balls contain it
    covered: np.ndarray  # per real point: a synthetic point lies in its ball
    recalled: np.ndarray  # per real point: it lies in some synthetic ball
    k: int


def manifold(
    real: Any, synthetic: Any, k: int = K_NN, *, tile: int = TILE, device: str | None = None
) -> Manifold:
    """k-NN balls of both sets and the membership counts PRDC needs, tiled (memory independent of N)."""
    import torch

    r_np, s_np = _centre(_as2d(real, "real"), _as2d(synthetic, "synthetic"))
    rr = knn_radii(r_np, k, tile=tile, device=device)
    sr = knn_radii(s_np, k, tile=tile, device=device)
    dev = _device(device)
    r, s = _to_torch(r_np, dev), _to_torch(s_np, dev)
    r2, s2 = (r * r).sum(1), (s * s).sum(1)
    # Squared radii compared with squared distances: no square root over the big tiles.
    rr2 = torch.from_numpy(np.square(rr)).float().to(dev)
    sr2 = torch.from_numpy(np.square(sr)).float().to(dev)
    n, m = len(r_np), len(s_np)
    count = torch.zeros(m, dtype=torch.int64, device=dev)
    covered = torch.zeros(n, dtype=torch.bool, device=dev)
    recalled = torch.zeros(n, dtype=torch.bool, device=dev)
    with torch.no_grad():
        for i0 in range(0, n, tile):
            a, a2, ra = r[i0 : i0 + tile].to(dev), r2[i0 : i0 + tile].to(dev), rr2[i0 : i0 + tile]
            for j0 in range(0, m, tile):
                d = _sq_dist(a, s[j0 : j0 + tile].to(dev), a2, s2[j0 : j0 + tile].to(dev))
                inside_real = d <= ra[:, None]
                count[j0 : j0 + d.shape[1]] += inside_real.sum(0)
                covered[i0 : i0 + len(a)] |= inside_real.any(1)
                recalled[i0 : i0 + len(a)] |= (d <= sr2[None, j0 : j0 + d.shape[1]]).any(1)
    return Manifold(rr, sr, count.cpu().numpy(), covered.cpu().numpy(), recalled.cpu().numpy(), int(k))


def prdc(
    real: Any,
    synthetic: Any,
    k: int = K_NN,
    *,
    n_boot: int = 0,
    seed: int = 0,
    tile: int = TILE,
    device: str | None = None,
) -> dict[str, Estimate]:
    """Precision, recall, density and coverage. NaN when either set has <= k points."""
    n, m = len(real), len(synthetic)
    if n <= k or m <= k:
        return {name: Estimate(math.nan) for name in ("precision", "recall", "density", "coverage")}
    mf = manifold(real, synthetic, k, tile=tile, device=device)
    per_syn = {"precision": (mf.in_real_balls > 0).astype(float), "density": mf.in_real_balls / float(k)}
    per_real = {"recall": mf.recalled.astype(float), "coverage": mf.covered.astype(float)}
    rng = np.random.default_rng(seed)
    out = {}
    for group, size in ((per_syn, m), (per_real, n)):
        w = _multinomial_weights(size, n_boot, rng) if n_boot > 0 else None
        for name, v in group.items():
            value = float(v.mean())
            ci = _percentile_ci(w @ v / size) if w is not None else (math.nan, math.nan)
            out[name] = Estimate(value, *ci)
    return {name: out[name] for name in ("precision", "recall", "density", "coverage")}


def _kernel_sum(a: Any, b: Any, d: int, tile: int, dev: Any, exclude_diagonal: bool) -> float:
    import torch

    total = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.no_grad():
        for i0 in range(0, len(a), tile):
            x = a[i0 : i0 + tile].to(dev)
            for j0 in range(0, len(b), tile):
                kern = torch.addmm(torch.ones((), device=dev), x, b[j0 : j0 + tile].to(dev).T, alpha=1.0 / d)
                kern = kern.pow_(3)
                if exclude_diagonal and j0 <= i0 < j0 + kern.shape[1]:
                    idx = torch.arange(len(x), device=dev)
                    kern[idx, idx + (i0 - j0)] = 0.0
                total += kern.sum(dtype=torch.float64)
    return float(total)


def mmd2_unbiased(x: Any, y: Any, *, tile: int = TILE, device: str | None = None) -> float:
    """Unbiased MMD^2 of two feature sets under k(a, b) = (a.b / d + 1)^3 (tiled kernel sums)."""
    xa, ya = _as2d(x, "x"), _as2d(y, "y")
    m, n, d = len(xa), len(ya), xa.shape[1]
    if m < 2 or n < 2:
        return math.nan
    dev = _device(device)
    xt, yt = _to_torch(xa, dev), _to_torch(ya, dev)
    kxx = _kernel_sum(xt, xt, d, tile, dev, True) / (m * (m - 1))
    kyy = _kernel_sum(yt, yt, d, tile, dev, True) / (n * (n - 1))
    kxy = _kernel_sum(xt, yt, d, tile, dev, False) / (m * n)
    return kxx + kyy - 2.0 * kxy


def kid_subset_size(n_real: int, n_synthetic: int, subset_size: int = KID_SUBSET_SIZE) -> int:
    """min(subset_size, half the smaller set), at least 2: subsets must differ from draw to draw, or the subset
    spread (the interval) is zero however much the images vary (342 of 342 gave KID 0.0957 [0.0957, 0.0957])."""
    half = min(int(n_real), int(n_synthetic)) // 2
    return min(int(subset_size), max(2, half), int(n_real), int(n_synthetic))


def kid(
    real: Any,
    synthetic: Any,
    *,
    n_subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    tile: int = TILE,
    device: str | None = None,
) -> tuple[Estimate, float, int]:
    """KID: mean unbiased MMD^2 over `n_subsets` random subsets of `kid_subset_size` rows of each set (drawn
    without replacement). Returns (estimate with subset-percentile interval, sd, subset size)."""
    r, s = _as2d(real, "real"), _as2d(synthetic, "synthetic")
    size = kid_subset_size(len(r), len(s), subset_size)
    if size < 2:
        return Estimate(math.nan), math.nan, size
    rng = np.random.default_rng(seed)
    vals = np.array(
        [
            mmd2_unbiased(
                r[rng.choice(len(r), size, replace=False)],
                s[rng.choice(len(s), size, replace=False)],
                tile=tile,
                device=device,
            )
            for _ in range(max(1, int(n_subsets)))
        ]
    )
    sd = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
    return Estimate(float(vals.mean()), *_percentile_ci(vals)), sd, size


# -- diversity ----------------------------------------------------------------------------------------------------


def spread(x: Any) -> float:
    """sqrt(2 tr S): the root-mean-square distance between two distinct rows."""
    a = _as2d(x, "x").astype(np.float64)
    if len(a) < 2:
        return math.nan
    return float(math.sqrt(2.0 * a.var(0, ddof=1).sum()))


def _spread_reps(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n = len(x)
    mean = w @ x / n
    second = w @ (x * x) / n
    tr = (second - mean * mean).sum(1) * n / (n - 1)
    return np.sqrt(2.0 * np.clip(tr, 0, None))


def spread_ratio(
    real: Any, synthetic: Any, *, n_boot: int = 0, seed: int = 0
) -> tuple[Estimate, float, float]:
    """Synthetic spread over real spread (1: as diverse as real; below 1: collapsed). Returns (ratio, real, syn)."""
    r, s = _as2d(real, "real").astype(np.float64), _as2d(synthetic, "synthetic").astype(np.float64)
    sr, ss = spread(r), spread(s)
    if not (math.isfinite(sr) and math.isfinite(ss)) or sr == 0:
        return Estimate(math.nan), sr, ss
    value = ss / sr
    if n_boot <= 0:
        return Estimate(value), sr, ss
    rng = np.random.default_rng(seed)
    reps_r = _spread_reps(r, _multinomial_weights(len(r), n_boot, rng))
    reps_s = _spread_reps(s, _multinomial_weights(len(s), n_boot, rng))
    with np.errstate(divide="ignore", invalid="ignore"):
        return Estimate(value, *_percentile_ci(reps_s / reps_r)), sr, ss


def class_centred(x: Any, labels: Any) -> np.ndarray:
    """Each row minus its class mean: pooled within-class spread is the spread of these."""
    a = _as2d(x, "x").astype(np.float64).copy()
    lab = np.asarray(labels)
    for c in np.unique(lab):
        sel = lab == c
        a[sel] -= a[sel].mean(0)
    return a


def near_duplicate_rate(
    real: Any,
    synthetic: Any,
    *,
    percentile: float = DUPLICATE_PERCENTILE,
    n_boot: int = 0,
    seed: int = 0,
    tile: int = TILE,
    device: str | None = None,
) -> tuple[Estimate, float, int]:
    """Share of synthetic images whose nearest other synthetic image is closer than the `percentile`-th percentile
    of real nearest-neighbour distances. Both sets are cut to the same size (a seeded subsample of the larger),
    because nearest-neighbour distances shrink as a set grows. Returns (rate, threshold, size used)."""
    r, s = _as2d(real, "real"), _as2d(synthetic, "synthetic")
    size = min(len(r), len(s))
    if size < 2:
        return Estimate(math.nan), math.nan, size
    rng = np.random.default_rng(seed)
    r = r[np.sort(rng.choice(len(r), size, replace=False))] if len(r) > size else r
    s = s[np.sort(rng.choice(len(s), size, replace=False))] if len(s) > size else s
    thr = float(np.percentile(nearest_other(r, tile=tile, device=device), percentile))
    dup = (nearest_other(s, tile=tile, device=device) < thr).astype(float)
    ci = (math.nan, math.nan)
    if n_boot > 0:
        ci = _percentile_ci(_multinomial_weights(size, n_boot, rng) @ dup / size)
    return Estimate(float(dup.mean()), *ci), thr, size


# -- label fidelity -----------------------------------------------------------------------------------------------


def label_fidelity(
    y: Any, proba: Any, n_classes: int, *, n_boot: int = 0, seed: int = 0
) -> dict[str, Estimate | dict[int, Estimate]]:
    """Accuracy (argmax = label) and macro one-vs-rest AUROC over all images; per class: the accuracy among that
    class's images and its one-vs-rest AUROC. Intervals: percentile bootstrap over images."""
    yv = np.asarray(y, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    n = len(yv)
    if n == 0:
        nan = Estimate(math.nan)
        return {"accuracy": nan, "auroc": nan, "class_accuracy": {}, "class_auroc": {}}
    rng = np.random.default_rng(seed)
    W = np.vstack([np.ones(n), _multinomial_weights(n, n_boot, rng)]) if n_boot > 0 else np.ones((1, n))
    correct = (p.argmax(1) == yv).astype(float)

    def est(vals: np.ndarray) -> Estimate:
        return Estimate(
            float(vals[0]), *(_percentile_ci(vals[1:]) if len(vals) > 1 else (math.nan, math.nan))
        )

    with np.errstate(divide="ignore", invalid="ignore"):
        acc = W @ correct / W.sum(1)
    kernels = [AurocKernel(yv == c, p[:, c]) for c in range(n_classes)]
    per_class = np.column_stack([kern(W) for kern in kernels])
    ok = ~np.isnan(per_class)
    with np.errstate(divide="ignore", invalid="ignore"):
        macro = np.where(ok, per_class, 0).sum(1) / ok.sum(1)
    class_acc = {}
    for c in range(n_classes):
        sel = (yv == c).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            class_acc[c] = est(W @ (correct * sel) / (W @ sel))
    return {
        "accuracy": est(acc),
        "auroc": est(macro),
        "class_accuracy": class_acc,
        "class_auroc": {c: est(per_class[:, c]) for c in range(n_classes)},
    }


# -- does fidelity predict utility? --------------------------------------------------------------------------------


def _rank(v: np.ndarray) -> np.ndarray:
    return rankdata(v, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / den, np.nan)


def rank_correlation(x: Any, y: Any, *, n_boot: int = 2000, seed: int = 0) -> dict[str, float | int | None]:
    """Spearman's rank correlation of paired values (e.g. one fidelity metric and utility across generators) with a
    percentile bootstrap interval that resamples the pairs. Resamples whose ranks are all tied are dropped
    (`n_boot_used`). With a handful of generators the interval is necessarily wide; below 3 pairs it is undefined."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = len(xa)
    out: dict[str, float | int | None] = {
        "rho": None,
        "ci_low": None,
        "ci_high": None,
        "n": n,
        "n_boot_used": 0,
    }
    if n < 3:
        return out
    rho = float(_pearson_rows(_rank(xa), _rank(ya)))
    out["rho"] = _none_if_nan(rho)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    reps = _pearson_rows(_rank(xa[idx]), _rank(ya[idx]))
    reps = reps[np.isfinite(reps)]
    out["n_boot_used"] = len(reps)
    if len(reps):
        lo, hi = _percentile_ci(reps)
        out["ci_low"], out["ci_high"] = lo, hi
    return out
