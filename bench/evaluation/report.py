"""Evaluation reports: Markdown and one self-contained HTML file (plots embedded as base64 PNG).

Every number printed carries its 95% interval and its n; groups below the minimum sizes are marked, never ranked.
The report is built from the tidy tables (`bench.metrics`) and, for curves, from the prepared predictions. Which
metrics are headline numbers and which worst groups the fairness section shows come from the metric registry.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench.evaluation.report_plots import _grid, _plt, _png, plot_differences, plot_utility
from bench.metrics.core import ece_bin_index, reported
from bench.metrics.power import tie_note
from bench.metrics.table import MetricTable
from bench.metrics.validate import prob_column
from bench.runfolder import ARM_KEYS, BASELINE, BASELINE_REGIME, SCORED_SPLITS
from bench.tasks import Task

RUN_KEY = list(ARM_KEYS)

MAX_PANELS = 12
INSUFFICIENT_MARK = "†"


@dataclass
class Settings:
    n_boot: int
    seed: int
    min_patients: int
    min_positives: int
    threshold: str = "validation"  # or a fixed number as text
    source: str = ""


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def figure(self, caption: str, png: bytes | None) -> None:
        if png is not None:
            self.blocks.append(("figure", (caption, png)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        n_fig = 0
        for kind, obj in self.blocks:
            if kind == "h2":
                out += [f"## {obj}", ""]
            elif kind == "banner":
                out += [f"> **WARNING: {obj}**", ""]
            elif kind == "p":
                out += [obj, ""]
            elif kind == "table":
                out += [_md_table(obj), ""]
            elif kind == "figure":
                n_fig += 1
                out += [f"*Figure {n_fig}: {obj[0]} (plot in report.html).*", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        parts = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        n_fig = 0
        for kind, obj in self.blocks:
            if kind == "h2":
                parts.append(f"<h2>{html.escape(obj)}</h2>")
            elif kind == "banner":
                parts.append(
                    f"<div class='banner' role='alert'><strong>WARNING:</strong> {_inline_html(obj)}</div>"
                )
            elif kind == "p":
                parts.append(f"<p>{_inline_html(obj)}</p>")
            elif kind == "table":
                parts.append(obj.to_html(index=False, escape=True, border=0, na_rep=""))
            elif kind == "figure":
                n_fig += 1
                b64 = base64.b64encode(obj[1]).decode("ascii")
                parts.append(
                    f"<figure><img alt='{html.escape(obj[0])}' src='data:image/png;base64,{b64}'>"
                    f"<figcaption>Figure {n_fig}: {html.escape(obj[0])}</figcaption></figure>"
                )
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.85em}th,td{padding:3px 8px;border-bottom:1px solid #ddd;"
    "text-align:left}th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:0.9em;color:#555}"
    "code{background:#f3f3f3;padding:0 3px}"
    ".banner{background:#b00020;color:#fff;padding:0.8em 1em;margin:1em 0;font-size:1.1em;border-radius:4px}"
)


def _inline_html(text: str) -> str:
    esc = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc)


def _md_cell(v: Any) -> str:
    s = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_"
    head = "| " + " | ".join(_md_cell(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def fmt_interval(
    value: Any,
    lo: Any,
    hi: Any,
    n_cases: Any = None,
    n_patients: Any = None,
    status: str = "ok",
    digits: int = 3,
) -> str:
    """'0.912 [0.880, 0.940] n=80/40' (cases/patients); '—' with the status when there is no value."""

    def f(x: Any) -> str:
        try:
            x = float(x)
        except (TypeError, ValueError):
            return "—"
        return "—" if np.isnan(x) else f"{x:.{digits}f}"

    n = ""
    if n_cases is not None and n_patients is not None:
        n = f" n={int(n_cases)}/{int(n_patients)}"
    if f(value) == "—":
        return f"— ({status}){n}"
    mark = f" {INSUFFICIENT_MARK}" if status == "insufficient" else ""
    return f"{f(value)} [{f(lo)}, {f(hi)}]{n}{mark}"


def _fmt_row(r: pd.Series) -> str:
    return fmt_interval(r["value"], r["ci_low"], r["ci_high"], r["n_cases"], r["n_patients"], r["status"])


def _fmt_p(p: Any) -> str:
    try:
        p = float(p)
    except (TypeError, ValueError):
        return "—"
    if np.isnan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _key_label(key: Sequence[Any]) -> str:
    return f"{key[0]} / {key[1]}" + (f" / {key[2]}" if len(key) > 2 else "")


def _run_label(df: pd.DataFrame) -> pd.Series:
    multi_bb = df["backbone"].nunique() > 1
    lab = df["generator"].astype(str) + " / " + df["regime"].astype(str)
    return lab + (" / " + df["backbone"].astype(str) if multi_bb else "")


# --------------------------------------------------------------------------------------------- plots


def _case_level(prep: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Seed-averaged scores per (run key, case) for curves."""
    ev = prep[prep["split"].isin(SCORED_SPLITS)]
    probs = [prob_column(c) for c in classes]
    keep = [*RUN_KEY, "case_id"]
    other = [c for c in ev.columns if c not in (*probs, "_sbin", "seed", *keep)]
    agg = ev.groupby(keep, sort=True)[[*probs, "_sbin"]].mean()
    first = ev.groupby(keep, sort=True)[other].first()
    return agg.join(first).reset_index()


