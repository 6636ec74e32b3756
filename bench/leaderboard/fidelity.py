"""Fidelity on the leaderboard: the record's optional `fidelity` summary, its columns, and the figure of each
fidelity metric against utility across the board's generators (Spearman's rank correlation with a bootstrap
interval over generators)."""

from __future__ import annotations

import html
import math
from typing import Any

from bench.io import read_json
from bench.metrics.fidelity import rank_correlation
from bench.runfolder import RunDir

# key in the record's fidelity.metrics, column key on the board, header, help, digits
FIDELITY_COLUMNS: list[tuple[str, str, str, str, int]] = [
    (
        "frechet_distance",
        "fid_frechet",
        "Fréchet distance",
        "in the stated feature space; lower is closer",
        2,
    ),
    ("kid", "fid_kid", "KID", "unbiased MMD^2, cubic kernel, mean over subsets; lower is closer", 4),
    ("precision", "fid_precision", "Precision", "share of synthetic images inside the real k-NN manifold", 3),
    ("recall", "fid_recall", "Recall", "share of real images inside the synthetic k-NN manifold", 3),
    ("coverage", "fid_coverage", "Coverage", "share of real k-NN balls holding a synthetic image", 3),
    (
        "label_auroc",
        "fid_label_auroc",
        "Label AUROC",
        "the real-only classifier recognizing each synthetic image's conditioning label (macro AUROC)",
        3,
    ),
]
RECORD_METRICS = (
    "frechet_distance",
    "kid",
    "precision",
    "recall",
    "density",
    "coverage",
    "spread_ratio",
    "near_duplicate_rate",
    "label_accuracy",
    "label_auroc",
)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def record_fidelity(run_dir: RunDir, generator: str) -> dict[str, Any] | None:
    """The record's `fidelity` field from RUN/fidelity/<generator>/fidelity.json, or None when there is none."""
    path = run_dir.fidelity_file(generator)
    if not path.is_file():
        return None
    try:
        raw = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    space = raw.get("feature_space") or {}
    metrics = {}
    for name in RECORD_METRICS:
        e = (raw.get("metrics") or {}).get(name) or {}
        if _num(e.get("value")) is not None:
            metrics[name] = {
                "value": _num(e.get("value")),
                "ci_low": _num(e.get("ci_low")),
                "ci_high": _num(e.get("ci_high")),
            }
    return {
        "feature_space": str(space.get("label", "unknown")),
        "feature_statement": str(space.get("statement", "")),
        "k": int(raw.get("k") or 0),
        "metrics": metrics,
    }


def fidelity_cells(record: dict[str, Any]) -> dict[str, Any]:
    """The board row's fidelity columns (None where the record has no fidelity summary)."""
    fid = record.get("fidelity") or {}
    m = fid.get("metrics") or {}
    out: dict[str, Any] = {"fidelity_space": fid.get("feature_space")}
    for name, key, *_ in FIDELITY_COLUMNS:
        out[key] = m.get(name)
    return out


def columns() -> list[tuple[str, str, str]]:
    return [(key, header, help_) for _, key, header, help_, _ in FIDELITY_COLUMNS]


def digits(key: str) -> int | None:
    return next((d for _, k, _, _, d in FIDELITY_COLUMNS if k == key), None)


def correlations(rows: list[dict[str, Any]], n_boot: int = 2000) -> dict[str, dict[str, Any]]:
    """Spearman's rho of each fidelity column with utility across generator rows, with a bootstrap interval."""
    gens = [r for r in rows if r["kind"] == "generator" and (r.get("utility") or {}).get("value") is not None]
    out = {}
    for _, key, *_ in FIDELITY_COLUMNS:
        pts = [
            (r[key]["value"], r["utility"]["value"])
            for r in gens
            if (r.get(key) or {}).get("value") is not None
        ]
        out[key] = rank_correlation([p[0] for p in pts], [p[1] for p in pts], n_boot=n_boot, seed=0)
    return out


