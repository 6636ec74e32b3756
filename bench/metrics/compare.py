"""Paired comparisons against the real-only baseline, and the headline choices (split, AUROC) their readers share.

Every (generator, regime) is compared with the baseline of the same backbone (generator `none`, regime `real`) on
the cases both were scored on. Comparison table columns (`COMPARISON_COLUMNS`):

- run keys `generator`, `regime`, `backbone`; `baseline_generator`, `baseline_regime`;
- `metric`, `scope` (overall | site), `split` (test | external), `group_by`, `group`;
- `value` (candidate), `baseline_value`, `diff` = value - baseline_value with its 95% paired bootstrap interval
  `ci_low`/`ci_high` (the same patient replicates for both, training seeds averaged inside each replicate);
- `p_boot`: two-sided paired bootstrap p-value; `p_delong`: clustered DeLong test (Obuchowski 1997, patients as
  clusters) on the binary-view AUROC (metric `auroc` only), each arm's AUROC its mean over training seeds, with the
  seed-to-seed variance of both arms added (`bench.metrics.delong.delong_seeds`); `p_boot_holm`,
  `p_delong_holm`: Holm-adjusted across the family of candidates compared on the same metric, scope, split and
  group;
- `ratio` = value / baseline_value with `ratio_ci_low`/`ratio_ci_high` (higher-is-better metrics only). For the
  primary metric on external data and regime `synthetic` this is the utility ratio (synthetic-only / real-only);
- `n_cases`, `n_patients`, `n_pos`, `n_seeds`, `baseline_n_seeds`, `status` (ok | insufficient | undefined),
  `reason`;
- `seed_note`: empty, or `few_seeds: ...` when an arm has fewer than 3 training seeds (`MIN_SEEDS`): the
  interval's seed stage then rests on too few models (one seed: seed variance is missing altogether);
- `df`: the difference's Satterthwaite degrees of freedom (inf: no seed stage), behind its t interval;
- `se`: the difference's standard error; `seed_se` the seed stage's part of it (se^2 = patients' part +
  seed_se^2), known to `seed_df` degrees of freedom (n - 1 seeds, the smaller arm's when unpaired). The control
  checks use them to take the seed stage on its own t quantiles at their family-wise level
  (`bench.evaluation.controls`).

Intervals and p-values: the difference +- t_df x its two-stage bootstrap standard error. Each replicate resamples
patients within site x label strata (shared by both arms, so the comparison is paired), then training seeds:
as matched pairs when both arms ran the same seeds (common random numbers), else independently per arm; see
`bench.metrics.bootstrap.seed_difference` and docs/STATISTICS.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from bench.metrics import core, segmentation
from bench.metrics.bootstrap import (
    holm,
    seed_difference,
    seed_note,
    stream_id,
    t_interval,
)
from bench.metrics.delong import delong_seeds
from bench.metrics.evaluate import Engine, Limits, _group_info, _mean_sd, prepare_predictions
from bench.runfolder import ARM_KEYS, BASELINE, BASELINE_REGIME, SCORED_SPLITS
from bench.tasks import Task

COMPARISON_COLUMNS = [
    "generator",
    "regime",
    "backbone",
    "baseline_generator",
    "baseline_regime",
    "metric",
    "scope",
    "split",
    "group_by",
    "group",
    "value",
    "baseline_value",
    "diff",
    "ci_low",
    "ci_high",
    "p_boot",
    "p_boot_holm",
    "p_delong",
    "p_delong_holm",
    "ratio",
    "ratio_ci_low",
    "ratio_ci_high",
    "n_cases",
    "n_patients",
    "n_pos",
    "n_seeds",
    "baseline_n_seeds",
    "status",
    "reason",
    "seed_note",
    "df",
    "se",
    "seed_se",
    "seed_df",
]


def comparison_metrics(task: Task) -> list[str]:
    """The task's primary metric, then every metric registered with `comparisons=True`."""
    names = [task.metrics.primary, *(m.name for m in core.reported("comparisons"))]
    return list(dict.fromkeys(names))


