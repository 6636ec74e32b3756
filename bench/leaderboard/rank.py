"""Ranking with uncertainty: point ranks, 95% rank intervals and tie groups.

Each record is scored on its headline regime (synthetic-only for a generator, real for the real-only reference)
with the leaderboard's primary metric, on the evaluation cases all records share. One patient-clustered bootstrap
(patients resampled within site x label strata) is applied to every record at once, so each replicate compares all
records on the same resampled patients (paired). Each record's training seeds are then resampled with replacement
within the replicate (independently per record; `bench.metrics.bootstrap.combine_seeds`: the seeds' fixed
deviations, the models' own errors counted once, as in the comparisons), so that rank intervals
carry seed-to-seed variation too; a record with fewer than 3 seeds is named in a note. Within a replicate, a record's rank is 1 + the number of records
strictly better; its 95% rank interval is the 2.5th to 97.5th percentile of those ranks.

Tie groups: walking down the point ranking, a record joins the current group when its rank interval overlaps the
interval of the group's first (best) record, and opens a new group otherwise. Anchoring on the group's leader rather
than chaining overlaps keeps a long run of neighbouring records from collapsing into a single group. For each
record tied with its group's leader, `mde` is the smallest difference between the two that the board detects
with 80% power (`tie_mde`): a tie is then read as "no difference larger than this", not "equal".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

from bench.errors import BadInput
from bench.metrics.bootstrap import (
    MIN_SEEDS,
    chunks,
    combine_seeds,
    patient_strata,
    patient_weights,
    seed_weights,
    stream_id,
)
from bench.metrics.core import Metric, get_metric
from bench.metrics.power import TARGET_POWER

CHUNK = 200


@dataclass
class Entry:
    """One record to rank: its probabilities on the evaluation cases, one matrix per training seed."""

    key: str
    probs: list[np.ndarray]  # each (n_cases, K), rows aligned with the shared case order


@dataclass
class Ranking:
    keys: list[str]
    value: np.ndarray
    rank: np.ndarray
    rank_low: np.ndarray
    rank_high: np.ndarray
    group: np.ndarray  # tie group number, 1 = best
    n_cases: int
    n_patients: int
    n_boot_used: int
    mde: np.ndarray | None = None  # per record in a tie: smallest difference to its group's leader detectable

    def as_dict(self) -> dict[str, dict[str, float | int]]:
        return {
            k: {
                "value": float(self.value[i]),
                "rank": int(self.rank[i]),
                "rank_low": int(self.rank_low[i]),
                "rank_high": int(self.rank_high[i]),
                "tie_group": int(self.group[i]),
                "mde": _num(self.mde[i]) if self.mde is not None else None,
            }
            for i, k in enumerate(self.keys)
        }


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def tie_mde(reps: np.ndarray, group: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Per record tied with its group's leader: the smallest difference the board would detect between them.

    The difference's standard error is the spread of the paired two-stage replicates (patients shared, seeds
    resampled), and detectable means 80% power at 5% two-sided: (z_0.975 + z_0.8) x se. NaN for leaders and
    records alone in their group.
    """
    out = np.full(len(group), np.nan)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        if len(members) < 2:
            continue
        leader = members[np.argmin(rank[members])]
        for j in members:
            if j != leader:
                d = reps[:, j] - reps[:, leader]
                d = d[np.isfinite(d)]
                if len(d) > 1:
                    out[j] = (norm.ppf(0.975) + norm.ppf(TARGET_POWER)) * float(np.std(d, ddof=1))
    return out