def fidelity_svg(rows: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    """Small multiples: each fidelity column (x) against utility (y) across generators, titled with rho [CI]."""
    e = html.escape
    corr = correlations(rows)
    gens = [r for r in rows if r["kind"] == "generator" and (r.get("utility") or {}).get("value") is not None]
    panels = [c for c in FIDELITY_COLUMNS if any((r.get(c[1]) or {}).get("value") is not None for r in gens)]
    if not panels:
        return '<p class="legend" id="fidelity-none">No generator record carries a fidelity summary yet.</p>'
    pw, ph, ml, mb, mt = 230, 190, 44, 34, 34
    ncol = 3
    nrow = math.ceil(len(panels) / ncol)
    w, h = pw * ncol, ph * nrow
    out = [
        f'<svg id="fidelity" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        'aria-label="Fidelity metrics against utility">'
    ]
    for i, (_, key, header, _, dg) in enumerate(panels):
        ox, oy = (i % ncol) * pw, (i // ncol) * ph
        pts = [
            (r["name"], r[key]["value"], r["utility"]["value"])
            for r in gens
            if (r.get(key) or {}).get("value") is not None
        ]
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        px, py = (x1 - x0) * 0.15 or 0.05 * (abs(x0) or 1), (y1 - y0) * 0.15 or 0.02
        x0, x1, y0, y1 = x0 - px, x1 + px, y0 - py, y1 + py
        iw, ih = pw - ml - 12, ph - mt - mb

        def sx(v: float, x0=x0, x1=x1, ox=ox, iw=iw) -> float:
            return ox + ml + (v - x0) / (x1 - x0) * iw

        def sy(v: float, y0=y0, y1=y1, oy=oy, ih=ih) -> float:
            return oy + mt + ih - (v - y0) / (y1 - y0) * ih

        c = corr[key]
        if c["rho"] is None:
            title = "ρ undefined (< 3 generators)"
        else:
            title = f"ρ = {c['rho']:.2f}"
            if c["ci_low"] is not None:
                title += f" [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
        out.append(
            f'<g class="panel" data-key="{key}" data-rho="{"" if c["rho"] is None else round(c["rho"], 4)}">'
        )
        out.append(f'<text x="{ox + ml}" y="{oy + 13}" font-size="12" font-weight="600">{e(header)}</text>')
        out.append(f'<text x="{ox + ml}" y="{oy + 27}" font-size="11">{e(title)} (n={c["n"]})</text>')
        out.append(
            f'<rect x="{ox + ml}" y="{oy + mt}" width="{iw}" height="{ih}" fill="#fbfcfd" stroke="#d0d7de"/>'
        )
        out.append(f'<text x="{ox + ml}" y="{oy + ph - 18}" font-size="10">{x0 + px:.{dg}f}</text>')
        out.append(
            f'<text x="{ox + ml + iw}" y="{oy + ph - 18}" font-size="10" text-anchor="end">{x1 - px:.{dg}f}</text>'
        )
        out.append(
            f'<text x="{ox + ml - 4}" y="{oy + mt + ih:.0f}" font-size="10" text-anchor="end">{y0 + py:.2f}</text>'
        )
        out.append(
            f'<text x="{ox + ml - 4}" y="{oy + mt + 8}" font-size="10" text-anchor="end">{y1 - py:.2f}</text>'
        )
        for name, xv, yv in pts:
            tip = f"{name}: {header} {xv:.{dg}f}, utility {yv:.3f}"
            out.append(
                f'<circle cx="{sx(xv):.1f}" cy="{sy(yv):.1f}" r="5" fill="hsl(210,70%,50%)"><title>{e(tip)}</title></circle>'
                f'<text x="{sx(xv) + 7:.1f}" y="{sy(yv) + 4:.1f}" font-size="10">{e(name)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    metric = e(str(facts.get("primary_metric", "")))
    return (
        f'<p class="legend">Each generator: a fidelity metric (x) against utility, {metric} on the '
        f"{e(str(facts.get('split', '')))} split (y). ρ: Spearman's rank correlation across the board's generators, "
        "95% bootstrap interval resampling generators. With few generators the interval is necessarily wide: it "
        "says how little a handful of generators can tell about whether fidelity predicts utility.</p>"
        + "".join(out)
    )


def markdown_lines(rows: list[dict[str, Any]]) -> list[str]:
    """README lines: the feature space of the fidelity columns and the rank correlations with utility."""
    spaces = sorted({r["fidelity_space"] for r in rows if r.get("fidelity_space")})
    if not spaces:
        return []
    corr = correlations(rows)
    parts = []
    for _, key, header, _, _ in FIDELITY_COLUMNS:
        c = corr[key]
        if c["rho"] is None:
            continue
        ci = f" [{c['ci_low']:.2f}, {c['ci_high']:.2f}]" if c["ci_low"] is not None else ""
        parts.append(f"{header} {c['rho']:.2f}{ci}")
    n = max((c["n"] for c in corr.values()), default=0)
    text = "; ".join(parts) if parts else "undefined (fewer than 3 generators with fidelity and utility)"
    return [
        f"Fidelity columns: feature space {', '.join(f'`{s}`' for s in spaces)}. Does fidelity predict utility "
        f"here? Spearman's rank correlation with utility across {n} generator(s), 95% bootstrap interval over "
        f"generators (wide with few generators): {text}.",
        "",
    ]