def compare_to_baseline(
    preds: pd.DataFrame,
    task: Task,
    *,
    n_boot: int | None = None,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
    min_patients: int | None = None,
    min_positives: int | None = None,
    min_negatives: int | None = None,
    source: str = "predictions",
) -> pd.DataFrame:
    """Each (generator, regime, backbone) against the real-only baseline; see the module docstring for columns."""
    df = prepare_predictions(preds, task, source=source)
    n_boot = int(task.metrics.bootstrap if n_boot is None else n_boot)
    min_patients = int(task.metrics.min_patients if min_patients is None else min_patients)
    min_positives = int(task.metrics.min_positives if min_positives is None else min_positives)
    limits = Limits(
        min_patients,
        min_positives,
        int(task.metrics.min_negatives if min_negatives is None else min_negatives),
    )
    names = list(metrics or comparison_metrics(task))
    for m in names:
        core.get_metric(m, task.classes)  # unknown names fail early, before any work
    engine = Engine(df, task, n_boot=n_boot, seed=seed, subgroup_columns=[], intersections=[])
    arm = list(ARM_KEYS)
    keys = df[arm].drop_duplicates().sort_values(arm).itertuples(index=False, name=None)
    rows: list[dict[str, Any]] = []
    for gen, reg, bb in keys:
        if gen == BASELINE and reg == BASELINE_REGIME:
            continue
        key = dict(generator=gen, regime=reg, backbone=bb)
        base_df = df[
            (df["generator"] == BASELINE) & (df["regime"] == BASELINE_REGIME) & (df["backbone"] == bb)
        ]
        cand_df = df[(df["generator"] == gen) & (df["regime"] == reg) & (df["backbone"] == bb)]
        if base_df.empty:
            rows.append(
                _empty(
                    key,
                    names[0],
                    f"no real-only baseline (generator {BASELINE!r}, regime "
                    f"{BASELINE_REGIME!r}) with backbone {bb!r}",
                )
            )
            continue
        rows += _compare_one(engine, cand_df, base_df, key, names, limits)
    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    if out.empty:
        return out
    fam = ["metric", "scope", "split", "group"]
    out["p_boot_holm"] = out.groupby(fam, sort=False)["p_boot"].transform(lambda p: holm(p.to_numpy()))
    out["p_delong_holm"] = out.groupby(fam, sort=False)["p_delong"].transform(lambda p: holm(p.to_numpy()))
    return out.reset_index(drop=True)


def _empty(key: dict, metric: str, reason: str) -> dict[str, Any]:
    row = {c: np.nan for c in COMPARISON_COLUMNS}
    row.update(
        key,
        baseline_generator=BASELINE,
        baseline_regime=BASELINE_REGIME,
        metric=metric,
        scope="overall",
        split="",
        group_by="",
        group="all",
        n_cases=0,
        n_patients=0,
        n_pos=0,
        n_seeds=0,
        baseline_n_seeds=0,
        status="undefined",
        reason=reason,
        seed_note="",
    )
    return row


