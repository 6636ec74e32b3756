"""Patient-clustered, stratified bootstrap.

A replicate is a vector of patient multiplicities: within every stratum (site x patient label) as many patients as
the stratum holds are drawn with replacement, and each case inherits its patient's multiplicity as a weight. All
metrics, groups, training seeds and run keys of one evaluation share the same replicates, so worst-group statistics,
gaps and paired differences are computed replicate by replicate.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


@contextmanager
def _quiet() -> Iterator[None]:
    # all-NaN rows (a seed undefined on every replicate) are expected and handled by the callers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


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


def seed_components(per_seed: Any, point: Any = None) -> SeedComponents:
    """What the seeds of one arm say about the variance of its mean over seeds.

    `per_seed` is (seeds, replicates) on shared patient replicates, `point` the seeds' values on all patients
    (default: each seed's mean over replicates). The seeds' sample variance s2 of `point` estimates tau2 (the
    procedure's seed-to-seed variance) plus `within`, the variance that each model's own errors on these
    patients add; the bootstrap spread of a seed's deviation from the replicate's seed mean estimates `within`
    (times n / (n - 1)).
    """
    x = np.atleast_2d(np.asarray(per_seed, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"), _quiet():
        pt = np.nanmean(x, axis=1) if point is None else np.asarray(point, dtype=float)
        good = np.isfinite(pt) & (np.sum(np.isfinite(x), axis=1) >= 2)
        n = int(good.sum())
        d = np.zeros(len(pt))
        if n < 2:
            return SeedComponents(d, good, n, 0.0, 0.0)
        d[good] = pt[good] - pt[good].mean()
        s2 = float(np.sum(d**2) / (n - 1))
        xg = x[good]
        dev = xg - np.nanmean(xg, axis=0)
        within = float(np.nanmean(np.nanvar(dev, axis=1, ddof=1)) * n / (n - 1))
    return SeedComponents(d, good, n, s2, within if np.isfinite(within) else 0.0)


@dataclass(frozen=True)
class SeedComponents:
    dev: np.ndarray  # each seed's deviation from the seeds' mean (0 for a seed without a value)
    good: np.ndarray  # seeds with a value
    n: int  # seeds with a value
    s2: float  # sample variance of the seeds' values (n - 1 degrees of freedom)
    within: float  # part of s2 due to each model's own errors on the evaluated patients

    @property
    def tau2(self) -> float:
        """The procedure's seed-to-seed variance net of the models' own errors on these patients."""
        return max(0.0, self.s2 - self.within)


def _seed_shift(
    comp: SeedComponents, weights: np.ndarray, ok: np.ndarray | None = None, shrink: bool = False
) -> np.ndarray:
    """Per replicate: sqrt(n / (n - 1)) * resampled mean of the seeds' fixed deviations (variance s2 / n; with
    `shrink`, scaled by sqrt(tau2 / s2) to variance tau2 / n).

    `ok` (seeds, replicates) marks the seeds with a value in each replicate; seeds without any value never count.
    """
    w = np.asarray(weights, dtype=float).T * comp.good[:, None]
    if comp.n < 2:
        return np.zeros(w.shape[1])
    if ok is not None:
        w = np.where(ok, w, 0.0)
    wsum = w.sum(axis=0)
    shift = (w * comp.dev[:, None]).sum(axis=0) / np.where(wsum > 0, wsum, 1.0)
    k = np.sqrt(comp.tau2 / comp.s2) if shrink and comp.s2 > 0 else float(not shrink)
    return np.sqrt(comp.n / (comp.n - 1)) * k * shift


def _common_patients(mean: np.ndarray, comp: SeedComponents) -> np.ndarray:
    """The seed mean's patient replicates with the models' own errors (within / n) taken out of their spread.

    The seed stage resamples the seeds' values, whose spread s2 already holds each model's own errors on these
    patients; the patient stage keeps only the part common to all models, so nothing is counted twice.
    """
    if comp.n < 2 or comp.within <= 0:
        return mean
    with _quiet():
        c = float(np.nanmean(mean))
        v = float(np.nanvar(mean))
    if not v > 0:
        return mean
    k = np.sqrt(max(0.0, 1 - comp.within / comp.n / v))
    return c + k * (mean - c)


def combine_seeds(per_seed: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Second stage of the two-stage bootstrap: one value per replicate from per-seed replicate values.

    `per_seed` is (seeds, replicates) on shared patient replicates (NaN where a seed lacks a value), `weights`
    (replicates, seeds) from `seed_weights`. Var(mean of n seeds) = common patient variance + (tau2 + within) / n
    (`seed_components`). The seed stage resamples the seeds' fixed deviations (each seed's mean over replicates
    minus the seeds' mean), inflated by sqrt(n / (n - 1)): its variance is s2 / n, unbiased for (tau2 + within)
    / n. The patient stage's spread loses within / n (`_common_patients`). Resampling each replicate's raw
    deviations under the full patient spread instead counted the models' own errors three times. With `weights`
    None, or a single seed, it is the plain mean over seeds.
    """
    x = np.asarray(per_seed, dtype=float)
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, np.where(ok, x, 0.0).sum(axis=0) / np.maximum(cnt, 1), np.nan)
    if weights is None or x.shape[0] < 2:
        return mean
    comp = seed_components(x)
    if comp.n < 2:
        return mean
    return _common_patients(mean, comp) + _seed_shift(comp, weights, ok)


