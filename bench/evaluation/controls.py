"""Controls: generators whose right answer is known, checked before anything is ranked.

Each registered control (`bench.generators.list_controls()`: `copycat`, `label-shuffle`, `real-holdout`) declares
checks (`bench.generators.ControlCheck`). `check_controls` evaluates every check against a run's metric table,
comparisons and privacy audits and returns one `ControlResult` per check: PASS, FAIL (with the numbers) or NOT RUN
(with the reason: the control is not in the run, a regime is missing, an interval is undefined, no audit).
A run's generators are matched to controls by the registered generator name on their card (else their run name).

The interval checks are one family: each is made at level 1 - FAMILY_ALPHA / m (Bonferroni over the m interval
checks that run), so a working pipeline fails some check in at most FAMILY_ALPHA of draws. The 95% intervals of the
metric table and the comparisons are re-made at that level with the training seeds' part on t quantiles of n - 1
degrees of freedom and the patients' part on normal ones (`seed_t`; tables without the seed columns are widened
about their midpoint on their own quantiles); the result shows the interval checked and its level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from scipy.stats import norm
from scipy.stats import t as t_dist

from bench.generators import Control, ControlCheck, control_of, list_controls
from bench.generators.segcontrols import dice_at_chance
from bench.io import read_json
from bench.metrics.compare import auroc_metric, compare_to_baseline, headline_split
from bench.metrics.evaluate import evaluate_predictions
from bench.metrics.table import MetricTable, number
from bench.runfolder import BASELINE, RunDir
from bench.tasks import Task

PASS, FAIL, NOT_RUN = "PASS", "FAIL", "NOT RUN"
REAL_HOLDOUT = "real-holdout"
FAMILY_ALPHA = 0.05  # chance that a working pipeline fails some interval check
INTERVAL_CHECKS = ("chance", "gain_contains_zero", "ratio_near_one", "dice_at_chance")
# Checks that only mean something for one task kind: a control with one of them is left out of the other kind's
# checks (label-shuffle's AUROC at chance for segmenters, mask-shuffle's Dice at chance for classifiers).
KIND_CHECKS = {"chance": "classification", "dice_at_chance": "segmentation"}


@dataclass(frozen=True)
class ControlResult:
    control: str  # the registered control name
    generator: str | None  # its name in the run (None: not in the run)
    role: str
    check: str
    regime: str | None
    expected: str
    status: str  # PASS | FAIL | NOT RUN
    metric: str | None = None
    split: str | None = None
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    reason: str = ""
    level: float | None = None  # confidence level of the interval checked (family-wise adjusted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def observed(self) -> str:
        if self.value is None:
            return "—"
        if self.ci_low is None or self.ci_high is None:
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def run_controls(run: str | Path) -> dict[str, str]:
    """{generator name in RUN: control name} from the run's matrix (card names first, then run names)."""
    rd = RunDir(run)
    out: dict[str, str] = {}
    if not rd.matrix_file.is_file():
        return out
    for gen, entry in rd.matrix().generators.items():
        card = entry.card or {}
        name = card.get("name") if isinstance(card, dict) else None
        for candidate in (name, gen):
            if control_of(candidate) is not None:
                out[gen] = str(candidate)
                break
    return out


def read_privacy(run: str | Path, generators: list[str]) -> dict[str, dict[str, Any]]:
    """Each generator's RUN/privacy/<generator>/privacy.json, where the audit was run."""
    rd = RunDir(run)
    out = {}
    for g in generators:
        p = rd.privacy_file(g)
        if p.is_file():
            out[g] = read_json(p)
    return out


def family_level(m: int, alpha: float = FAMILY_ALPHA) -> float:
    """Per-check confidence level of m interval checks at family-wise error `alpha` (Bonferroni)."""
    return 1 - alpha / max(int(m), 1)


def widen(lo: float, hi: float, level: float, df: float | None = None) -> tuple[float, float]:
    """A 95% interval [lo, hi] widened about its midpoint to `level` (t_df quantiles; normal without df)."""
    q = 1 - (1 - level) / 2
    if df is not None and math.isfinite(df) and df > 0:
        f = float(t_dist.ppf(q, max(df, 1.0)) / t_dist.ppf(0.975, max(df, 1.0)))
    else:
        f = float(norm.ppf(q) / norm.ppf(0.975))
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return mid - f * half, mid + f * half


def with_draw(lo: float, hi: float, value: float, draw_sd: float, level: float) -> tuple[float, float]:
    """[lo, hi] about `value` with an independent draw effect of sd `draw_sd` added in quadrature at `level`."""
    e = float(norm.ppf(1 - (1 - level) / 2)) * draw_sd
    c = value if lo <= value <= hi else (lo + hi) / 2
    return c - math.hypot(c - lo, e), c + math.hypot(hi - c, e)