def plot_roc(cases: pd.DataFrame, by: str, split: str, title: str) -> bytes | None:
    """Binary-view ROC per group `by`, one panel per run key (seed-averaged scores)."""
    # sklearn is slow to import; only the report's ROC panels need it
    from sklearn.metrics import roc_auc_score, roc_curve

    d = cases[cases["split"] == split]
    if d.empty or by not in d.columns:
        return None
    keys = list(d.groupby(RUN_KEY, sort=True).groups)[:MAX_PANELS]
    plt = _plt()
    rows, cols = _grid(len(keys))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        k = d[(d["generator"] == key[0]) & (d["regime"] == key[1]) & (d["backbone"] == key[2])]
        for g, gd in k.groupby(by, sort=True):
            y = gd["_ybin"].to_numpy(bool)
            if y.all() or not y.any():
                continue
            fpr, tpr, _ = roc_curve(y, gd["_sbin"])
            ax.plot(fpr, tpr, lw=1.3, label=f"{g} ({roc_auc_score(y, gd['_sbin']):.2f}, n={len(gd)})")
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8, ls="--")
        ax.set_title(_key_label(key), fontsize=9)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _png(fig)


def plot_reliability(cases: pd.DataFrame, classes: Sequence[str], n_bins: int, split: str) -> bytes | None:
    """Top-label reliability diagram per run key: accuracy against mean confidence in equal-width bins."""
    d = cases[cases["split"] == split]
    if d.empty:
        return None
    keys = list(d.groupby(RUN_KEY, sort=True).groups)[:MAX_PANELS]
    plt = _plt()
    rows, cols = _grid(len(keys))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    probs = [prob_column(c) for c in classes]
    for ax, key in zip(axes.flat, keys, strict=False):
        k = d[(d["generator"] == key[0]) & (d["regime"] == key[1]) & (d["backbone"] == key[2])]
        P = k[probs].to_numpy(float)
        conf = P.max(axis=1)
        correct = P.argmax(axis=1) == k["_y"].to_numpy()
        b = ece_bin_index(conf, n_bins)
        cnt = np.bincount(b, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.bincount(b, weights=correct.astype(float), minlength=n_bins) / cnt
            mc = np.bincount(b, weights=conf, minlength=n_bins) / cnt
        ok = cnt > 0
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8, ls="--")
        ax.plot(mc[ok], acc[ok], marker="o", lw=1.2)
        ax2 = ax.twinx()
        ax2.bar((np.arange(n_bins) + 0.5) / n_bins, cnt, width=1 / n_bins, alpha=0.15, color="gray")
        ax2.set_yticks([])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{_key_label(key)} (n={len(k)})", fontsize=9)
        ax.set_xlabel("mean top-label confidence")
        ax.set_ylabel("accuracy")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"Reliability, {split} ({n_bins} equal-width bins; grey: cases per bin)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _png(fig)