@dataclass(frozen=True)
class SeedDifference:
    """A paired comparison of two arms on shared patient replicates, both stages done (`seed_difference`)."""

    a: np.ndarray  # candidate's replicates: b + diff
    b: np.ndarray  # baseline's replicates (patients, then its seeds)
    diff: np.ndarray  # a - b per replicate
    df: float  # Satterthwaite degrees of freedom of the difference's variance (inf: no seed stage)
    seed_var: float  # the seed stage's part of the difference's variance
    se: float  # standard error of the difference: sqrt(patient stage's variance + seed_var)
    paired: bool  # seeds resampled as matched pairs
    seed_df: float = float(
        "inf"
    )  # degrees of freedom of seed_var alone: n - 1 paired, the smaller arm's otherwise

    @property
    def expansion(self) -> float:
        """t_df / z at the 97.5% point: how much wider the interval is for the few seeds behind `seed_var`."""
        return t_expansion(self.df)


def t_expansion(df: float, alpha: float = ALPHA) -> float:
    if not np.isfinite(df):
        return 1.0
    return float(t_dist.ppf(1 - alpha / 2, max(df, 1.0)) / norm.ppf(1 - alpha / 2))


def seed_difference(
    xa: Any,
    xb: Any,
    pa: Any,
    pb: Any,
    *,
    paired: bool,
    n_boot: int,
    seed: int,
    streams: tuple[int, int],
) -> SeedDifference:
    """Two-stage replicates of candidate (`xa`, (seeds, replicates)) and baseline (`xb`) on shared patients.

    `pa`, `pb` are the seeds' values on all patients. Unpaired, each arm's seeds are resampled on their own
    stream (`combine_seeds`, with the point values as the seeds' deviations). `paired` (the same seed indices in
    both arms, seed k sharing initialisation and batch order across arms) resamples seed pairs jointly, and the
    seed stage's spread is that of the per-seed differences (net of their patient-level noise), which common
    random numbers make small. The seed stage's variance rests on few seeds: its degrees of freedom (n - 1
    paired; Welch's otherwise) and the patient stage's (taken as infinite) give the difference's Satterthwaite df.
    """
    xa = np.atleast_2d(np.asarray(xa, dtype=float))
    xb = np.atleast_2d(np.asarray(xb, dtype=float))
    ma, mb = combine_seeds(xa, None), combine_seeds(xb, None)
    paired = bool(paired and xa.shape == xb.shape and xa.shape[0] >= 2)
    # Var(difference) = common patient variance (the seed means' difference net of the models' own errors) +
    # per seed stage max(s2, within) / n: the seeds' spread, never below what the models' own errors alone give
    # (tau2 >= 0). Two arms of identical models have no patient variance in their difference, but unpaired their
    # seeds still vary; as pairs they differ by exactly 0.
    if paired:
        pa, pb = np.asarray(pa, dtype=float), np.asarray(pb, dtype=float)
        stages = [seed_components(xa - xb, pa - pb)]
        shift = _seed_shift(stages[0], seed_weights(xa.shape[0], n_boot, seed, streams[0]))
        a, b = ma + shift, mb.copy()
    else:
        stages = [seed_components(xa, pa), seed_components(xb, pb)]
        a = ma + _seed_shift(stages[0], seed_weights(xa.shape[0], n_boot, seed, streams[0]))
        b = mb + _seed_shift(stages[1], seed_weights(xb.shape[0], n_boot, seed, streams[1]))
    common = ma - mb
    for c in stages:
        common = _common_patients(common, c)
    diff = common + (a - ma) - (b - mb)
    live = [c for c in stages if c.n >= 2]
    var_s = float(sum(max(c.s2, c.within) / c.n for c in live))
    # the seed stage's variance estimate rests on n seeds: that of s2 / n, n - 1 df (Satterthwaite)
    den = float(sum((c.s2 / c.n) ** 2 / (c.n - 1) for c in live))
    with _quiet():
        raw = float(np.nanvar(ma - mb, ddof=1))
    var_t = max(0.0, raw - sum(c.within / c.n for c in live)) + var_s
    df = var_t**2 / den if den > 0 and np.isfinite(var_t) else float("inf")
    seed_df = float(min(c.n - 1 for c in live)) if live else float("inf")
    return SeedDifference(a, b, diff, float(df), float(var_s), float(np.sqrt(var_t)), paired, seed_df)


def t_interval(
    point: float, reps: Any, df: float, alpha: float = ALPHA, se: float | None = None
) -> tuple[float, float, float]:
    """(low, high, two-sided p-value of 0) of point +- t_df * se (default: the replicates' standard deviation).

    The seed stage rests on few seeds, so its share of the variance is known to `df` degrees of freedom only: a
    percentile interval (normal tails) covers too little, and widening its quantiles by t / z over-corrects the
    tails of a resampled mean of 3 values. The bootstrap gives the standard error, t the tails.
    """
    r = np.asarray(reps, dtype=float)
    r = r[np.isfinite(r)]
    if len(r) < 2 or not np.isfinite(point) or (se is not None and not np.isfinite(se)):
        return float("nan"), float("nan"), float("nan")
    se = float(np.std(r, ddof=1)) if se is None else float(se)
    df = max(float(df), 1.0)
    q = float(t_dist.ppf(1 - alpha / 2, df)) if np.isfinite(df) else float(norm.ppf(1 - alpha / 2))
    if se <= 0:
        return float(point), float(point), 1.0 if point == 0 else 0.0
    stat = abs(point) / se
    p = 2 * (t_dist.sf(stat, df) if np.isfinite(df) else norm.sf(stat))
    return float(point - q * se), float(point + q * se), float(min(1.0, p))


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