def seed_t(
    lo: float, hi: float, value: float, seed_var: float, seed_df: float, level: float, q95: float = 1.959964
) -> tuple[float, float]:
    """A 95% interval about `value`, built as value +- `q95` x se, re-made at `level` with its seed stage on t
    quantiles of `seed_df` degrees of freedom: each half-width h holds the patients' part
    c = (h / q95)^2 - seed_var and the seeds' part `seed_var` (what the two-stage bootstrap's seed stage adds), and
    becomes sqrt(z^2 c + t^2 seed_var).

    Why a fixed n - 1 and not the Satterthwaite df: when a run's few seeds happen to agree, their s2 and with it
    the Satterthwaite df's seed share are small, so the interval is narrowest exactly where s2 underestimates the
    procedure's seed variance; with n - 1 df the seeds' mean over their own spread is a t statistic whatever s2
    came out. Measured on the family-wise simulation (docs/STATISTICS.md).
    """
    q = 1 - (1 - level) / 2
    z = float(norm.ppf(q))
    tq = float(t_dist.ppf(q, max(seed_df, 1.0))) if math.isfinite(seed_df) else z
    seed_var = max(float(seed_var), 0.0)

    def half(h: float) -> float:
        common = max(0.0, (h / q95) ** 2 - seed_var)
        return math.sqrt(z**2 * common + tq**2 * seed_var)

    return value - half(max(value - lo, 0.0)), value + half(max(hi - value, 0.0))


def _comparison_at(
    r: pd.Series, lo: float, hi: float, value: float | None, level: float
) -> tuple[float, float]:
    """A comparison's 95% interval (difference or ratio, +- t_df x se) at `level`, its seed stage on `seed_df`
    (`seed_t`); a table without the seed columns (written before they existed) keeps t_df quantiles throughout."""
    df, se, seed_se, seed_df = (
        number(r[k]) if k in r.index else None for k in ("df", "se", "seed_se", "seed_df")
    )
    if value is None or se is None or seed_se is None or seed_df is None or not se > 0:
        return widen(lo, hi, level, df)
    q95 = float(t_dist.ppf(0.975, max(df, 1.0))) if df is not None and math.isfinite(df) else 1.959964
    # the ratio's replicates have their own scale: its seed stage keeps the difference's share of the variance
    own = max(hi - value, value - lo) / q95
    return seed_t(lo, hi, value, (seed_se / se) ** 2 * own**2, seed_df, level, q95)


def _seed_count(comparisons: pd.DataFrame | None, gen: str, regime: str | None, split: str) -> int | None:
    """Training seeds of an arm, as its comparison with real-only counted them (None without one)."""
    if comparisons is None or not len(comparisons) or "n_seeds" not in comparisons.columns:
        return None
    rows = MetricTable(comparisons).select(generator=gen, regime=regime, split=split, scope="overall")
    counts = {int(x) for x in rows["n_seeds"] if number(x) is not None}
    return max(counts) if counts else None


def _contains(lo: float | None, hi: float | None, x: float, margin: float = 0.0) -> bool:
    """Whether [lo, hi] reaches the band x +/- margin (with margin 0: contains x)."""
    return lo is not None and hi is not None and lo <= x + margin and hi >= x - margin


