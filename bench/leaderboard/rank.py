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

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from bench.errors import BadInput
from bench.leaderboard.spec import cache_file, registry_fingerprint, scorer_fingerprint
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
from bench.metrics.segmentation import count_columns

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
    s = -v if higher_is_better else v  # ascending s: better first
    # 1 + the number strictly better: the position of each value's first tie in its row, sorted (no R x R cube)
    srt = np.sort(s, axis=1)
    return 1 + np.stack([np.searchsorted(srt[i], s[i], side="left") for i in range(len(s))])


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


def _patients(y: np.ndarray, patient_id: np.ndarray, site: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patient code per case, strata per patient): patients resampled within site x label strata."""
    codes, _ = pd.factorize(pd.Series(patient_id).astype(str), sort=True)
    pat = pd.DataFrame({"p": codes, "site": pd.Series(site).astype(str).to_numpy(), "y": y})
    pat = pat.groupby("p", sort=True).agg(site=("site", "first"), y=("y", "max"))
    return codes, patient_strata(pat, ["site", "y"])


def entry_replicates(
    entries: Sequence[Entry],
    y: np.ndarray,
    codes: np.ndarray,
    strata: np.ndarray,
    metric: Metric,
    *,
    n_boot: int,
    seed: int,
    score_fn=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(point value per entry, (n_boot, entries) two-stage replicates): the same patient replicates for every
    entry, each entry's seeds resampled on its own stream. An entry's columns depend on it alone (and the cases),
    so they can be cached per entry."""

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
    return point, reps


def rank_replicates(
    keys: Sequence[str],
    point: np.ndarray,
    reps: np.ndarray,
    higher_is_better: bool,
    n_cases: int,
    n_patients: int,
) -> Ranking:
    """Point ranks, rank intervals, tie groups and tie MDEs from every entry's point value and replicates."""
    ok = ~np.isnan(reps).any(axis=1)
    hib = higher_is_better
    rank = competition_ranks(np.nan_to_num(point, nan=-np.inf if hib else np.inf), hib)[0]
    if ok.any():
        r = competition_ranks(reps[ok], hib)
        low = np.percentile(r, 2.5, axis=0, method="lower").astype(int)
        high = np.percentile(r, 97.5, axis=0, method="higher").astype(int)
    else:
        low = np.ones(len(keys), dtype=int)
        high = np.full(len(keys), len(keys), dtype=int)
    group = tie_groups(rank, low, high, point, hib)
    mde = tie_mde(reps[ok], group, rank) if ok.any() else np.full(len(keys), np.nan)
    return Ranking(list(keys), point, rank, low, high, group, n_cases, n_patients, int(ok.sum()), mde)


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
    codes, strata = _patients(y, patient_id, site)
    point, reps = entry_replicates(
        entries, y, codes, strata, metric, n_boot=n_boot, seed=seed, score_fn=score_fn
    )
    n_patients = int(codes.max() + 1) if len(codes) else 0
    return rank_replicates([e.key for e in entries], point, reps, metric.higher_is_better, len(y), n_patients)


# Bump when what a cached replicate vector means changes (the bootstrap's streams, the seed stage).
RANK_CACHE_VERSION = "1"


@functools.lru_cache(maxsize=1)
def _code() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def replicate_cache() -> ReplicateCache:
    """The replicate cache beside the score cache (`MEDSYNBENCH_CACHE`, else ~/.cache/medsynbench)."""
    return ReplicateCache(cache_file().parent / "rank-replicates")


