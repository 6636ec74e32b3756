"""Re-scoring a submission from its predictions: the numbers a record carries.

Every number comes from bench.metrics on the predictions themselves (reported numbers are never read):
`evaluate_predictions` for each regime's primary metric, the headline regime's worst subgroup and subgroup gap (via
`bench.evaluation.summary.summarize`) and every metric the registry gives a leaderboard column (`columns`, calibration error among them), `compare_to_baseline` for the paired ratio and differences against the
real-only runs of the same submission. All use the same patient-clustered bootstrap (patients resampled within
site x label strata, training seeds averaged inside each replicate) with the leaderboard's replicate count and
seed, so a record is reproducible from its stored predictions. A segmentation board scores count tables (recounted
from label maps against the answer key's masks, `bench.leaderboard.segboard`) with `bench.metrics.segeval` on the
same engine: the primary metric (macro Dice) for worst subgroup and gap, `column_metrics` for the columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bench.evaluation.summary import summarize
from bench.metrics import compare_to_baseline, evaluate_predictions, get_metric, reported
from bench.metrics.compare import headline_split
from bench.metrics.core import Metric
from bench.metrics.segeval import compare_segmentation, evaluate_segmentation
from bench.metrics.table import MetricTable
from bench.runfolder import BASELINE, BASELINE_REGIME
from bench.tasks import Task


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if not np.isfinite(f) else round(f, 6)


def _est(value: Any, lo: Any, hi: Any) -> dict[str, float | None]:
    return {"value": _num(value), "ci_low": _num(lo), "ci_high": _num(hi)}


def _comparison(comp: pd.DataFrame, gen: str, regime: str, metric: str, split: str) -> pd.Series | None:
    if comp is None or comp.empty:
        return None
    return MetricTable(comp).one(metric, split=split, generator=gen, regime=regime)


def _scarce_pairs(regimes: list[str], own: list[str]) -> list[tuple[float, str, str]]:
    pairs = []
    for r in own:
        head, _, rest = r.partition(":")
        frac = rest.split("+")[0]
        if head == "scarce" and rest.endswith("+synthetic") and f"scarce:{frac}" in regimes:
            pairs.append((float(frac), r, f"scarce:{frac}"))
    return sorted(pairs)


def column_metrics(task_kind: str = "classification") -> list[Metric]:
    """The metrics a board shows as columns: those the registry gives a leaderboard column; on a segmentation board
    also those it compares with real-only (macro Dice, lesion F1, instance Dice), once each."""
    if task_kind != "segmentation":
        return reported("leaderboard")
    out = {m.name: m for m in [*reported("leaderboard", task_kind), *reported("comparisons", task_kind)]}
    return list(out.values())


def metric_classes(task: Task) -> list[str]:
    """The classes a task's metric names are resolved with: its mask classes for a segmentation task."""
    return list(task.mask_classes if task.is_segmentation else task.classes)


def _evaluate(preds: pd.DataFrame, task: Task, **kw: Any) -> pd.DataFrame:
    if task.is_segmentation:
        return evaluate_segmentation(preds, task, **kw)
    return evaluate_predictions(preds, task, **kw)


def _compare(preds: pd.DataFrame, task: Task, **kw: Any) -> pd.DataFrame:
    if task.is_segmentation:
        return compare_segmentation(preds, task, **kw)
    return compare_to_baseline(preds, task, **kw)


@dataclass
class Scored:
    """bench.metrics tables of a whole submission, computed once and sliced per record."""

    table: pd.DataFrame
    comparisons: pd.DataFrame
    rescue: pd.DataFrame
    split: str


def score_all(preds: pd.DataFrame, task: Task, *, primary: str, n_boot: int, seed: int) -> Scored:
    """Evaluate every run of the submission at once: the same cases, strata and replicates for every record."""
    src = "submitted predictions"
    table = _evaluate(preds, task, n_boot=n_boot, seed=seed, source=src)
    comp = pd.DataFrame()
    if ((preds["generator"] == BASELINE) & (preds["regime"] == BASELINE_REGIME)).any() and (
        preds["generator"] != BASELINE
    ).any():
        comp = _compare(preds, task, n_boot=n_boot, seed=seed, metrics=[primary], source=src)
    # bench.metrics pairs every run with the real-only baseline; relabelling each scarce:F real-only run as that
    # baseline gives the same paired bootstrap for scarce:F+synthetic - scarce:F.
    rescue = []
    regimes = sorted(preds["regime"].astype(str).unique())
    for _frac, with_syn, without in _scarce_pairs(regimes, [r for r in regimes if r.endswith("+synthetic")]):
        sub = preds[
            (preds["regime"] == with_syn) | ((preds["regime"] == without) & (preds["generator"] == BASELINE))
        ]
        sub = sub.copy()
        sub.loc[sub["regime"] == without, "regime"] = BASELINE_REGIME
        if (sub["generator"] != BASELINE).any() and (sub["generator"] == BASELINE).any():
            c = _compare(sub, task, n_boot=n_boot, seed=seed, metrics=[primary], source=src)
            rescue.append(c.assign(baseline_regime=without))
    return Scored(
        table, comp, pd.concat(rescue, ignore_index=True) if rescue else pd.DataFrame(), headline_split(table)
    )