def _one(
    name: str,
    gen: str | None,
    control: Control,
    check: ControlCheck,
    table: pd.DataFrame,
    comparisons: pd.DataFrame | None,
    privacy: Mapping[str, Mapping[str, Any]],
    task: Task,
    split: str,
    level: float = 0.95,
) -> ControlResult:
    base = dict(control=name, generator=gen, role=control.role, check=check.kind, regime=check.regime)
    base["expected"] = check.expected
    if check.kind in ("gain_contains_zero", "ratio_near_one") and task.metrics.primary != "auroc_macro":
        # These checks compare on the task's primary metric; the texts name the classification tasks' one.
        base["expected"] = check.expected.replace("macro AUROC", task.metrics.primary)
    if check.kind in INTERVAL_CHECKS:
        base["level"] = level

    def res(status: str, reason: str = "", **kw: Any) -> ControlResult:
        return ControlResult(**base, status=status, reason=reason, **kw)

    if gen is None:
        if control.regimes and name == REAL_HOLDOUT and task.splits.reserve <= 0:
            return res(NOT_RUN, f"task {task.name} sets no reserve patients (splits.reserve = 0)")
        return res(NOT_RUN, f"no generator of this control in the run (generate it with --generator {name})")
    if check.kind == "privacy_flagged":
        audit = privacy.get(gen)
        if audit is None:
            return res(
                NOT_RUN, f"no privacy audit for {gen} (medsynbench privacy ... --out RUN/privacy/{gen})"
            )
        rate = number(audit.get("memorization_rate"))
        flagged = audit.get("flagged") is True
        return res(
            PASS if flagged else FAIL,
            "" if flagged else "the privacy audit did not flag copies of the training images",
            metric="memorization_rate",
            value=rate,
            ci_low=number(audit.get("ci_low")),
            ci_high=number(audit.get("ci_high")),
        )
    if check.kind in ("chance", "dice_at_chance"):
        if check.kind == "dice_at_chance":
            metric = "dice_macro"
        else:
            metric = (
                "auroc_macro" if len(MetricTable(table).select(metric="auroc_macro")) else auroc_metric(task)
            )
        t = MetricTable(table).select(
            generator=gen, regime=check.regime, metric=metric, split=split, scope="overall"
        )
        if t.empty:
            return res(NOT_RUN, f"no {check.regime} run of {gen}", metric=metric, split=split)
        r = t.sort_values("backbone").iloc[0]
        lo, hi, v = number(r["ci_low"]), number(r["ci_high"]), number(r["value"])
        if lo is None or hi is None:
            return res(
                NOT_RUN, f"interval undefined ({r.get('reason', '')})", metric=metric, split=split, value=v
            )
        n = _seed_count(comparisons, gen, check.regime, split)
        sd = number(r["seed_sd"]) if "seed_sd" in r.index else None
        if v is not None and sd is not None and n is not None and n >= 2:
            lo, hi = seed_t(lo, hi, v, sd**2 / n, n - 1, level)
        else:
            lo, hi = widen(lo, hi, level)
        if check.kind == "dice_at_chance":
            verdict, why = dice_at_chance(lo, hi, check.margin)
            ok = bool(verdict)
        else:
            ok = _contains(lo, hi, 0.5)
            why = "" if ok else "the interval excludes 0.5: labels without information still taught something"
        return res(PASS if ok else FAIL, why, metric=metric, split=split, value=v, ci_low=lo, ci_high=hi)
    if check.kind in ("gain_contains_zero", "ratio_near_one"):
        primary = task.metrics.primary
        c = pd.DataFrame() if comparisons is None else comparisons
        if len(c):
            c = MetricTable(c).select(
                generator=gen, regime=check.regime, metric=primary, split=split, scope="overall"
            )
        if c.empty:
            return res(
                NOT_RUN,
                f"no {check.regime} run of {gen} compared with {BASELINE}",
                metric=primary,
                split=split,
            )
        r = c.sort_values("backbone").iloc[0]
        if check.kind == "gain_contains_zero":
            v, lo, hi, target = number(r["diff"]), number(r["ci_low"]), number(r["ci_high"]), 0.0
            metric = f"{primary} diff vs real"
        else:
            v, lo, hi, target = number(r["ratio"]), number(r["ratio_ci_low"]), number(r["ratio_ci_high"]), 1.0
            metric = f"{primary} ratio to real"
        if lo is None or hi is None:
            return res(
                NOT_RUN, f"interval undefined ({r.get('reason', '')})", metric=metric, split=split, value=v
            )
        lo, hi = _comparison_at(r, lo, hi, v, level)
        if check.draw_sd and v is not None:
            lo, hi = with_draw(lo, hi, v, check.draw_sd, level)
        ok = _contains(lo, hi, target, check.margin)
        band = (
            f"{target:g}" if not check.margin else f"{target - check.margin:g} to {target + check.margin:g}"
        )
        with_sd = f" even with the draw of training patients (sd {check.draw_sd:g})" if check.draw_sd else ""
        why = "" if ok else f"the interval does not reach {band}{with_sd}"
        return res(PASS if ok else FAIL, why, metric=metric, split=split, value=v, ci_low=lo, ci_high=hi)
    return res(NOT_RUN, f"unknown check kind {check.kind!r}")


