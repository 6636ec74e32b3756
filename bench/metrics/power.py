"""Power of the paired comparison, from a pilot's variance components (the planner behind `medsynbench plan`).

The comparison's variance with n seeds per arm and N evaluation patients (`bench.metrics.bootstrap`):

    V(n, N) = c * N0 / N + sum over seed stages k of (tau2_k + within_k * N0 / N) / n

- c: the patient stage's variance of the difference common to all models (patients, as sampled at the pilot's N0);
- within_k: the variance each model's own errors on the N0 patients add to one seed's value (shrinks as 1 / N);
- tau2_k: the procedure's seed-to-seed variance (does not shrink with N).

With paired seeds (common random numbers) there is one seed stage, the per-seed differences; otherwise one per arm.
The test is the engine's: difference / sqrt(V) against t with Satterthwaite's df (each stage's s2 = tau2 + within
N0 / N on n - 1 df), so power is that of a noncentral t. The smallest detectable difference (MDE) is the one with
80% power at 5% two-sided.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import chi2, nct, norm
from scipy.stats import t as t_dist

from bench.metrics.bootstrap import seed_components

ALPHA = 0.05
TARGET_POWER = 0.8


@dataclass(frozen=True)
class Components:
    """Variance components of one comparison, as measured on a pilot of `seeds` seeds and `patients` patients."""

    common: float  # c: common patient variance of the difference at `patients`
    within: tuple[float, ...]  # per seed stage: models' own-error variance of one seed's value at `patients`
    tau2: tuple[float, ...]  # per seed stage: between-seed variance
    seeds: int
    patients: int
    paired: bool

    def variance(self, seeds: int | None = None, patients: int | None = None) -> float:
        n, big_n = self._design(seeds, patients)
        scale = self.patients / big_n
        return self.common * scale + sum(
            (t + w * scale) / n for t, w in zip(self.tau2, self.within, strict=True)
        )

    def df(self, seeds: int | None = None, patients: int | None = None) -> float:
        n, big_n = self._design(seeds, patients)
        if n < 2:
            return float("inf")
        scale = self.patients / big_n
        den = sum(((t + w * scale) / n) ** 2 / (n - 1) for t, w in zip(self.tau2, self.within, strict=True))
        v = self.variance(n, big_n)
        return v**2 / den if den > 0 else float("inf")

    def _design(self, seeds: int | None, patients: int | None) -> tuple[int, int]:
        return int(seeds or self.seeds), int(patients or self.patients)


def components(
    xa: np.ndarray, xb: np.ndarray, pa: np.ndarray, pb: np.ndarray, *, paired: bool, patients: int
) -> Components:
    """Components from a pilot's per-seed patient replicates (seeds, replicates) and per-seed values of each arm."""
    xa, xb = np.atleast_2d(np.asarray(xa, float)), np.atleast_2d(np.asarray(xb, float))
    pa, pb = np.asarray(pa, float), np.asarray(pb, float)
    paired = bool(paired and xa.shape == xb.shape and xa.shape[0] >= 2)
    diff_mean = np.nanmean(xa, axis=0) - np.nanmean(xb, axis=0)
    raw = float(np.nanvar(diff_mean, ddof=1))
    if paired:
        stages = [seed_components(xa - xb, pa - pb)]
    else:
        stages = [seed_components(xa, pa), seed_components(xb, pb)]
    # the seed means' patient variance holds each stage's within / n; the rest is common to all models
    common = max(0.0, raw - sum(c.within / max(c.n, 1) for c in stages))
    return Components(
        common=common,
        within=tuple(c.within for c in stages),
        tau2=tuple(c.tau2 for c in stages),
        seeds=min(xa.shape[0], xb.shape[0]),
        patients=int(patients),
        paired=paired,
    )


def power(comp: Components, effect: float, seeds: int | None = None, patients: int | None = None) -> float:
    """Probability that the two-sided test at ALPHA rejects when the true difference is `effect`."""
    v = comp.variance(seeds, patients)
    if not v > 0:
        return 1.0 if effect else ALPHA
    df = comp.df(seeds, patients)
    ncp = abs(effect) / np.sqrt(v)
    if not np.isfinite(df):
        q = norm.ppf(1 - ALPHA / 2)
        return float(norm.sf(q - ncp) + norm.cdf(-q - ncp))
    q = t_dist.ppf(1 - ALPHA / 2, df)
    out = float(nct.sf(q, df, ncp) + nct.cdf(-q, df, ncp))
    return out if np.isfinite(out) else 1.0  # the noncentral t fails only far out in the tail


def mde(comp: Components, seeds: int | None = None, patients: int | None = None) -> float:
    """Smallest difference detected with TARGET_POWER at ALPHA by the design (seeds, patients)."""
    v = comp.variance(seeds, patients)
    if not v > 0:
        return 0.0
    hi = 20 * np.sqrt(v)
    while power(comp, hi, seeds, patients) < TARGET_POWER:  # t with ~1 df has heavy tails
        hi *= 4
    return float(brentq(lambda d: power(comp, d, seeds, patients) - TARGET_POWER, 0.0, hi))