def _compare_one(
    engine: Engine,
    cand_df: pd.DataFrame,
    base_df: pd.DataFrame,
    key: dict,
    names: list[str],
    limits: Limits,
) -> list[dict]:
    ev = lambda d: set(d.loc[d["split"].isin(SCORED_SPLITS), "case_id"])  # noqa: E731
    common = ev(cand_df) & ev(base_df)
    if not common:
        return [_empty(key, names[0], "no test or external cases shared with the baseline")]
    vc = engine.views(cand_df, common)
    vb = engine.views(base_df, common)
    cells = [
        c
        for c in sorted(set().union(*(v.cells for v in vc)))
        if c.scope == "overall" or (c.scope == "site" and c.split == "external")
    ]
    rc = _per_seed(engine, vc, names, cells)
    rb = _per_seed(engine, vb, names, cells)
    # seed k of both arms: the same initialisation and batch order (common random numbers) -> resample pairs
    paired = [v.seed for v in vc] == [v.seed for v in vb]
    streams = (stream_id(_arm_name(key)), stream_id(f"{BASELINE}|{BASELINE_REGIME}|{key['backbone']}"))
    # binary-view scores per seed, for DeLong's test on `auroc` only
    sc, sb = (_seed_scores(vc), _seed_scores(vb)) if "auroc" in names else (None, None)
    note = seed_note(len(vc), len(vb))
    rows = []
    for cell in cells:
        info = _group_info(vc, cell)
        small = limits.problems(info)
        cell_cases = pd.Index(
            pd.concat([v.frame.iloc[v.cells[cell]]["case_id"] for v in vc if cell in v.cells]).unique()
        )
        for m in names:
            metric = core.get_metric(m, engine.classes)
            (pc, xc), (pb, xb) = rc[(cell, m)], rb[(cell, m)]
            val, _ = _mean_sd(pc)
            bval, _ = _mean_sd(pb)
            sd = seed_difference(
                xc, xb, pc, pb, paired=paired, n_boot=engine.n_boot, seed=engine.seed, streams=streams
            )
            lo, hi, p_boot = t_interval(val - bval, sd.diff, sd.df, se=sd.se)
            ratio = rlo = rhi = np.nan
            if metric.higher_is_better and np.isfinite(val) and np.isfinite(bval) and bval > 0:
                ratio = val / bval
                with np.errstate(all="ignore"):
                    rlo, rhi, _ = t_interval(ratio, sd.a / sd.b, sd.df)
            p_delong = np.nan
            if m == "auroc":
                cases = cell_cases.intersection(sc.index).intersection(sb.index)
                res = delong_seeds(
                    sc.loc[cases, "_ybin"].to_numpy(bool),
                    sc.loc[cases].drop(columns=["_ybin", "_pid"]).to_numpy(float).T,
                    sb.loc[cases].drop(columns=["_ybin", "_pid"]).to_numpy(float).T,
                    sc.loc[cases, "_pid"].to_numpy(),
                )
                p_delong = res.p_value
            if not (np.isfinite(val) and np.isfinite(bval)):
                status = "undefined"
                reason = metric.undefined_reason(info.ybin if metric.target == "binary" else info.y) or next(
                    (v.threshold_reason for v in vc + vb if v.threshold_reason),
                    "metric undefined for these cases",
                )
                if metric.task_kind == "segmentation":
                    reason = segmentation.undefined_reason(m)
                lo = hi = p_boot = np.nan
            elif small:
                # no interval or test for too small a group (see the metric table)
                status, reason = "insufficient", "; ".join(small)
                lo = hi = rlo = rhi = p_boot = p_delong = np.nan
            else:
                status, reason = "ok", ""
            rows.append(
                dict(
                    **key,
                    baseline_generator=BASELINE,
                    baseline_regime=BASELINE_REGIME,
                    metric=m,
                    scope=cell.scope,
                    split=cell.split,
                    group_by=cell.group_by,
                    group=cell.group,
                    value=val,
                    baseline_value=bval,
                    diff=val - bval,
                    ci_low=lo,
                    ci_high=hi,
                    p_boot=p_boot,
                    p_boot_holm=np.nan,
                    p_delong=p_delong,
                    p_delong_holm=np.nan,
                    ratio=ratio,
                    ratio_ci_low=rlo,
                    ratio_ci_high=rhi,
                    n_cases=info.n_cases,
                    n_patients=info.n_patients,
                    n_pos=info.n_pos,
                    n_seeds=len(vc),
                    baseline_n_seeds=len(vb),
                    status=status,
                    reason=reason,
                    seed_note=note,
                    df=sd.df,
                    se=sd.se,
                    seed_se=float(np.sqrt(sd.seed_var)),
                    seed_df=sd.seed_df,
                )
            )
    return rows