def check_controls(
    table: pd.DataFrame,
    comparisons: pd.DataFrame | None,
    privacy: Mapping[str, Mapping[str, Any]],
    task: Task,
    generators: Mapping[str, str],
) -> list[ControlResult]:
    """Every check of every registered control; `generators` maps a run's generator name to its control name."""
    split = headline_split(table) if len(table) else "test"
    by_control: dict[str, list[str]] = {}
    for gen, name in generators.items():
        by_control.setdefault(name, []).append(gen)
    plan = []
    for name in list_controls(task.kind):
        control = control_of(name)
        assert control is not None
        if any(KIND_CHECKS.get(c.kind, task.kind) != task.kind for c in control.checks):
            continue
        for gen in sorted(by_control.get(name, [])) or [None]:
            plan += [(name, gen, control, check) for check in control.checks]
    level = family_level(sum(g is not None and c.kind in INTERVAL_CHECKS for _, g, _, c in plan))
    return [
        _one(name, gen, control, check, table, comparisons, privacy, task, split, level)
        for name, gen, control, check in plan
    ]


def failures(results: list[ControlResult] | list[dict[str, Any]]) -> list[str]:
    """One line per failed check, naming the control (for refusals and banners)."""
    rows = [r.to_dict() if isinstance(r, ControlResult) else dict(r) for r in results]
    return [
        f"control {r['control']} ({r.get('generator') or '-'}): {r['expected']}: FAIL, observed "
        f"{_fmt(r)}{' (' + r['reason'] + ')' if r.get('reason') else ''}"
        for r in rows
        if r.get("status") == FAIL
    ]


def _fmt(r: Mapping[str, Any]) -> str:
    v, lo, hi = r.get("value"), r.get("ci_low"), r.get("ci_high")
    if v is None:
        return "—"
    return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def controls_table(results: list[ControlResult] | list[dict[str, Any]]) -> pd.DataFrame:
    """The rows the report and the leaderboard page show."""
    rows = [r.to_dict() if isinstance(r, ControlResult) else dict(r) for r in results]
    return pd.DataFrame(
        [
            {
                "control": r["control"],
                "generator": r.get("generator") or "—",
                "role": r["role"],
                "expected": r["expected"],
                "observed": _fmt(r),
                "result": r["status"],
                "note": r.get("reason") or "",
            }
            for r in rows
        ],
        columns=["control", "generator", "role", "expected", "observed", "result", "note"],
    )


def level_note(results: list[ControlResult] | list[dict[str, Any]]) -> str:
    """The sentence that states the interval checks' level."""
    rows = [r.to_dict() if isinstance(r, ControlResult) else dict(r) for r in results]
    levels = [r.get("level") for r in rows if r.get("level") is not None and r.get("status") != NOT_RUN]
    if not levels:
        return ""
    m = round(FAMILY_ALPHA / (1 - levels[0])) if levels[0] < 1 else len(levels)
    return (
        f"Interval checks at {100 * levels[0]:.1f}% each (Bonferroni over {m}), the training seeds' part of each "
        f"interval on t quantiles of its seeds: a working pipeline fails some check in at most "
        f"{100 * FAMILY_ALPHA:g}% of draws."
    )


def controls_blocks(results: list[ControlResult]) -> list[tuple[str, Any]]:
    """Report blocks of the Controls section: a banner first when a control failed, then the table."""
    blocks: list[tuple[str, Any]] = [("h2", "Controls")]
    failed = failures(results)
    if failed:
        blocks.append(
            (
                "banner",
                f"{len(failed)} control check(s) FAILED: the numbers below are not trustworthy until this is "
                "explained. " + " ".join(failed),
            )
        )
    blocks.append(
        (
            "p",
            "Generators with a known right answer (negative: copies and shuffled labels add nothing; positive: "
            "unseen real patients of the same hospitals are as good as the real training set). PASS: the "
            f"observed interval agrees with the expected outcome; NOT RUN: the control or what it needs is "
            f"missing from this run. {level_note(results)}",
        )
    )
    blocks.append(("table", controls_table(results)))
    return blocks


def controls_from_predictions(
    preds: pd.DataFrame,
    task: Task,
    generators: Mapping[str, str],
    privacy: Mapping[str, Mapping[str, Any]],
    *,
    n_boot: int | None = None,
    seed: int = 0,
) -> list[ControlResult]:
    """`check_controls` scored from predictions alone (the controls' runs and the real-only baseline; no subgroups),
    as a leaderboard re-scores a submission without trusting its evaluation folder."""
    keep = preds["generator"].astype(str).isin([BASELINE, *generators])
    sub = preds[keep].reset_index(drop=True)
    if sub.empty or not (sub["generator"].astype(str) == BASELINE).any():
        return check_controls(pd.DataFrame(columns=["metric", "split"]), None, privacy, task, {})
    table = evaluate_predictions(sub, task, n_boot=n_boot, seed=seed, subgroup_columns=[], intersections=[])
    comps = compare_to_baseline(sub, task, n_boot=n_boot, seed=seed, metrics=[task.metrics.primary])
    return check_controls(table, comps, privacy, task, generators)
