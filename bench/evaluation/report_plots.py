"""Figures of the evaluation report that need nothing but tables: the shared matplotlib helpers, the differences
from real-only and utility against the synthetic ratio."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pandas as pd

from bench.metrics.table import MetricTable
from bench.runfolder import BASELINE, BASELINE_REGIME


# matplotlib (and scikit-learn's curves below) load only when a report draws a figure: they are heavy, and
# tables-only callers never pay for them.
def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def plot_differences(comparisons: pd.DataFrame, metric: str, split: str) -> bytes | None:
    """Each (generator, regime) minus real-only on `metric` with its 95% two-stage bootstrap interval."""
    c = MetricTable(comparisons).select(metric=metric, split=split, scope="overall")
    c = c[c["diff"].notna()]
    if c.empty:
        return None
    labels = [f"{g} / {r} / {b}" for g, r, b in zip(c["generator"], c["regime"], c["backbone"], strict=True)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(c) + 1.4))
    y = np.arange(len(c))
    err = np.vstack([c["diff"] - c["ci_low"], c["ci_high"] - c["diff"]]).clip(min=0)
    flagged = (c["seed_note"].astype(str) != "").to_numpy() if "seed_note" in c else np.zeros(len(c), bool)
    ax.errorbar(c["diff"], y, xerr=np.nan_to_num(err), fmt="none", color="C0", lw=1.2, capsize=3)
    ax.scatter(c["diff"][~flagged], y[~flagged], color="C0", s=22, zorder=3)
    ax.scatter(c["diff"][flagged], y[flagged], facecolors="white", edgecolors="C0", s=22, zorder=3)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} difference vs real-only (95% interval over patients and training seeds)")
    ax.set_title(f"Difference from real-only, {split} (hollow: fewer than 3 seeds per arm)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def synthetic_ratio(regime: str) -> float | None:
    """Synthetic share implied by a regime name: real 0, augment:r -> r (synthetic per real), synthetic -> inf."""
    if regime == BASELINE_REGIME:
        return 0.0
    if regime == "synthetic":
        return float("inf")
    m = re.fullmatch(r"augment:([0-9.]+)", regime)
    return float(m.group(1)) if m else None


def plot_utility(table: pd.DataFrame, metric: str, split: str) -> bytes | None:
    """Primary metric against the synthetic ratio of the regime, one line per generator (real-only at 0)."""
    t = MetricTable(table).select(metric=metric, split=split, scope="overall").copy()
    t["x"] = [synthetic_ratio(r) for r in t["regime"]]
    t = t[t["x"].notna() & t["value"].notna()]
    if t.empty:
        return None
    finite = t.loc[np.isfinite(t["x"].astype(float)), "x"].astype(float)
    inf_x = (finite.max() if len(finite) else 0) + 1.0
    t["xp"] = t["x"].astype(float).replace(np.inf, inf_x)
    base = t[t["generator"] == BASELINE]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, (gen, g) in enumerate(t[t["generator"] != BASELINE].groupby("generator", sort=True)):
        g = pd.concat([base, g]).sort_values("xp")
        fin = np.isfinite(g["x"].astype(float)).to_numpy()
        for part, style in (
            (g[fin], "-"),
            (g[~fin], "none"),
        ):  # synthetic-only is not on the ratio axis: no line
            if len(part):
                ax.errorbar(
                    part["xp"],
                    part["value"],
                    yerr=np.vstack([part["value"] - part["ci_low"], part["ci_high"] - part["value"]]).clip(
                        min=0
                    ),
                    marker="o",
                    capsize=3,
                    lw=1.2,
                    ls=style,
                    color=f"C{j % 10}",
                    label=gen if style == "-" or not fin.any() else None,
                )
    if (t["generator"] != BASELINE).sum() == 0:
        ax.errorbar(
            base["xp"],
            base["value"],
            yerr=np.vstack([base["value"] - base["ci_low"], base["ci_high"] - base["value"]]).clip(min=0),
            marker="o",
            capsize=3,
            label="real only",
        )
    ticks = sorted(set(t["xp"]))
    ax.set_xticks(ticks)
    ax.set_xticklabels(
        [
            "synthetic only"
            if x == inf_x and np.isinf(t.loc[t["xp"] == x, "x"].astype(float)).any()
            else f"{x:g}"
            for x in ticks
        ],
        fontsize=8,
    )
    ax.set_xlabel("synthetic images per real image (regime)")
    ax.set_ylabel(f"{metric}, {split}")
    ax.set_title(f"Utility against synthetic ratio ({split}; 95% intervals)", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)