def competition_ranks(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Rank 1 = best; equal values share the better rank (1, 2, 2, 4). Works row-wise on (B, R)."""
    v = np.atleast_2d(np.asarray(values, dtype=float))
    s = v if higher_is_better else -v
    better = (s[:, None, :] > s[:, :, None]).sum(axis=2)
    return 1 + better


def tie_groups(
    rank: np.ndarray, low: np.ndarray, high: np.ndarray, value: np.ndarray, higher_is_better: bool
) -> np.ndarray:
    order = np.lexsort((-value if higher_is_better else value, rank))
    group = np.zeros(len(rank), dtype=int)
    g, leader = 0, None
    for i in order:
        if leader is None or not (low[i] <= high[leader] and low[leader] <= high[i]):
            g += 1
            leader = i
        group[i] = g
    return group


def rank_entries(
    entries: Sequence[Entry],
    y: np.ndarray,
    patient_id: np.ndarray,
    site: np.ndarray,
    metric: Metric,
    *,
    n_boot: int,
    seed: int,
    score_fn=None,
) -> Ranking:
    """Rank `entries` on the cases (`y` class indices, `patient_id`, `site`) by `metric`, averaged over seeds.

    `score_fn(P) -> (y_for_metric, score)` adapts a probability matrix to a binary metric (binary view).
    """
    if not entries:
        raise BadInput("nothing to rank: no records")
    y = np.asarray(y)
    codes, _ = pd.factorize(pd.Series(patient_id).astype(str), sort=True)
    pat = pd.DataFrame({"p": codes, "site": pd.Series(site).astype(str).to_numpy(), "y": y})
    pat = pat.groupby("p", sort=True).agg(site=("site", "first"), y=("y", "max"))
    strata = patient_strata(pat, ["site", "y"])

    def adapt(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return score_fn(P) if score_fn else (y, P)

    kernels = [[metric.kernel(*adapt(P)) for P in e.probs] for e in entries]
    ones = np.ones((1, len(y)))
    point = np.array([np.mean([k(ones)[0] for k in ks]) for ks in kernels])
    reps = np.empty((n_boot, len(entries)))
    for a, b in chunks(n_boot, CHUNK):
        W = patient_weights(strata, n_boot, seed, a, b)[:, codes]
        for j, ks in enumerate(kernels):
            per_seed = np.vstack([k(W) for k in ks])  # seeds x replicates
            sw = seed_weights(len(ks), n_boot, seed, stream_id(entries[j].key), a, b)
            reps[a:b, j] = combine_seeds(per_seed, sw)
    ok = ~np.isnan(reps).any(axis=1)
    hib = metric.higher_is_better
    rank = competition_ranks(np.nan_to_num(point, nan=-np.inf if hib else np.inf), hib)[0]
    if ok.any():
        r = competition_ranks(reps[ok], hib)
        low = np.percentile(r, 2.5, axis=0, method="lower").astype(int)
        high = np.percentile(r, 97.5, axis=0, method="higher").astype(int)
    else:
        low = np.ones(len(entries), dtype=int)
        high = np.full(len(entries), len(entries), dtype=int)
    group = tie_groups(rank, low, high, point, hib)
    mde = tie_mde(reps[ok], group, rank) if ok.any() else np.full(len(entries), np.nan)
    return Ranking(
        [e.key for e in entries],
        point,
        rank,
        low,
        high,
        group,
        len(y),
        int(codes.max() + 1) if len(codes) else 0,
        int(ok.sum()),
        mde,
    )


def rank_predictions(
    tables: dict[str, pd.DataFrame],
    headline: dict[str, str],
    classes: Sequence[str],
    primary: str,
    *,
    split: str,
    n_boot: int,
    seed: int,
    binary_positive: Sequence[str] | None = None,
) -> tuple[Ranking, list[str]]:
    """Rank records from their stored predictions (record key -> table), each on its headline regime.

    Cases are the `split` rows every table holds (hashed ids, identical across records of one leaderboard); a
    note says so when some record held cases the others lack.
    """
    notes = []
    classes = list(classes)
    metric = get_metric(primary, classes)
    pcols = [f"prob_{c}" for c in classes]
    subsets = {}
    for k, df in tables.items():
        sub = df[(df["split"].astype(str) == split) & (df["regime"].astype(str) == headline[k])]
        subsets[k] = sub
    common = None
    for sub in subsets.values():
        ids = set(sub["case_id"].astype(str))
        common = ids if common is None else common & ids
    common = sorted(common or [])
    if not common:
        raise BadInput(f"the records share no {split} cases: they cannot be ranked together")
    if any(set(s["case_id"].astype(str)) != set(common) for s in subsets.values()):
        notes.append(f"ranked on the {len(common)} {split} cases every record predicts")
    first = next(iter(subsets.values()))
    cases = first.drop_duplicates("case_id").set_index("case_id").loc[common]
    y = cases["y_true"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(int)
    entries = []
    for k, sub in subsets.items():
        mats = []
        for _, df in sub.groupby("seed", sort=True):
            mats.append(df.drop_duplicates("case_id").set_index("case_id").loc[common, pcols].to_numpy(float))
        entries.append(Entry(k, mats))
    score_fn = None
    if metric.target == "binary":
        pos = list(binary_positive) if binary_positive else classes[1:]
        idx = [classes.index(c) for c in pos]
        yb = np.isin(y, idx)

        def score_fn(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return yb, P[:, idx].sum(axis=1)

    few = [e.key for e in entries if len(e.probs) < MIN_SEEDS]
    if few:
        notes.append(
            f"few_seeds: {', '.join(few)} ha{'s' if len(few) == 1 else 've'} fewer than {MIN_SEEDS} training seeds; "
            "their rank intervals understate seed-to-seed variation"
        )
    ranking = rank_entries(
        entries,
        y,
        cases["patient_id"].to_numpy(),
        cases["site"].to_numpy(),
        metric,
        n_boot=n_boot,
        seed=seed,
        score_fn=score_fn,
    )
    return ranking, notes