def plot_forest(table: pd.DataFrame, metric: str, split: str) -> bytes | None:
    """Subgroup (and intersection) values with 95% intervals; hollow markers: insufficient groups."""
    t = MetricTable(table).select(metric=metric, split=split, scope=("subgroup", "intersection"))
    t = t[t["value"].notna()]
    if t.empty:
        return None
    t = t.assign(_run=_run_label(t))
    groups = t[["scope", "group_by", "group"]].drop_duplicates().sort_values(["scope", "group_by", "group"])
    runs = sorted(t["_run"].unique())[:MAX_PANELS]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(groups) * max(1, len(runs)) ** 0.5 + 1.5))
    ylabels = [f"{r.group_by}={r.group}" for r in groups.itertuples()]
    pos = {tuple(r): i for i, r in enumerate(groups.itertuples(index=False, name=None))}
    width = 0.7
    for j, run in enumerate(runs):
        rt = t[t["_run"] == run]
        off = (j - (len(runs) - 1) / 2) * (width / max(len(runs), 1))
        y = (
            np.array(
                [pos[(s, gb, g)] for s, gb, g in zip(rt["scope"], rt["group_by"], rt["group"], strict=True)]
            )
            + off
        )
        err = np.vstack([rt["value"] - rt["ci_low"], rt["ci_high"] - rt["value"]]).clip(min=0)
        ok = (rt["status"] == "ok").to_numpy()
        color = f"C{j % 10}"
        ax.errorbar(rt["value"], y, xerr=np.nan_to_num(err), fmt="none", lw=1, capsize=2, color=color)
        ax.scatter(rt["value"][ok], y[ok], color=color, s=18, label=run, zorder=3)
        ax.scatter(rt["value"][~ok], y[~ok], facecolors="white", edgecolors=color, s=18, zorder=3)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (95% patient-bootstrap interval)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{metric} by subgroup, {split} (hollow: insufficient)", fontsize=10)
    return _png(fig)


def _tie_notes(c: pd.DataFrame) -> list[str]:
    df = c["df"] if "df" in c.columns else pd.Series(np.nan, index=c.index)
    return [tie_note(lo, hi, d) for lo, hi, d in zip(c["ci_low"], c["ci_high"], df, strict=True)]


def add_difference_overview(rep: Report, comparisons: pd.DataFrame | None, task: Task, split: str) -> None:
    """The report's one-glance figure: every (generator, regime) against real-only, with seed counts and method."""
    if comparisons is None or comparisons.empty:
        return
    primary = task.metrics.primary
    c = MetricTable(comparisons).select(metric=primary, split=split, scope="overall")
    if c.empty:
        return
    rep.h("At a glance: difference from real-only")
    rep.figure(
        f"{primary} of each (generator, regime) minus real-only, {split}", plot_differences(c, primary, split)
    )
    n_c = sorted({int(n) for n in c["n_seeds"].dropna()})
    n_b = sorted({int(n) for n in c["baseline_n_seeds"].dropna()})
    flagged = int((c.get("seed_note", pd.Series("", index=c.index)).astype(str) != "").sum())
    rep.table(
        pd.DataFrame(
            {
                "generator": c["generator"],
                "regime": c["regime"],
                "backbone": c["backbone"],
                f"{primary} diff [95% CI]": [
                    fmt_interval(d, lo, hi)
                    for d, lo, hi in zip(c["diff"], c["ci_low"], c["ci_high"], strict=True)
                ],
                "seeds (candidate / real)": [
                    f"{int(a)} / {int(b)}" for a, b in zip(c["n_seeds"], c["baseline_n_seeds"], strict=True)
                ],
                "p (bootstrap, Holm)": [_fmt_p(p) for p in c["p_boot_holm"]],
                "tie: smallest detectable difference": _tie_notes(c),
            }
        )
    )
    rep.p(
        f"Training seeds per arm: candidates {', '.join(map(str, n_c))}, real-only {', '.join(map(str, n_b))}. "
        "Intervals and p-values come from a two-stage bootstrap: each replicate resamples patients within "
        "site x label strata (shared by both arms, so the comparison is paired), then the training seeds (as "
        "matched pairs when both arms ran the same seeds), so that seed-to-seed variation is part of every "
        "interval; the interval is the difference +- t x its standard error (docs/STATISTICS.md). A tie "
        "(interval holding 0) states the smallest difference the design detects with 80% power."
        + (
            f" {flagged} comparison(s) have fewer than 3 seeds in an arm (`few_seeds`): their seed stage rests "
            "on too few models and the interval may be too narrow."
            if flagged
            else ""
        )
    )


def add_patient_level(rep: Report, table: pd.DataFrame, task: Task) -> None:
    """Patient-level scores (scope `patient`) of tasks that aggregate several images per patient."""
    t = MetricTable(table).select(scope="patient", metric=task.metrics.primary)
    if t.empty:
        return
    rep.h("Patient-level scores")
    rep.table(
        pd.DataFrame(
            {
                "generator": t["generator"],
                "regime": t["regime"],
                "backbone": t["backbone"],
                "split": t["split"],
                f"{task.metrics.primary} per patient [95% CI] n": [_fmt_row(r) for _, r in t.iterrows()],
            }
        )
    )
    rep.p(
        f"Each patient scored once with the {task.metrics.patient_aggregation} of its images' class probabilities "
        "(task setting `metrics.patient_aggregation`) and the most frequent class of its images; n counts patients."
    )


