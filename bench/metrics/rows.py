"""Rows of the metric table from the engine's results: status and interval per group, worst and gap summaries,
fairness rows and their permutation p-values (the rules are in bench/metrics/evaluate.py's docstring)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from bench.metrics import core, segmentation
from bench.metrics.bootstrap import (
    bca_interval,
    chunks,
    patient_strata,
    percentile_interval,
    stream_id,
)
from bench.metrics.engine import (
    _CELL_BUDGET,
    INTERSECTION_SEP,
    Cell,
    CellResult,
    Engine,
    Limits,
    SeedView,
    _group_info,
    _GroupInfo,
    _mean_sd,
    _nanmean0,
)
from bench.tasks import Task


def _row(
    metric: str,
    cell: Cell,
    value: float,
    lo: float,
    hi: float,
    info: tuple[int, int, int],
    status: str,
    reason: str,
    sd: float,
    key: dict,
    worst_group: str = "",
    best_group: str = "",
    n_undefined: int = 0,
    p_gap: float = float("nan"),
) -> dict:
    return dict(
        n_undefined=int(n_undefined),
        p_gap=p_gap,
        metric=metric,
        scope=cell.scope,
        split=cell.split,
        group_by=cell.group_by,
        group=cell.group,
        worst_group=worst_group,
        best_group=best_group,
        value=value,
        ci_low=lo,
        ci_high=hi,
        n_cases=info[0],
        n_patients=info[1],
        n_pos=info[2],
        status=status,
        reason=reason,
        seed_sd=sd,
        **key,
    )


def _excluded(task: Task, cell: Cell) -> bool:
    excl = task.subgroups.exclude_from_gaps
    cols = cell.group_by.split(INTERSECTION_SEP)
    vals = cell.group.split(INTERSECTION_SEP)
    if len(cols) != len(vals):
        return False
    return any(v in excl.get(c, []) for c, v in zip(cols, vals, strict=True))


def _table_rows(
    engine: Engine,
    views: list[SeedView],
    res: dict[tuple[Cell, str], CellResult],
    names: Sequence[str],
    key: dict,
    limits: Limits,
    n_perm: int,
) -> list[dict]:
    task = engine.task
    rows: list[dict] = []
    cells = sorted({c for c, _ in res})
    status_of: dict[tuple[Cell, str], str] = {}
    infos = {c: _group_info(views, c) for c in cells}
    thr_reason = next((v.threshold_reason for v in views if v.threshold_reason), None)
    for c in cells:
        info = infos[c]
        small = limits.problems(info)
        for m in names:
            r = res[(c, m)]
            value, sd = _mean_sd(r.point)
            lo, hi, used = bca_interval(r.reps, value, r.jack, info.n_patients)
            notes = []
            if np.isnan(value):
                status = "undefined"
                metric = core.get_metric(m, engine.classes)
                why = (thr_reason if metric.needs_threshold else None) or metric.undefined_reason(
                    info.ybin if metric.target == "binary" else info.y
                )
                if m == "auroc_macro" and why is None:
                    absent = [cl for k, cl in enumerate(task.classes) if not (info.y == k).any()]
                    if absent:
                        why = f"no cases of {', '.join(absent)} (macro AUROC is over the task's classes)"
                if why is None and metric.task_kind == "segmentation":
                    why = segmentation.undefined_reason(metric.name)
                notes.append(why or "metric undefined for these cases")
                lo = hi = float("nan")
                used = 0
            elif small:
                # too small a group gets its value but never an interval: a bootstrap of a handful of patients
                # gives intervals that look precise and are not
                status = "insufficient"
                notes += small
                lo = hi = float("nan")
            else:
                status = "ok"
            if status == "ok" and used < engine.n_boot:
                notes.append(
                    f"interval from {used} of {engine.n_boot} replicates (metric undefined in the rest)"
                )
            status_of[(c, m)] = status
            rows.append(
                _row(
                    m,
                    c,
                    value,
                    lo,
                    hi,
                    (info.n_cases, info.n_patients, info.n_pos),
                    status,
                    "; ".join(notes),
                    sd,
                    key,
                    n_undefined=engine.n_boot - used if status == "ok" else 0,
                )
            )
    # group summaries ---------------------------------------------------------------------------------------
    families: dict[tuple[str, str, str], list[Cell]] = {}
    for c in cells:
        if c.scope not in ("overall", "patient"):
            families.setdefault((c.scope, c.split, c.group_by), []).append(c)
    for (scope, split, group_by), members in sorted(families.items()):
        fam_cell = Cell(scope, split, group_by, "")
        perm_metrics = {}
        design: dict = {}
        for m in names:
            metric = core.get_metric(m, engine.classes)
            if not metric.fairness:
                continue
            elig = [c for c in members if status_of[(c, m)] == "ok" and not _excluded(task, c)]
            perm = (
                permutation_gaps(engine, views, elig, m, n_perm, design)
                if len(elig) >= 2 and n_perm
                else None
            )
            perm_metrics[m] = (elig, perm)
            rows += _summary_rows(
                m, metric.higher_is_better, fam_cell, elig, res, infos, key, engine.n_boot, members, perm
            )
        if "sensitivity" not in names or "specificity" not in names:
            continue  # no operating point (a segmentation table): no equalized-odds or FNR rows
        elig = [
            c
            for c in members
            if status_of[(c, "sensitivity")] == "ok"
            and status_of[(c, "specificity")] == "ok"
            and not _excluded(task, c)
        ]
        perm = None
        if len(elig) >= 2 and n_perm and not thr_reason:
            ps = perm_metrics.get("sensitivity")
            sp = perm_metrics.get("specificity")
            sens = (
                ps[1]
                if ps and ps[0] == elig
                else permutation_gaps(engine, views, elig, "sensitivity", n_perm, design)
            )
            spec = (
                sp[1]
                if sp and sp[0] == elig
                else permutation_gaps(engine, views, elig, "specificity", n_perm, design)
            )
            perm = (sens, spec)
        rows += _fairness_rows(fam_cell, elig, res, infos, key, thr_reason, engine.n_boot, perm)
    return rows


def _stack(
    res: dict[tuple[Cell, str], CellResult], elig: list[Cell], m: str
) -> tuple[np.ndarray, np.ndarray]:
    point = np.vstack([res[(c, m)].point for c in elig])  # groups x seeds
    reps = np.vstack([res[(c, m)].reps for c in elig])  # groups x replicates
    return point, reps


def _n(infos: dict[Cell, _GroupInfo], elig: list[Cell]) -> tuple[int, int, int]:
    return (
        sum(infos[c].n_cases for c in elig),
        sum(infos[c].n_patients for c in elig),
        sum(infos[c].n_pos for c in elig),
    )


def _too_few(metric: str, cell: Cell, elig: list[Cell], infos: dict[Cell, _GroupInfo], key: dict) -> dict:
    return _row(
        metric,
        cell,
        float("nan"),
        float("nan"),
        float("nan"),
        _n(infos, elig),
        "insufficient",
        f"{len(elig)} eligible group(s); worst and gap need at least 2 with status ok",
        float("nan"),
        key,
    )


def _spread(point_seeds: np.ndarray, reps: np.ndarray, higher: bool) -> dict[str, Any]:
    """Worst and gap (best - worst) from per-group values: point per seed-average, per seed, per replicate.

    A replicate in which any eligible group is undefined has no worst group and no gap (NaN, counted by the
    caller): dropping the group would silently shrink the gap towards zero.
    """
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = _nanmean0(point_seeds.T)
        worst_i = int(np.nanargmin(mean) if higher else np.nanargmax(mean))
        best_i = int(np.nanargmax(mean) if higher else np.nanargmin(mean))
        w_fn = np.nanmin if higher else np.nanmax
        worst_seed = w_fn(point_seeds, axis=0)
        gap_seed = np.nanmax(point_seeds, axis=0) - np.nanmin(point_seeds, axis=0)
        worst_rep = (np.min if higher else np.max)(reps, axis=0)
        gap_rep = np.max(reps, axis=0) - np.min(reps, axis=0)
    return dict(
        worst=float(mean[worst_i]),
        gap=float(np.nanmax(mean) - np.nanmin(mean)),
        worst_i=worst_i,
        best_i=best_i,
        worst_seed=worst_seed,
        gap_seed=gap_seed,
        worst_rep=worst_rep,
        gap_rep=gap_rep,
    )


def _undefined_note(used: int, n_boot: int) -> str:
    if used >= n_boot:
        return ""
    return (
        f"; {n_boot - used} of {n_boot} replicates had an undefined eligible group and were left out of the "
        "interval"
    )


def _perm_note(perm: np.ndarray | None) -> str:
    if perm is None:
        return ""
    return f"; p_gap: {len(perm) - 1} permutations of group labels within site x label strata"


def _summary_rows(
    m: str,
    higher: bool,
    fam: Cell,
    elig: list[Cell],
    res,
    infos,
    key: dict,
    n_boot: int,
    members: list[Cell] | None = None,
    perm: np.ndarray | None = None,
) -> list[dict]:
    if len(elig) < 2:
        return [_too_few(f"{m}_worst", fam, elig, infos, key), _too_few(f"{m}_gap", fam, elig, infos, key)]
    point, reps = _stack(res, elig, m)
    sp = _spread(point, reps, higher)
    n = _n(infos, elig)
    out = []
    worst, best = elig[sp["worst_i"]].group, elig[sp["best_i"]].group
    left_out = len(members or elig) - len(elig)
    for what, value, seeds, rep, group, ends in (
        ("worst", sp["worst"], sp["worst_seed"], sp["worst_rep"], worst, (worst, "")),
        ("gap", sp["gap"], sp["gap_seed"], sp["gap_rep"], f"{best} vs {worst}", (worst, best)),
    ):
        lo, hi, used = percentile_interval(rep)
        _, sd = _mean_sd(seeds)
        reason = f"over {len(elig)} eligible groups"
        if left_out:
            reason += f" ({left_out} group(s) not eligible: insufficient, undefined or excluded)"
        reason += _undefined_note(used, n_boot)
        p_gap = float("nan")
        if what == "gap" and perm is not None:
            p_gap = permutation_p(perm)
            reason += _perm_note(perm)
        out.append(
            _row(
                f"{m}_{what}",
                Cell(fam.scope, fam.split, fam.group_by, group),
                value,
                lo,
                hi,
                n,
                "ok",
                reason,
                sd,
                key,
                *ends,
                n_undefined=n_boot - used,
                p_gap=p_gap,
            )
        )
    return out


def _fairness_rows(
    fam: Cell,
    elig: list[Cell],
    res,
    infos,
    key: dict,
    thr_reason: str | None,
    n_boot: int = 0,
    perm: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict]:
    names = ("equalized_odds_difference", "fnr_gap")
    if thr_reason:
        return [
            _row(
                nm,
                Cell(fam.scope, fam.split, fam.group_by, "all"),
                *([float("nan")] * 3),
                _n(infos, elig),
                "undefined",
                thr_reason,
                float("nan"),
                key,
            )
            for nm in names
        ]
    if len(elig) < 2:
        return [
            _too_few(nm, Cell(fam.scope, fam.split, fam.group_by, "all"), elig, infos, key) for nm in names
        ]
    sens_p, sens_r = _stack(res, elig, "sensitivity")
    spec_p, spec_r = _stack(res, elig, "specificity")
    s_sens = _spread(sens_p, sens_r, True)
    s_spec = _spread(spec_p, spec_r, True)  # FPR = 1 - specificity, so the FPR gap equals the specificity gap
    n = _n(infos, elig)
    out = []
    eod_seed = np.fmax(s_sens["gap_seed"], s_spec["gap_seed"])
    eod_rep = np.maximum(s_sens["gap_rep"], s_spec["gap_rep"])
    lo, hi, used = percentile_interval(eod_rep)
    p_eod = p_fnr = float("nan")
    note = ""
    if perm is not None:
        p_eod = permutation_p(np.maximum(perm[0], perm[1]))
        p_fnr = permutation_p(perm[0])
        note = _perm_note(perm[0])
    out.append(
        _row(
            "equalized_odds_difference",
            Cell(fam.scope, fam.split, fam.group_by, "all"),
            max(s_sens["gap"], s_spec["gap"]),
            lo,
            hi,
            n,
            "ok",
            f"max of sensitivity gap and false-positive-rate gap over {len(elig)} eligible groups at the validation-chosen threshold"
            + _undefined_note(used, n_boot or used)
            + note,
            _mean_sd(eod_seed)[1],
            key,
            n_undefined=max((n_boot or used) - used, 0),
            p_gap=p_eod,
        )
    )
    lo, hi, used = percentile_interval(s_sens["gap_rep"])
    worst, best = elig[s_sens["worst_i"]].group, elig[s_sens["best_i"]].group
    out.append(
        _row(
            "fnr_gap",
            Cell(fam.scope, fam.split, fam.group_by, f"{worst} vs {best}"),
            s_sens["gap"],
            lo,
            hi,
            n,
            "ok",
            f"false-negative rate of {worst} minus that of {best} (highest vs lowest) over {len(elig)} eligible groups"
            + _undefined_note(used, n_boot or used)
            + note,
            _mean_sd(s_sens["gap_seed"])[1],
            key,
            worst,
            best,
            n_undefined=max((n_boot or used) - used, 0),
            p_gap=p_fnr,
        )
    )
    return out


# --------------------------------------------------------------------------------------------- permutation test


def permutation_p(gaps: np.ndarray) -> float:
    """One-sided p-value of 'no gap': gaps[0] is observed, gaps[1:] under permuted group labels (NaN ones skipped).

    p = (1 + #{permuted >= observed}) / (1 + permutations), never zero.
    """
    g = np.asarray(gaps, dtype=float)
    obs, perm = g[0], g[1:]
    perm = perm[~np.isnan(perm)]
    if np.isnan(obs) or len(perm) == 0:
        return float("nan")
    return float((1 + np.sum(perm >= obs - 1e-12)) / (1 + len(perm)))


def permutation_gaps(
    engine: Engine,
    views: list[SeedView],
    elig: list[Cell],
    metric: str,
    n_perm: int,
    cache: dict | None = None,
) -> np.ndarray:
    """The gap (max - min over `elig` groups of the seed-averaged metric) with the observed group labels (entry 0)
    and under `n_perm` permutations of the labels.

    Labels are permuted between patients within strata of patient label x site (label only when the groups are
    sites), so a permutation keeps each stratum's case mix and every patient's cases together. Where a patient's
    cases fall in several groups (an image-level attribute), case labels are permuted instead, within the same
    strata. The permutations of a family are drawn once from (seed, family) and shared by its metrics.
    """
    key = tuple(elig)
    if cache is not None and key in cache:
        G, per_seed = cache[key]
    else:
        G, per_seed = _permutation_design(engine, views, elig, n_perm)
        if cache is not None:
            cache[key] = (G, per_seed)
    k = len(elig)
    vals = np.full((len(views), k, G.shape[0]), np.nan)
    for s, (v, (idx, u)) in enumerate(zip(views, per_seed, strict=True)):
        kern = engine.kernel(metric, v, idx)
        size = max(1, _CELL_BUDGET // max(len(idx), 1))
        for a, b in chunks(G.shape[0], size):
            Gu = G[a:b][:, u]
            for gi in range(k):
                vals[s, gi, a:b] = kern((Gu == gi).astype(float))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(vals, axis=0)  # groups x permutations
        return np.max(mean, axis=0) - np.min(mean, axis=0)


def _permutation_design(
    engine: Engine, views: list[SeedView], elig: list[Cell], n_perm: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(permutations + 1, units) group codes (row 0 observed) and, per seed, the rows used and their unit."""
    frames = []
    for v in views:
        code = np.full(len(v.frame), -1, dtype=np.int64)
        for gi, c in enumerate(elig):
            code[v.cells[c]] = gi
        keep = np.flatnonzero(code >= 0)
        frames.append((v, keep, code[keep]))
    allc = pd.concat(
        [
            pd.DataFrame({"case": v.frame["case_id"].to_numpy()[i], "p": v.pidx[i], "g": g})
            for v, i, g in frames
        ]
    ).drop_duplicates("case")
    unit_key = "p" if allc.groupby("p")["g"].nunique().max() <= 1 else "case"
    units = allc.drop_duplicates(unit_key).reset_index(drop=True)
    unit_index = pd.Series(np.arange(len(units)), index=units[unit_key].to_numpy())
    pat = engine.patients.iloc[units["p"].to_numpy()].reset_index(drop=True)
    strata = patient_strata(pat, ["label"] if elig[0].group_by == "site" else ["site", "label"])
    g0 = units["g"].to_numpy()
    rng = np.random.default_rng(
        [engine.seed, stream_id(f"{elig[0].scope}|{elig[0].split}|{elig[0].group_by}"), 2]
    )
    # sorting stratum + U(0, 1) keys shuffles units within each stratum; the strata blocks stay in place
    base = np.argsort(strata, kind="stable")
    shuffled = np.argsort(strata[None, :] + rng.random((n_perm, len(units))), axis=1)
    G = np.empty((n_perm + 1, len(units)), dtype=np.int64)
    G[0] = g0
    G[1:, base] = g0[shuffled]
    per_seed = []
    for v, idx, _ in frames:
        keys = v.frame["case_id"].to_numpy()[idx] if unit_key == "case" else v.pidx[idx]
        per_seed.append((idx, unit_index.reindex(keys).to_numpy(np.int64)))
    return G, per_seed