@dataclass(frozen=True)
class Plan:
    effect: float
    current_power: float
    current_mde: float
    seeds_needed: int | None  # at the pilot's patients (None: not within max_seeds)
    patients_needed: int | None  # at the pilot's seeds (None: no number of patients suffices)
    both: tuple[int, int] | None  # fewest seeds, then patients, reaching the target together


def plan(comp: Components, effect: float, max_seeds: int = 50, max_factor: float = 100.0) -> Plan:
    """Seeds (at the pilot's patients), patients (at its seeds) and a joint design for TARGET_POWER at `effect`."""

    def ok(n: int, big_n: int) -> bool:
        return power(comp, effect, n, big_n) >= TARGET_POWER

    seeds_needed = next((n for n in range(2, max_seeds + 1) if ok(n, comp.patients)), None)
    patients_needed = _patients_for(comp, effect, comp.seeds, max_factor)
    both = None
    for n in range(max(2, comp.seeds), max_seeds + 1):
        big_n = _patients_for(comp, effect, n, max_factor)
        if big_n is not None:
            both = (n, big_n)
            break
    return Plan(
        effect=effect,
        current_power=power(comp, effect),
        current_mde=mde(comp),
        seeds_needed=seeds_needed,
        patients_needed=patients_needed,
        both=both,
    )


def _patients_for(comp: Components, effect: float, seeds: int, max_factor: float) -> int | None:
    top = int(comp.patients * max_factor)
    if power(comp, effect, seeds, top) < TARGET_POWER:
        return None
    lo, hi = 2, top
    while lo < hi:  # power rises with patients
        mid = (lo + hi) // 2
        if power(comp, effect, seeds, mid) >= TARGET_POWER:
            hi = mid
        else:
            lo = mid + 1
    return lo


def detectable_difference(ci_low: float, ci_high: float, df: float | None = None) -> float:
    """For a tie (a comparison whose interval holds 0): the smallest difference its design detects with 80% power.

    The standard error is read back from the 95% t interval (half-width / t_df), and the difference is
    (t_df,0.975 + t_df,0.80) x se, the usual approximation to the noncentral t. NaN without an interval.
    """
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return float("nan")
    df = float(df) if df is not None and np.isfinite(df) and df > 0 else float("inf")
    q = t_dist.ppf(1 - ALPHA / 2, df) if np.isfinite(df) else 1.959963984540054
    z = t_dist.ppf(TARGET_POWER, df) if np.isfinite(df) else 0.8416212335729143
    se = (ci_high - ci_low) / (2 * q)
    return float((q + z) * se)


def tie_note(ci_low: float, ci_high: float, df: float | None = None) -> str:
    """'' unless the interval holds 0; then 'detects >= X' with X the `detectable_difference`."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)) or not ci_low <= 0 <= ci_high:
        return ""
    return f"tie; detects ≥ {detectable_difference(ci_low, ci_high, df):.3f}"


@dataclass(frozen=True)
class SiteSpread:
    """How much a comparison's difference varies between the hospitals it was scored at, beyond its noise."""

    sites: tuple[str, ...]
    diffs: tuple[float, ...]
    q: float  # Cochran's Q: inverse-variance weighted squared deviations from the pooled difference
    p: float  # chi-square test of no difference between sites (k - 1 df)
    tau2: float  # DerSimonian-Laird between-site variance of the difference (0 when Q <= k - 1)

    @property
    def sd(self) -> float:
        return float(np.sqrt(self.tau2))


def site_spread(sites: list[str], diffs: list[float], ses: list[float]) -> SiteSpread | None:
    """DerSimonian-Laird spread of per-site differences with standard errors `ses` (None below two usable sites).

    The planner's design is for the hospitals of the pilot: patients and seeds shrink the variance around their
    difference, but a new hospital's difference also varies by `tau2` whatever the design, which only more sites
    measure. Q and tau2 rest on k sites, so with two or three hospitals they are a warning, not an estimate.
    """
    keep = [
        (s, d, e)
        for s, d, e in zip(sites, diffs, ses, strict=True)
        if np.isfinite(d) and np.isfinite(e) and e > 0
    ]
    if len(keep) < 2:
        return None
    d = np.array([k[1] for k in keep])
    w = 1 / np.array([k[2] for k in keep]) ** 2
    pooled = float(np.sum(w * d) / np.sum(w))
    q = float(np.sum(w * (d - pooled) ** 2))
    k = len(keep)
    c = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    tau2 = max(0.0, (q - (k - 1)) / c) if c > 0 else 0.0
    return SiteSpread(
        sites=tuple(str(x[0]) for x in keep),
        diffs=tuple(float(x) for x in d),
        q=q,
        p=float(chi2.sf(q, k - 1)),
        tau2=tau2,
    )