# --------------------------------------------------------------------------------------------- report


def _seg_settings_text(task: Task, s: Settings) -> str:
    classes = ", ".join(task.mask_classes)
    return (
        f"Task `{task.name}` version {task.version} (segmentation); mask classes {classes}. Dice and lesion "
        f'detection are pooled over the cases of a group (docs/STATISTICS.md, "Segmentation metrics"); a lesion is '
        f"found when a predicted lesion of its class overlaps it with IoU > 0.5. Intervals: 95% intervals from "
        f"{s.n_boot} bootstrap replicates resampling patients (not images) within site x patient-label strata, seed "
        f"{s.seed}; training seeds are averaged inside every replicate and their spread is `seed_sd` in the tables. "
        f"Minimum group size: {s.min_patients} patients and {s.min_positives} patients with a lesion; smaller "
        f"groups are marked {INSUFFICIENT_MARK} (insufficient) and left out of worst-group and gap statistics. "
        f"Numbers read value [95% interval] n=cases/patients."
    )


def _settings_text(task: Task, s: Settings) -> str:
    if task.kind == "segmentation":
        return _seg_settings_text(task, s)
    thr = (
        f"chosen per training seed on the validation split as the most sensitive operating point with specificity "
        f">= {task.metrics.target_specificity:g} on the binary view, then applied unchanged to test and external data"
        if s.threshold == "validation"
        else f"fixed at {s.threshold} on the binary-view score"
    )
    bv = task.labels.binary_view
    pos = ", ".join(bv.positive) if bv else ", ".join(task.classes[1:])
    return (
        f"Task `{task.name}` version {task.version}; classes {', '.join(task.classes)}; binary view: positive = {pos}. "
        f"Intervals: 95% percentile intervals from {s.n_boot} bootstrap replicates resampling patients (not images) "
        f"within site x patient-label strata, seed {s.seed}; training seeds are averaged inside every replicate and "
        f"their spread is `seed_sd` in the tables. Minimum group size: {s.min_patients} patients and {s.min_positives} "
        f"patients with a positive case (defaults from the task); smaller groups are marked {INSUFFICIENT_MARK} "
        f"(insufficient) and left out of worst-group and gap statistics. Threshold: {thr}. ECE: top-label, "
        f"{task.metrics.ece_bins} equal-width bins. Numbers read value [95% interval] n=cases/patients. Worst-group, "
        f"gap and ECE statistics are biased upward in small samples, so their percentile intervals need not contain "
        f"the point estimate."
    )