def comparison_inputs(
    preds: pd.DataFrame, task: Task, *, n_boot: int = 200, seed: int = 0, source: str = "predictions"
) -> list[dict[str, Any]]:
    """Per candidate, on the primary metric, overall, headline split: what the power planner needs.

    Each entry: the run key, `xa`/`xb` (seeds, replicates) and `pa`/`pb` (per-seed values) of candidate and
    baseline on shared patient replicates, `paired`, `n_patients` and the observed difference.
    """
    df = prepare_predictions(preds, task, source=source)
    engine = Engine(df, task, n_boot=n_boot, seed=seed, subgroup_columns=[], intersections=[])
    split = "external" if (df["split"] == "external").any() else "test"
    m = task.metrics.primary
    out = []
    arm = list(ARM_KEYS)
    for gen, reg, bb in df[arm].drop_duplicates().sort_values(arm).itertuples(index=False, name=None):
        if gen == BASELINE and reg == BASELINE_REGIME:
            continue
        base_df = df[
            (df["generator"] == BASELINE) & (df["regime"] == BASELINE_REGIME) & (df["backbone"] == bb)
        ]
        cand_df = df[(df["generator"] == gen) & (df["regime"] == reg) & (df["backbone"] == bb)]
        if base_df.empty:
            continue
        ev = lambda d: set(d.loc[d["split"] == split, "case_id"])  # noqa: E731
        common = ev(cand_df) & ev(base_df)
        if not common:
            continue
        vc, vb = engine.views(cand_df, common), engine.views(base_df, common)
        cells = [
            c
            for c in sorted(set().union(*(v.cells for v in vc)))
            if c.scope == "overall" and c.split == split
        ]
        if not cells:
            continue
        (pc, xc), (pb, xb) = (
            _per_seed(engine, vc, [m], cells)[(cells[0], m)],
            _per_seed(engine, vb, [m], cells)[(cells[0], m)],
        )
        info = _group_info(vc, cells[0])
        out.append(
            dict(
                generator=gen,
                regime=reg,
                backbone=bb,
                metric=m,
                split=split,
                xa=xc,
                xb=xb,
                pa=pc,
                pb=pb,
                paired=[v.seed for v in vc] == [v.seed for v in vb],
                n_patients=int(info.n_patients),
                diff=float(np.nanmean(pc) - np.nanmean(pb)),
            )
        )
    return out


def _arm_name(key: dict) -> str:
    return f"{key['generator']}|{key['regime']}|{key['backbone']}"


def _per_seed(engine: Engine, views: list, names: list[str], cells: list) -> dict:
    """(cell, metric) -> (per-seed values, (seeds, replicates) patient replicates), NaN where a seed lacks it.

    Each seed is computed on its own, on the engine's shared patient replicates, so that the comparison's seed
    stage (`seed_difference`) sees every model's replicates.
    """
    out = {
        (c, m): (np.full(len(views), np.nan), np.full((len(views), engine.n_boot), np.nan))
        for c in cells
        for m in names
    }
    for s, v in enumerate(views):
        mine = [c for c in cells if c in v.cells]
        for k, res in engine.compute([v], names, mine, jackknife=False).items():
            out[k][0][s] = res.point[0]
            out[k][1][s] = res.reps
    return out


def _seed_scores(views: list) -> pd.DataFrame:
    """Per case: binary truth, patient and one binary-view score column per training seed (cases all seeds scored)."""
    first = pd.concat([v.frame[["case_id", "_ybin", "patient_id"]] for v in views]).drop_duplicates("case_id")
    out = first.set_index("case_id").rename(columns={"patient_id": "_pid"})
    for k, v in enumerate(views):
        out[f"s{k}"] = v.frame.set_index("case_id")["_sbin"]
    return out.dropna()


# --------------------------------------------------------------------------------------------- headline choices


def headline_split(table: pd.DataFrame) -> str:
    return "external" if (table["split"] == "external").any() else "test"


def auroc_metric(task: Task) -> str:
    """The AUROC used for worst-group and gap headlines: the primary metric when it is an AUROC."""
    return task.metrics.primary if task.metrics.primary.startswith("auroc") else "auroc_macro"