class ReplicateCache:
    """Each record's ranking replicates on disk, beside the score cache: one `.npy` per record, keyed by what they
    are a function of (the record's verified predictions file, its key and headline regime, the shared cases, the
    metric and its code, the bootstrap settings). A warm build of a large board then ranks without re-scoring, and
    without parsing a predictions file whose case set it has seen. Unwritable: the next build is slower, no more."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            self.cases = json.loads((folder / "cases.json").read_text())
        except (OSError, ValueError):
            self.cases = {}
        if not isinstance(self.cases, dict):
            self.cases = {}
        self._fresh: dict[str, str] = {}

    @staticmethod
    def digest(*parts: Any) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def case_set(self, sha: str, split: str, regime: str) -> str | None:
        v = self.cases.get(self.digest(sha, split, regime))
        return v if isinstance(v, str) else None

    def remember_case_set(self, sha: str, split: str, regime: str, value: str) -> None:
        self._fresh[self.digest(sha, split, regime)] = value

    def get(self, key: str, n_boot: int) -> tuple[float, int, np.ndarray] | None:
        """(point value, training seeds, replicates) of one record, or None."""
        try:
            a = np.load(self.folder / f"{key}.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if a.dtype != np.float64 or a.shape != (n_boot + 2,):
            return None
        return float(a[0]), int(a[1]), a[2:]

    def put(self, key: str, point: float, n_seeds: int, reps: np.ndarray) -> None:
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{key}.{os.getpid()}.npy"
            np.save(tmp, np.concatenate([[point, n_seeds], reps]).astype(np.float64), allow_pickle=False)
            os.replace(tmp, self.folder / f"{key}.npy")

    def save(self) -> None:
        if not self._fresh:
            return
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".cases.{os.getpid()}.json"
            tmp.write_text(json.dumps({**self.cases, **self._fresh}))
            os.replace(tmp, self.folder / "cases.json")


def _matrices(sub: pd.DataFrame, common: list[str], pcols: list[str]) -> list[np.ndarray]:
    """One (cases, classes) matrix per seed, rows in `common` order (a case's first row when it repeats)."""
    pos = pd.Categorical(sub["case_id"].astype(str), categories=common).codes
    probs = sub[pcols].to_numpy(float)
    out = []
    for seed in np.unique(sub["seed"].to_numpy()):
        rows = np.flatnonzero((sub["seed"].to_numpy() == seed) & (pos >= 0))[::-1]  # first row written last
        P = np.full((len(common), len(pcols)), np.nan)
        P[pos[rows]] = probs[rows]
        out.append(P)
    return out


def rank_predictions(
    tables: Mapping[str, pd.DataFrame],
    headline: dict[str, str],
    classes: Sequence[str],
    primary: str,
    *,
    split: str,
    n_boot: int,
    seed: int,
    binary_positive: Sequence[str] | None = None,
    digests: Mapping[str, str] | None = None,
    cache: ReplicateCache | None = None,
    mask_classes: Sequence[str] | None = None,
) -> tuple[Ranking, list[str]]:
    """Rank records from their stored predictions (record key -> table), each on its headline regime.

    With `mask_classes` (a segmentation board) the tables are count tables: each seed's matrix is the cases' count
    columns (`bench.metrics.segmentation.count_columns`), scored by the segmentation metric's own kernel, and
    `classes` (the image labels of `y_true`) only form the bootstrap strata.

    Cases are the `split` rows every table holds (hashed ids, identical across records of one leaderboard); a
    note says so when some record held cases the others lack. With `digests` (record key -> the verified sha256 of
    its predictions file) and a `cache`, a table is read only when its replicates or case set are not cached:
    `tables` may parse lazily.
    """
    notes = []
    classes = list(classes)
    seg = mask_classes is not None
    metric = get_metric(primary, list(mask_classes) if seg else classes)  # type: ignore[arg-type]
    pcols = count_columns(mask_classes) if seg else [f"prob_{c}" for c in classes]  # type: ignore[arg-type]
    use_cache = cache is not None and digests is not None and all(k in digests for k in tables)
    subsets: dict[str, pd.DataFrame] = {}

    def subset(k: str) -> pd.DataFrame:
        if k not in subsets:
            df = tables[k]
            subsets[k] = df[(df["split"].astype(str) == split) & (df["regime"].astype(str) == headline[k])]
        return subsets[k]

    def ids_of(k: str) -> list[str]:
        return sorted(set(subset(k)["case_id"].astype(str)))

    case_sets: dict[str, str] = {}
    for k in tables:
        known = cache.case_set(digests[k], split, headline[k]) if use_cache else None  # type: ignore[union-attr,index]
        if known is None:
            known = ReplicateCache.digest(ids_of(k))
            if use_cache:
                cache.remember_case_set(digests[k], split, headline[k], known)  # type: ignore[union-attr,index]
        case_sets[k] = known
    if len(set(case_sets.values())) == 1:
        common = ids_of(next(iter(tables)))
    else:
        sets = [set(ids_of(k)) for k in tables]
        common = sorted(set.intersection(*sets)) if sets else []
        notes.append(f"ranked on the {len(common)} {split} cases every record predicts")
    if not common:
        raise BadInput(f"the records share no {split} cases: they cannot be ranked together")
    first = subset(next(iter(tables)))
    cases = first.drop_duplicates("case_id").set_index("case_id").loc[common]
    y = cases["y_true"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(int)
    codes, strata = _patients(y, cases["patient_id"].to_numpy(), cases["site"].to_numpy())
    score_fn = None
    pos_idx: list[int] = []
    if seg:

        def score_fn(C: np.ndarray) -> tuple[np.ndarray, None]:
            return C, None  # a count-matrix kernel takes the counts as its truth and no score

    elif metric.target == "binary":
        pos = list(binary_positive) if binary_positive else classes[1:]
        pos_idx = [classes.index(c) for c in pos]
        yb = np.isin(y, pos_idx)

        def score_fn(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return yb, P[:, pos_idx].sum(axis=1)

    context = ReplicateCache.digest(
        RANK_CACHE_VERSION, _code(), registry_fingerprint(), scorer_fingerprint(), primary, classes, pos_idx, split, n_boot, seed,
        ReplicateCache.digest(common), y.astype(np.int64), codes.astype(np.int64), np.asarray(strata, dtype=np.int64),
        *([list(mask_classes)] if seg else []),  # type: ignore[arg-type]
    )  # fmt: skip
    keys = list(tables)
    point = np.full(len(keys), np.nan)
    reps = np.full((n_boot, len(keys)), np.nan)
    n_seeds: dict[str, int] = {}
    missing: list[int] = []
    entry_keys = {}
    for j, k in enumerate(keys):
        if use_cache:
            entry_keys[k] = ReplicateCache.digest(context, k, digests[k], headline[k])  # type: ignore[index]
            hit = cache.get(entry_keys[k], n_boot)  # type: ignore[union-attr]
            if hit is not None:
                point[j], n_seeds[k], reps[:, j] = hit
                continue
        missing.append(j)
    entries = [Entry(keys[j], _matrices(subset(keys[j]), common, pcols)) for j in missing]
    for e in entries:
        n_seeds[e.key] = len(e.probs)
    if entries:
        p, r = entry_replicates(
            entries, y, codes, strata, metric, n_boot=n_boot, seed=seed, score_fn=score_fn
        )
        point[missing], reps[:, missing] = p, r
        if use_cache:
            for i, j in enumerate(missing):
                cache.put(entry_keys[keys[j]], float(p[i]), n_seeds[keys[j]], r[:, i])  # type: ignore[union-attr]
    if use_cache:
        cache.save()  # type: ignore[union-attr]
    few = [k for k in keys if k in n_seeds and n_seeds[k] < MIN_SEEDS]
    if few:
        notes.append(
            f"few_seeds: {', '.join(few)} ha{'s' if len(few) == 1 else 've'} fewer than {MIN_SEEDS} training seeds; "
            "their rank intervals understate seed-to-seed variation"
        )
    n_patients = int(codes.max() + 1) if len(codes) else 0
    ranking = rank_replicates(keys, point, reps, metric.higher_is_better, len(y), n_patients)
    return ranking, notes


def prime_replicates(
    table: pd.DataFrame,
    record: Mapping[str, Any],
    classes: Sequence[str],
    *,
    n_boot: int,
    seed: int,
    binary_positive: Sequence[str] | None = None,
    mask_classes: Sequence[str] | None = None,
) -> None:
    """Cache one newly stored record's ranking replicates, as `submit` writes it: the build that follows finds them
    when the board's records share this record's cases (the usual case; otherwise it computes them itself)."""
    with contextlib.suppress(BadInput, KeyError, ValueError):
        rank_predictions(
            {record["id"]: table},
            {record["id"]: record["metrics"]["headline_regime"]},
            classes,
            record["evaluation"]["primary_metric"],
            split=record["evaluation"]["split"],
            n_boot=n_boot,
            seed=seed,
            binary_positive=binary_positive,
            digests={record["id"]: record["predictions_sha256"]},
            cache=replicate_cache(),
            mask_classes=mask_classes,
        )