def build_report(
    table: pd.DataFrame,
    comparisons: pd.DataFrame | None,
    summary: dict[str, Any],
    task: Task,
    settings: Settings,
    prepared: pd.DataFrame | None = None,
    *,
    title: str | None = None,
    audit: bool = False,
) -> Report:
    """The evaluation (or, with `audit`, fairness-only) report."""
    primary = task.metrics.primary
    split = summary.get("headline_split", "test")
    rep = Report(
        title or (f"Fairness audit: {task.name}" if audit else f"Evaluation: {task.name} {task.version}")
    )
    if not audit:
        add_difference_overview(rep, comparisons, task, split)
        add_patient_level(rep, table, task)
    rep.h("Settings")
    rep.p(_settings_text(task, settings))
    if settings.source:
        rep.p(f"Source: `{settings.source}`.")
    if not audit:
        rep.h("Headline numbers")
        rows = []
        for r in summary.get("runs", []):

            def e(name: str, r=r, digits: int = 3) -> str:
                x = r.get(name)
                if not x:
                    return "—"
                return fmt_interval(
                    x["value"],
                    x["ci_low"],
                    x["ci_high"],
                    x.get("n_cases"),
                    x.get("n_patients"),
                    x.get("status", "ok"),
                    digits,
                )

            rows.append(
                {
                    "generator": r["generator"],
                    "regime": r["regime"],
                    "backbone": r["backbone"],
                    f"{primary} external": e("external_primary"),
                    f"{primary} test": e("test_primary"),
                    "worst subgroup": e("worst_subgroup_auroc")
                    + (
                        f" ({r['worst_subgroup_auroc']['group_by']}={r['worst_subgroup_auroc']['group']})"
                        if r.get("worst_subgroup_auroc")
                        else ""
                    ),
                    "largest gap": e("largest_subgroup_gap"),
                    **{
                        f"{m.display} {split}": e(m.name, digits=m.digits)
                        for m in reported("headline", task.kind)
                        if m.name
                        != primary  # macro Dice is both a segmentation task's primary and a headline
                    },
                    "diff vs real": e("diff_vs_real")
                    + (
                        f" p(Holm)={_fmt_p(r['diff_vs_real']['p_boot_holm'])}"
                        if r.get("diff_vs_real")
                        else ""
                    ),
                    "ratio to real": e("utility_ratio"),
                }
            )
        rep.table(pd.DataFrame(rows))
        rep.p(
            f"Worst subgroup and largest gap use `{summary.get('auroc_metric', primary)}` over the task's subgroup "
            f"columns on the {split} split; diff vs real and ratio to real use `{primary}` on the {split} split "
            f"against the real-only baseline (generator `{BASELINE}`, regime `{BASELINE_REGIME}`) on the same cases."
        )
        if comparisons is not None and len(comparisons):
            rep.h("Comparisons with the real-only baseline")
            c = MetricTable(comparisons).select(scope="overall")
            comp_table = pd.DataFrame(
                {
                    "generator": c["generator"],
                    "regime": c["regime"],
                    "backbone": c["backbone"],
                    "metric": c["metric"],
                    "split": c["split"],
                    "value": [fmt_interval(v, np.nan, np.nan).split(" [")[0] for v in c["value"]],
                    "baseline": [fmt_interval(v, np.nan, np.nan).split(" [")[0] for v in c["baseline_value"]],
                    "difference [95% CI] n": [
                        fmt_interval(d, lo, hi, n, p, s)
                        for d, lo, hi, n, p, s in zip(
                            c["diff"],
                            c["ci_low"],
                            c["ci_high"],
                            c["n_cases"],
                            c["n_patients"],
                            c["status"],
                            strict=True,
                        )
                    ],
                    "p (bootstrap, Holm)": [_fmt_p(p) for p in c["p_boot_holm"]],
                    "p (DeLong, Holm)": [_fmt_p(p) for p in c["p_delong_holm"]],
                    "ratio [95% CI]": [
                        fmt_interval(r, lo, hi)
                        for r, lo, hi in zip(c["ratio"], c["ratio_ci_low"], c["ratio_ci_high"], strict=True)
                    ],
                }
            )
            seg = task.kind == "segmentation"
            # DeLong's test is about AUROC: a segmentation comparison has none.
            rep.table(comp_table.drop(columns=["p (DeLong, Holm)"]) if seg else comp_table)
            rep.p(
                "Differences are candidate minus baseline from a paired patient bootstrap (both models scored on "
                "the same replicates); p-values are two-sided and Holm-adjusted across the candidates compared on "
                "the same metric and split."
                + (
                    ""
                    if seg
                    else " DeLong's test applies to the binary-view AUROC and treats cases as independent."
                )
            )
        rep.h(f"{primary} by site")
        rep.table(_wide(table, primary, ["overall", "site"]))
    rep.h(f"{primary} by subgroup")
    rep.table(_wide(table, primary, ["subgroup", "intersection"]))
    if task.kind == "segmentation":
        # A segmenter has no operating point or class probabilities: per-class and lesion-level tables instead.
        _seg_tables(rep, table, task)
    else:
        _operating_point(rep, table, task, split, prepared)
    rep.figure(f"{primary} by subgroup with 95% intervals, {split}", plot_forest(table, primary, split))
    if not audit:
        rep.figure(f"{primary} against synthetic ratio, {split}", plot_utility(table, primary, split))
    rep.p(
        "Full tables: `metrics.csv` / `metrics.parquet`"
        + ("" if audit else ", `comparisons.csv` / `comparisons.parquet`")
        + "; headline numbers: `summary.json`."
    )
    return rep