def score_submission(
    preds: pd.DataFrame,
    task: Task,
    *,
    generator: str,
    primary: str,
    n_boot: int,
    seed: int,
    scored: Scored | None = None,
) -> tuple[dict[str, Any], str]:
    """The `metrics` section of a record for `generator` (its own regimes plus the real-only regimes of the same
    run), and the evaluation split it was scored on. `scored` reuses tables computed by `score_all`."""
    sc = scored or score_all(preds, task, primary=primary, n_boot=n_boot, seed=seed)
    table, split = sc.table, sc.split
    keep = (preds["generator"] == generator) | (preds["generator"] == BASELINE)
    preds = preds[keep]
    regimes = sorted(preds["regime"].astype(str).unique())
    gen_of = preds.drop_duplicates("regime").set_index("regime")["generator"].astype(str).to_dict()
    seeds_of = preds.groupby("regime")["seed"].nunique().to_dict()
    is_reference = generator == BASELINE
    own = [r for r in regimes if gen_of[r] == generator]
    if is_reference:
        headline = BASELINE_REGIME if BASELINE_REGIME in own else own[0]
    else:
        headline = "synthetic" if "synthetic" in own else own[0]

    mt = MetricTable(table)
    out_regimes = {}
    for r in regimes:
        row = mt.one(primary, split=split, generator=gen_of[r], regime=r)
        assert row is not None  # every arm of the predictions has an overall row on the headline split
        out_regimes[r] = {
            **MetricTable.estimate(row),
            "n_cases": int(row["n_cases"]),
            "n_patients": int(row["n_patients"]),
            "n_seeds": int(seeds_of[r]),
            "seed_sd": _num(row["seed_sd"]),
            "generator": gen_of[r],
        }

    ratio = gain = rescue = None
    if not is_reference:
        c = _comparison(sc.comparisons, generator, headline, primary, split)
        if c is not None and headline != BASELINE_REGIME:
            ratio = _est(c["ratio"], c["ratio_ci_low"], c["ratio_ci_high"])
        mixed = [r for r in own if r.startswith("augment:")]
        rows = {r: _comparison(sc.comparisons, generator, r, primary, split) for r in mixed}
        rows = {r: v for r, v in rows.items() if v is not None and np.isfinite(v["value"])}
        if rows:
            sign = 1.0 if _higher(primary, task) else -1.0
            best = max(rows, key=lambda r: sign * float(rows[r]["value"]))
            b = rows[best]
            gain = {"regime": best, **_est(b["diff"], b["ci_low"], b["ci_high"])}
        pairs = _scarce_pairs(regimes, own)
        if pairs:
            _, with_syn, without = pairs[0]
            c = _comparison(sc.rescue, generator, with_syn, primary, split)
            if c is not None:
                rescue = {
                    "regime": with_syn,
                    "baseline_regime": without,
                    **_est(c["diff"], c["ci_low"], c["ci_high"]),
                }

    summary = summarize(table, None, task)
    run = next(x for x in summary["runs"] if x["generator"] == gen_of[headline] and x["regime"] == headline)
    worst = gap = None
    w = run.get("worst_subgroup_auroc")
    if w and w.get("value") is not None:
        wrow = mt.one(
            summary["auroc_metric"],
            split=split,
            scope="subgroup",
            group_by=w["group_by"],
            group=w["group"],
            generator=gen_of[headline],
            regime=headline,
        )
        worst = {
            "metric": summary["auroc_metric"],
            "group_by": str(w["group_by"]),
            "group": str(w["group"]),
            "n_patients": int(wrow["n_patients"]) if wrow is not None else int(w["n_patients"]),
            **_est(w["value"], w["ci_low"], w["ci_high"]),
        }
    g = run.get("largest_subgroup_gap")
    if g and g.get("value") is not None:
        groups = [str(g["best_group"]), str(g["worst_group"])]
        gap = {
            "metric": summary["auroc_metric"],
            "group_by": str(g["group_by"]),
            "groups": groups,
            **_est(g["value"], g["ci_low"], g["ci_high"]),
        }
    # Tasks with several images per patient also score patients (mean of their images' probabilities).
    patient = None
    prow = mt.one(primary, split=split, scope="patient", generator=gen_of[headline], regime=headline)
    if prow is not None:
        patient = {
            "metric": primary,
            "aggregation": task.metrics.patient_aggregation,
            "n_patients": int(prow["n_patients"]),
            **MetricTable.estimate(prow),
        }

    columns = {}
    for m in column_metrics(task.kind):
        est = mt.overall(m.name, split, generator=gen_of[headline], regime=headline)
        if est is not None:
            columns[m.name] = {"metric": m.name, **est}

    metrics = {
        "headline_regime": headline,
        "regimes": out_regimes,
        "utility_ratio": ratio,
        "gain_mixed": gain,
        "scarcity_rescue": rescue,
        "worst_subgroup": worst,
        "largest_gap": gap,
        "columns": columns,
    }
    if patient is not None:
        metrics["patient_level"] = patient
    return metrics, split


def _higher(metric: str, task: Task) -> bool:
    return get_metric(metric, metric_classes(task)).higher_is_better
