"""Report sections beside the evaluation's own: fidelity against utility (from `medsynbench fidelity`) and the
privacy of the trained models (from `medsynbench privacy-model`), each with its figure against utility."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bench.evaluation.report import Report, fmt_interval
from bench.evaluation.report_plots import _grid, _plt, _png
from bench.metrics.fidelity import rank_correlation

# --------------------------------------------------------------------------------------------- fidelity

# Fidelity metrics shown in the report and on the leaderboard, in order: (key in fidelity.json, label, digits).
FIDELITY_SHOWN: tuple[tuple[str, str, int], ...] = (
    ("frechet_distance", "Fréchet distance", 2),
    ("kid", "KID", 4),
    ("precision", "Precision", 3),
    ("recall", "Recall", 3),
    ("density", "Density", 3),
    ("coverage", "Coverage", 3),
    ("spread_ratio", "Spread ratio", 3),
    ("near_duplicate_rate", "Near-duplicate share", 3),
    ("label_accuracy", "Label accuracy", 3),
    ("label_auroc", "Label AUROC", 3),
)


def generator_utility(summary: dict[str, Any], generator: str) -> dict[str, Any] | None:
    """The generator's synthetic-only utility (primary metric, headline split) from `summary.json`, else its first
    regime that used synthetic images."""
    split = summary.get("headline_split", "test")
    runs = [r for r in summary.get("runs", []) if r.get("generator") == generator]
    runs.sort(key=lambda r: (r.get("regime") != "synthetic", str(r.get("regime"))))
    for r in runs:
        x = r.get(f"{split}_primary")
        if x and x.get("value") is not None:
            return {**x, "regime": r.get("regime")}
    return None


def plot_fidelity_vs_utility(
    points: dict[str, dict[str, Any]], utility: dict[str, dict[str, Any]], metric_label: str
) -> tuple[bytes | None, dict[str, dict[str, Any]]]:
    """One panel per fidelity metric: its value (x) against utility (y) across generators, titled with Spearman's
    rank correlation and its bootstrap interval. Returns the PNG and the correlations."""
    gens = sorted(g for g in points if g in utility)
    corr = {}
    shown = [
        (k, lab, d)
        for k, lab, d in FIDELITY_SHOWN
        if any((points[g].get(k) or {}).get("value") is not None for g in gens)
    ]
    for key, _, _ in shown:
        xs = [(points[g].get(key) or {}).get("value") for g in gens]
        corr[key] = rank_correlation(
            [np.nan if v is None else v for v in xs], [utility[g]["value"] for g in gens], n_boot=2000, seed=0
        )
    if len(gens) < 2 or not shown:
        return None, corr
    plt = _plt()
    nr, nc = _grid(len(shown))
    fig, axes = plt.subplots(nr, nc, figsize=(3.2 * nc, 2.8 * nr), squeeze=False)
    for ax, (key, lab, _) in zip(axes.flat, shown, strict=False):
        for j, g in enumerate(gens):
            e = points[g].get(key) or {}
            if e.get("value") is None:
                continue
            u = utility[g]
            xerr = None
            if e.get("ci_low") is not None and e.get("ci_high") is not None:
                xerr = [[max(e["value"] - e["ci_low"], 0)], [max(e["ci_high"] - e["value"], 0)]]
            yerr = [[max(u["value"] - u["ci_low"], 0)], [max(u["ci_high"] - u["value"], 0)]]
            ax.errorbar(
                [e["value"]], [u["value"]], xerr=xerr, yerr=yerr, marker="o", capsize=2, color=f"C{j % 10}"
            )
            ax.annotate(g, (e["value"], u["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        c = corr[key]
        rho = "undefined (< 3 generators)" if c["rho"] is None else f"ρ={c['rho']:.2f}"
        if c["rho"] is not None and c["ci_low"] is not None:
            rho += f" [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
        ax.set_title(f"{lab}\n{rho}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylabel(metric_label, fontsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig), corr


def fidelity_section(rep: Report, fidelity: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    """Fidelity, diversity and label fidelity per generator (from RUN/fidelity/<generator>/fidelity.json) beside
    utility, and whether fidelity predicts utility across the run's generators."""
    if not fidelity:
        return
    primary = summary.get("primary_metric", "primary metric")
    split = summary.get("headline_split", "test")
    rep.h("Fidelity, diversity and label fidelity")
    spaces = sorted({str((r.get("feature_space") or {}).get("label", "")) for r in fidelity.values()})
    statement = next(iter(fidelity.values())).get("feature_space", {}).get("statement", "")
    rep.p(
        f"Feature space: `{'`, `'.join(spaces)}` ({statement}). Synthetic images against the real training-site "
        f"images they imitate; k = {next(iter(fidelity.values())).get('k')} nearest neighbours for precision, "
        "recall, density and coverage. Intervals: KID, 2.5-97.5 percentiles over subsets; Fréchet distance, image "
        "bootstrap; the others, bootstrap over the scored images. Label fidelity: the run's real-only classifier "
        "on each synthetic image against its conditioning label (chance: accuracy 1/K, AUROC 0.5)."
    )
    utility = {g: u for g in fidelity if (u := generator_utility(summary, g)) is not None}
    rows = []
    for g, r in sorted(fidelity.items()):
        m = r.get("metrics") or {}
        row: dict[str, Any] = {"generator": g}
        u = utility.get(g)
        row[f"utility ({primary}, {split})"] = (
            fmt_interval(u["value"], u["ci_low"], u["ci_high"]) + f" ({u['regime']})" if u else "—"
        )
        for key, lab, d in FIDELITY_SHOWN:
            e = m.get(key) or {}
            v = e.get("value")
            row[lab] = "—" if v is None else fmt_interval(v, e.get("ci_low"), e.get("ci_high"), digits=d)
        rows.append(row)
    rep.table(pd.DataFrame(rows))
    png, corr = plot_fidelity_vs_utility(
        {g: r.get("metrics") or {} for g, r in fidelity.items()}, utility, f"{primary} ({split})"
    )
    lines = []
    for key, lab, _ in FIDELITY_SHOWN:
        c = corr.get(key)
        if not c or c["rho"] is None:
            continue
        ci = f" [{c['ci_low']:.2f}, {c['ci_high']:.2f}]" if c["ci_low"] is not None else ""
        lines.append(f"{lab} {c['rho']:.2f}{ci}")
    n = len(utility)
    rep.p(
        f"Does fidelity predict utility here? Spearman rank correlation with {primary} across {n} generator(s), "
        "95% bootstrap interval over generators: "
        + ("; ".join(lines) if lines else "undefined (fewer than 3 generators with both numbers)")
        + ". With few generators these intervals are necessarily wide; a correlation computed from a handful of "
        "generators does not establish that a fidelity metric ranks generators as utility does."
    )
    rep.figure(f"Each fidelity metric against {primary} ({split}) across generators", png)