def _seg_tables(rep: Report, table: pd.DataFrame, task: Task) -> None:
    """A segmentation evaluation's tables: Dice per mask class, lesion detection and instance Dice."""
    per_class = [f"dice_{c}" for c in task.mask_classes]
    lesion = [
        "lesion_f1_macro",
        *(f"lesion_f1_{c}" for c in task.mask_classes),
        "instance_dice",
        "hd95_macro",
    ]
    for title, names in (("Dice per mask class", per_class), ("Lesion detection and instance Dice", lesion)):
        t = MetricTable(table).select(metric=names, scope="overall")
        if t.empty:
            continue
        t = t.assign(_run=_run_label(t), _cell=[_fmt_row(r) for _, r in t.iterrows()])
        w = t.pivot_table(
            index=["metric", "split"], columns="_run", values="_cell", aggfunc="first", sort=False
        )
        rep.h(title)
        rep.table(w.reset_index().rename_axis(columns=None))
    rep.h("lesion_f1_macro by site")
    rep.table(_wide(table, "lesion_f1_macro", ["overall", "site"]))
    rep.p(
        "Dice: pooled over the pixels of a group's cases per mask class (undefined where a class is in neither truth "
        "nor prediction). Lesion F1: a predicted lesion (connected component) finds a true lesion of its class when "
        "their IoU exceeds 0.5; instance Dice: each true lesion's Dice with its match, 0 when missed. HD95 in pixels "
        "of the evaluated image size."
    )
    _groups_not_ranked(rep, table)


def _operating_point(
    rep: Report, table: pd.DataFrame, task: Task, split: str, prepared: pd.DataFrame | None
) -> None:
    """A classification evaluation's fairness at its operating point and its ROC and reliability figures."""
    primary = task.metrics.primary
    rep.h("Fairness at the operating point")
    fair_metrics = [
        "equalized_odds_difference",
        "fnr_gap",
        f"{primary}_worst",
        f"{primary}_gap",
        *(f"{m.name}_worst" for m in reported("report_worst")),
    ]
    f = MetricTable(table).select(metric=fair_metrics, scope=("subgroup", "intersection", "site"))
    rep.table(_tidy_view(f))
    rep.p(
        "Equalized-odds difference: the larger of the between-group ranges of sensitivity and of the false-positive "
        "rate; FNR gap: highest minus lowest false-negative rate (underdiagnosis), both at the threshold above, "
        "over groups with status ok."
    )
    _groups_not_ranked(rep, table)
    if prepared is not None:
        cases = _case_level(prepared, task.classes)
        rep.h("Figures")
        for sp in SCORED_SPLITS:
            if sp == "external" or (cases["split"] == sp).any():
                rep.figure(
                    f"ROC by site, {sp} (binary view, seed-averaged scores)",
                    plot_roc(cases, "site", sp, f"ROC by site, {sp}"),
                )
        sub_cols = sorted({gb for gb in MetricTable(table).select(scope="subgroup")["group_by"].unique()})
        for col in sub_cols:
            rep.figure(f"ROC by {col}, {split}", plot_roc(cases, col, split, f"ROC by {col}, {split}"))
        rep.figure(
            f"Reliability, {split}", plot_reliability(cases, task.classes, task.metrics.ece_bins, split)
        )


def _groups_not_ranked(rep: Report, table: pd.DataFrame) -> None:
    grouped = MetricTable(table).select(scope=("site", "subgroup", "intersection"))
    insufficient = grouped[grouped["status"] != "ok"]
    if len(insufficient):
        rep.h("Groups not ranked")
        rep.table(
            insufficient[["split", "scope", "group_by", "group", "status", "reason"]]
            .drop_duplicates(["split", "scope", "group_by", "group", "status"])
            .head(60)
        )


def _tidy_view(t: pd.DataFrame) -> pd.DataFrame:
    if t.empty:
        return pd.DataFrame()
    return pd.DataFrame(
        {
            "run": _run_label(t).to_numpy(),
            "split": t["split"].to_numpy(),
            "scope": t["scope"].to_numpy(),
            "group_by": t["group_by"].to_numpy(),
            "metric": t["metric"].to_numpy(),
            "group": t["group"].to_numpy(),
            "value [95% CI] n": [_fmt_row(r) for _, r in t.iterrows()],
            "seed sd": [f"{x:.3f}" if pd.notna(x) else "—" for x in t["seed_sd"]],
        }
    )


def _wide(table: pd.DataFrame, metric: str, scopes: Sequence[str]) -> pd.DataFrame:
    t = MetricTable(table).select(metric=metric, scope=tuple(scopes))
    if t.empty:
        return pd.DataFrame()
    t = t.assign(_run=_run_label(t), _cell=[_fmt_row(r) for _, r in t.iterrows()])
    w = t.pivot_table(
        index=["split", "scope", "group_by", "group"],
        columns="_run",
        values="_cell",
        aggfunc="first",
        sort=False,
    )
    return w.reset_index().rename_axis(columns=None)
