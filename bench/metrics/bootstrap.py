"""Patient-clustered, stratified bootstrap.

A replicate is a vector of patient multiplicities: within every stratum (site x patient label) as many patients as
the stratum holds are drawn with replacement, and each case inherits its patient's multiplicity as a weight. All
metrics, groups, training seeds and run keys of one evaluation share the same replicates, so worst-group statistics,
gaps and paired differences are computed replicate by replicate.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm
from scipy.stats import t as t_dist

from bench.metrics.core import AurocKernel

ALPHA = 0.05
# Delete-a-group jackknife for the BCa acceleration: at most this many groups of patients (leave-one-patient-out
# below it). The acceleration from g groups estimates the same skewness as from single patients, at g / n_boot of
# the bootstrap's kernel work.
JACKKNIFE_BLOCKS = 100


def patient_strata(patients: pd.DataFrame, by: Sequence[str]) -> np.ndarray:
    """Integer stratum code per patient row from the columns `by` (e.g. site and patient label)."""
    if not by:
        return np.zeros(len(patients), dtype=np.int64)
    return patients.groupby(list(by), sort=True, dropna=False).ngroup().to_numpy(np.int64)


def patient_weights(
    strata: Any, n_boot: int, seed: int, start: int = 0, stop: int | None = None
) -> np.ndarray:
    """(replicates, patients) multiplicities for replicates `start:stop` of an `n_boot`-replicate bootstrap.

    Each replicate resamples every stratum to its own size. Replicate r is drawn from its own stream seeded with
    (seed, r), so a chunk of replicates is identical whether drawn alone or with the rest.
    """
    strata = np.asarray(strata, dtype=np.int64)
    stop = n_boot if stop is None else min(stop, n_boot)
    n = len(strata)
    order = np.argsort(strata, kind="stable")
    sizes = np.bincount(strata) if n else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if n else np.zeros(0, dtype=np.int64)
    out = np.zeros((max(stop - start, 0), n), dtype=np.float64)
    if n == 0:
        return out
    # per patient position in `order`: draw an offset within its stratum
    stratum_of_slot = np.repeat(np.arange(len(sizes)), sizes)
    for i, r in enumerate(range(start, stop)):
        rng = np.random.default_rng([seed, r])
        offs = np.floor(rng.random(n) * sizes[stratum_of_slot]).astype(np.int64)
        picks = order[starts[stratum_of_slot] + offs]
        out[i] = np.bincount(picks, minlength=n)
    return out


def chunks(n_boot: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n_boot, size):
        yield a, min(a + size, n_boot)


def percentile_interval(reps: np.ndarray, alpha: float = ALPHA) -> tuple[float, float, int]:
    """(low, high, replicates used) of the percentile interval, ignoring replicates where the value is undefined."""
    r = np.asarray(reps, dtype=float)
    r = r[~np.isnan(r)]
    if len(r) == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.quantile(r, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi), int(len(r))


def jackknife_weights(strata: Any, blocks: int = JACKKNIFE_BLOCKS) -> np.ndarray:
    """(groups, patients) weights of a delete-a-group jackknife: row g is 0 for the patients of group g, else 1.

    Patients are dealt to min(patients, `blocks`) groups in turn in stratum order, so each group draws from every
    stratum; with fewer patients than `blocks` it is the leave-one-patient-out jackknife.
    """
    strata = np.asarray(strata, dtype=np.int64)
    n = len(strata)
    g = min(n, int(blocks))
    block = np.empty(n, dtype=np.int64)
    block[np.argsort(strata, kind="stable")] = np.arange(n) % max(g, 1)
    return (block[None, :] != np.arange(g)[:, None]).astype(np.float64)


def acceleration(jack: Any) -> float:
    """BCa acceleration from jackknife values: sum(d^3) / (6 sum(d^2)^1.5), d = mean - value (0 if degenerate)."""
    j = np.asarray(jack, dtype=float)
    j = j[~np.isnan(j)]
    if len(j) < 3:
        return 0.0
    d = j.mean() - j
    ss = float(np.sum(d**2))
    if ss <= 0:
        return 0.0
    return float(np.sum(d**3) / (6 * ss**1.5))


def expanded_z(n_units: int | None, alpha: float = ALPHA) -> np.ndarray:
    """Normal quantiles (lower, upper) of a two-sided interval, expanded for a sample of `n_units` resampled units.

    Hesterberg's expansion: sqrt(n / (n - 1)) * t quantile with n - 1 degrees of freedom in place of the normal
    quantile, for the bootstrap's divisor-n variance and for the variability of the interval's own width; it
    fades as n grows (1.2% wider at 100 units, 0.1% at 1,000). None or fewer than 2 units: no expansion.
    """
    q = np.array([alpha / 2, 1 - alpha / 2])
    if n_units is None or n_units < 2:
        return norm.ppf(q)
    return np.sqrt(n_units / (n_units - 1)) * t_dist.ppf(q, n_units - 1)


def bca_interval(
    reps: Any, point: float, jack: Any, n_units: int | None = None, alpha: float = ALPHA
) -> tuple[float, float, int]:
    """(low, high, replicates used) of the expanded BCa interval, ignoring replicates where the value is undefined.

    Bias correction z0 = Phi^-1(share of replicates below the point value, ties counted half); acceleration from
    the jackknife values `jack` (`acceleration`); the interval takes the replicate quantiles at
    Phi(z0 + (z0 + z) / (1 - a (z0 + z))) for the expanded quantiles z of `expanded_z(n_units)`. With no bias
    and no skewness it is the percentile interval, expanded; so it is when the point value lies outside the
    replicates' central 1 - alpha range, where a bias correction is not to be trusted.
    """
    r = np.asarray(reps, dtype=float)
    r = r[~np.isnan(r)]
    b = len(r)
    if b == 0:
        return float("nan"), float("nan"), 0
    z = expanded_z(n_units, alpha)
    share = 0.5 if np.isnan(point) else (np.sum(r < point) + 0.5 * np.sum(r == point)) / b
    if not alpha / 2 <= share <= 1 - alpha / 2:
        # The point lies outside the replicates' central range (a bootstrap biased as a whole, as for a binned
        # calibration error): the bias correction would push both limits to one end of the replicates, so the
        # interval is the (expanded) percentile interval.
        lo, hi = np.quantile(r, norm.cdf(z))
        return float(lo), float(hi), int(b)
    z0 = float(norm.ppf(share))
    a = acceleration(jack)
    # a denominator at or below 0 means the level runs off the end: the limit is the extreme replicate
    denom = np.maximum(1 - a * (z0 + z), 1e-12)
    levels = norm.cdf(z0 + (z0 + z) / denom)
    lo, hi = np.quantile(r, levels)
    return float(lo), float(hi), int(b)


def bootstrap_p_value(diff_reps: np.ndarray) -> float:
    """Two-sided p-value of 'no difference' from paired bootstrap differences.

    p = 2 * min(share of replicates <= 0, share >= 0), each share counted as (k + 1) / (B + 1) so that p is never
    zero with a finite number of replicates; capped at 1.
    """
    d = np.asarray(diff_reps, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return float("nan")
    b = len(d)
    lo = (np.sum(d <= 0) + 1) / (b + 1)
    hi = (np.sum(d >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(lo, hi)))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN entries stay NaN and do not count in the family)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def bootstrap_group_auroc(
    y: Any,
    score: Any,
    patient_id: Any,
    group: Any,
    *,
    strata: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 250,
) -> pd.DataFrame:
    """Patient-clustered bootstrap AUROC per group: value, 95% interval (expanded BCa, `bca_interval`), n.

    `strata` (per case; e.g. site) is combined with the patient's label (any positive case) for stratification.
    `score` may be (seeds, cases), one row per training seed: the value is the mean over seeds and the interval the
    evaluation's two-stage bootstrap (patients, then seeds; `combine_seeds`).
    """
    y = np.asarray(y).astype(bool)
    scores = np.atleast_2d(np.asarray(score, dtype=float))
    pid_codes, pid_uniques = pd.factorize(pd.Series(patient_id), sort=True)
    group = pd.Series(group).astype(str).to_numpy()
    pat = pd.DataFrame({"p": pid_codes, "y": y, "s": strata if strata is not None else 0})
    pat = pat.groupby("p").agg(y=("y", "max"), s=("s", "first"))
    st = patient_strata(pat, ["s", "y"])
    groups = sorted(set(group))
    kernels = {}
    for g in groups:
        m = group == g
        kernels[g] = (np.flatnonzero(m), [AurocKernel(y[m], s[m]) for s in scores])
    n_seeds = len(scores)
    reps = {g: np.empty(n_boot) for g in groups}
    for a, b in chunks(n_boot, chunk):
        Wp = patient_weights(st, n_boot, seed, a, b)
        Wc = Wp[:, pid_codes]
        sw = seed_weights(n_seeds, n_boot, seed, 0, a, b) if n_seeds > 1 else None
        for g, (idx, kerns) in kernels.items():
            Wg = Wc[:, idx]
            reps[g][a:b] = combine_seeds(np.vstack([k(Wg) for k in kerns]), sw)
    Wj = jackknife_weights(st)[:, pid_codes]
    rows = []
    for g, (idx, kerns) in kernels.items():
        value = float(np.mean([k(np.ones((1, len(idx))))[0] for k in kerns]))
        jack = combine_seeds(np.vstack([k(Wj[:, idx]) for k in kerns]), None)
        n_pat = len(np.unique(pid_codes[idx]))
        lo, hi, _ = bca_interval(reps[g], value, jack, n_pat)
        rows.append(
            dict(
                group=g,
                value=value,
                ci_low=lo,
                ci_high=hi,
                n_cases=len(idx),
                n_patients=n_pat,
            )
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- training seeds

MIN_SEEDS = (
    3  # below this many training seeds per arm the seed stage rests on too few models (flag `few_seeds`)
)


def stream_id(key: str) -> int:
    """A stable integer for a run key, so that each arm draws its own seed replicates."""
    return zlib.crc32(key.encode("utf-8"))


def seed_weights(
    n_seeds: int, n_boot: int, seed: int, stream: int, start: int = 0, stop: int | None = None
) -> np.ndarray:
    """(replicates, seeds) multiplicities: the training seeds of one arm resampled with replacement.

    Replicate r of arm `stream` is drawn from its own stream (seed, r, stream), so chunks are reproducible and two
    arms (candidate, baseline) draw independently of each other while sharing the patient replicates.
    """
    stop = n_boot if stop is None else min(stop, n_boot)
    out = np.zeros((max(stop - start, 0), n_seeds))
    for i, r in enumerate(range(start, stop)):
        rng = np.random.default_rng([seed, r, stream, 1])
        out[i] = np.bincount(rng.integers(0, n_seeds, n_seeds), minlength=n_seeds)
    return out


def combine_seeds(per_seed: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Second stage of the two-stage bootstrap: one value per replicate from per-seed replicate values.

    `per_seed` is (seeds, replicates) on shared patient replicates (NaN where a seed lacks a value), `weights`
    (replicates, seeds) from `seed_weights`. A replicate's value is the mean over seeds plus the resampled mean of
    the seeds' deviations from it, the deviations inflated by sqrt(n / (n - 1)) (n seeds with a value) so that the
    seed stage's variance is the unbiased variance of a mean of n seeds rather than (n - 1) / n of it. With
    `weights` None, or a single seed, it is the plain mean over seeds (no seed stage).
    """
    x = np.asarray(per_seed, dtype=float)
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, np.where(ok, x, 0.0).sum(axis=0) / np.maximum(cnt, 1), np.nan)
        if weights is None or x.shape[0] < 2:
            return mean
        w = np.where(ok, np.asarray(weights, dtype=float).T, 0.0)
        wsum = w.sum(axis=0)
        dev = np.where(ok, x - mean, 0.0)
        shift = np.where(wsum > 0, (w * dev).sum(axis=0) / np.where(wsum > 0, wsum, 1.0), 0.0)
        infl = np.sqrt(np.where(cnt > 1, cnt / np.maximum(cnt - 1, 1), 1.0))
        return mean + infl * shift


def seed_note(n_candidate: int, n_baseline: int | None = None) -> str:
    """'' when every arm has at least MIN_SEEDS training seeds, otherwise a `few_seeds: ...` flag."""
    ns = [n_candidate] if n_baseline is None else [n_candidate, n_baseline]
    if min(ns) >= MIN_SEEDS:
        return ""
    counts = " and ".join(str(n) for n in ns)
    if min(ns) < 2:
        what = "seed-to-seed variance is not estimable with one seed and is missing from the interval"
    else:
        what = "the seed stage of the interval rests on fewer than 3 seeds and may be too narrow"
    return f"few_seeds: {counts} training seed(s); {what}"