# --------------------------------------------------------------------------------------------- model privacy

# Attack metrics shown, in order: (key in model_privacy.json, label).
MODEL_PRIVACY_SHOWN: tuple[tuple[str, str], ...] = (
    ("auroc", "attack AUROC"),
    ("tpr_at_1pct_fpr", "TPR @ 1% FPR"),
    ("tpr_at_0.1pct_fpr", "TPR @ 0.1% FPR"),
    ("advantage", "advantage"),
)


def arm_utility(summary: dict[str, Any], generator: str, regime: str) -> dict[str, Any] | None:
    """The run key's primary metric on the headline split from `summary.json`."""
    split = summary.get("headline_split", "test")
    for r in summary.get("runs", []):
        if r.get("generator") == generator and r.get("regime") == regime:
            x = r.get(f"{split}_primary")
            if x and x.get("value") is not None:
                return x
    return None


def _fmt_metric(e: dict[str, Any] | None) -> str:
    if not e or e.get("value") is None:
        return "—"
    return fmt_interval(e["value"], e.get("ci_low"), e.get("ci_high"))


def plot_utility_vs_leakage(
    arms: list[dict[str, Any]], summary: dict[str, Any], metric_label: str
) -> bytes | None:
    """Each generator's synthetic-only model (and real-only) placed by attack AUROC (x) against utility (y), with
    both intervals: the trade-off synthetic data is used for."""
    pts = []
    for a in arms:
        if a["regime"] not in ("synthetic", "real"):
            continue
        u = arm_utility(summary, a["generator"], a["regime"])
        m = a["metrics"].get("auroc") or {}
        if u is None or m.get("value") is None:
            continue
        pts.append((f"{a['generator']} ({a['regime']})", m, u))
    if len(pts) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for j, (lab, m, u) in enumerate(pts):
        xerr = [
            [max(m["value"] - (m.get("ci_low") or m["value"]), 0)],
            [max((m.get("ci_high") or m["value"]) - m["value"], 0)],
        ]
        yerr = [[max(u["value"] - u["ci_low"], 0)], [max(u["ci_high"] - u["value"], 0)]]
        ax.errorbar(
            [m["value"]], [u["value"]], xerr=xerr, yerr=yerr, marker="o", capsize=2, color=f"C{j % 10}"
        )
        ax.annotate(lab, (m["value"], u["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("membership-attack AUROC on the model (0.5: reveals nothing)", fontsize=8)
    ax.set_ylabel(metric_label, fontsize=8)
    ax.set_title("Utility against leakage of the trained model (95% intervals)", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def model_privacy_section(rep: Report, result: dict[str, Any] | None, summary: dict[str, Any]) -> None:
    """ "Privacy of the trained model": the membership attack against every run key (RUN/model-privacy, written by
    `medsynbench privacy-model`), its subgroups, and utility against leakage."""
    if not result:
        return
    primary = summary.get("primary_metric", "primary metric")
    split = summary.get("headline_split", "test")
    att = result.get("attack") or {}
    rep.h("Privacy of the trained model")
    rep.p(
        f"Membership inference against each trained diagnostic model: {att.get('name', 'lira-offline')} "
        f"({att.get('reference', '')}). Members: the real patients whose data reached the model (its real "
        "training patients; for regimes with synthetic images also the generator's training patients, from its "
        "card). Non-members: training-site patients of the "
        f"{', '.join(att.get('non_member_splits', []))} splits that neither the model, its generator nor its "
        "reference models saw, with the members' class mix. Reference models: the run's other models that never "
        "saw the members (e.g. the real-holdout control's for real-only). Attack AUROC 0.5 and advantage 0 mean "
        f"the model reveals nothing about membership. Intervals: {result.get('interval', 'patient bootstrap')} "
        f"({result.get('n_boot')} replicates), conditional on the trained models; metrics are averaged over seeds."
    )
    rows = []
    for a in result.get("arms", []):
        u = arm_utility(summary, a["generator"], a["regime"])
        row: dict[str, Any] = {
            "generator": a["generator"],
            "regime": a["regime"],
            "backbone": a["backbone"],
            "members / non-members (patients)": f"{a['n_members']} / {a['n_nonmembers']}",
            "reference models": a["n_reference_models"] if a.get("calibrated") else "0 (uncalibrated)",
        }
        for key, lab in MODEL_PRIVACY_SHOWN:
            row[lab] = _fmt_metric(a["metrics"].get(key))
        row["AUROC diff vs real-only"] = _fmt_metric(a.get("auroc_diff_vs_real"))
        row[f"utility ({primary}, {split})"] = _fmt_metric(u)
        rows.append(row)
    rep.table(pd.DataFrame(rows))
    sub = [
        {
            "generator": a["generator"],
            "regime": a["regime"],
            "group": f"{s['group_by']}={s['group']}",
            "members / non-members": f"{s['n_members']} / {s['n_nonmembers']}",
            "attack AUROC": _fmt_metric((s.get("metrics") or {}).get("auroc")),
            "advantage": _fmt_metric((s.get("metrics") or {}).get("advantage")),
        }
        for a in result.get("arms", [])
        for s in a.get("subgroups", [])
        if s.get("status") == "ok"
    ]
    n_short = sum(s.get("status") != "ok" for a in result.get("arms", []) for s in a.get("subgroups", []))
    if sub:
        rep.table(pd.DataFrame(sub))
    rep.p(
        f"Subgroups are shown where both members and non-members number at least {result.get('min_group_patients')} "
        f"patients; {n_short} subgroup(s) fall short and are not reported."
    )
    rep.figure(
        f"Utility ({primary}, {split}) against attack AUROC, synthetic-only and real-only models",
        plot_utility_vs_leakage(result.get("arms", []), summary, f"{primary} ({split})"),
    )
