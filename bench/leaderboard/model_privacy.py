"""Model privacy on the leaderboard: the record's optional `model_privacy` field (membership inference against the
models a generator's data trained, from RUN/model-privacy/model_privacy.json) and its board column."""

from __future__ import annotations

import html
from typing import Any

from bench.errors import BadInput
from bench.io import read_json
from bench.runfolder import BASELINE_REGIME, RunDir

METRICS = ("auroc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "advantage")
# The board's column: the attack AUROC of the generator's synthetic-only model (real-only for the reference).
COLUMN = (
    "model_leak",
    "Model leakage",
    "membership-attack AUROC (offline LiRA) against the synthetic-only model; the reference: the real-only model. "
    "0.5 reveals nothing about the training patients",
)
HEADLINE_REGIME = "synthetic"


def record_model_privacy(run_dir: RunDir, generator: str) -> dict[str, Any] | None:
    """The record's `model_privacy` field: every audited run key of `generator` (for the reference `none`, its
    real-only regimes) with the attack's metrics; None when the run has no model audit."""
    path = run_dir.model_privacy_file
    if not path.is_file():
        return None
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not readable JSON: {e}") from None
    arms = []
    for a in raw.get("arms") or []:
        if a.get("generator") != generator:
            continue
        m = a.get("metrics") or {}
        arm = {
            "regime": str(a["regime"]),
            "backbone": str(a["backbone"]),
            "n_members": int(a.get("n_members") or 0),
            "n_nonmembers": int(a.get("n_nonmembers") or 0),
            "calibrated": bool(a.get("calibrated")),
            **{k: _estimate(m.get(k)) for k in METRICS},
        }
        if a.get("auroc_diff_vs_real"):
            arm["auroc_diff_vs_real"] = _estimate(a["auroc_diff_vs_real"])
        arms.append(arm)
    if not arms:
        return None
    att = raw.get("attack") or {}
    return {"attack": str(att.get("name", "")), "n_boot": int(raw.get("n_boot") or 0), "arms": arms}


def _estimate(e: Any) -> dict[str, float | None]:
    e = e if isinstance(e, dict) else {}
    return {k: e.get(k) for k in ("value", "ci_low", "ci_high")}


def model_privacy_cells(record: dict[str, Any]) -> dict[str, Any]:
    """The board row's model-leakage cell: the headline regime's attack AUROC, or None."""
    mp = record.get("model_privacy") or {}
    regime = BASELINE_REGIME if record.get("kind") == "reference" else HEADLINE_REGIME
    arm = next((a for a in mp.get("arms") or [] if a.get("regime") == regime), None)
    return {COLUMN[0]: arm["auroc"] if arm else None}


def model_privacy_svg(rows: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    """One panel: each row's model leakage (x, attack AUROC with its interval) against its utility (y, with its
    interval), so the utility-privacy trade-off that synthetic data is used for is seen at a glance."""
    e = html.escape
    key = COLUMN[0]
    pts = [
        (r["name"], r[key], r["utility"])
        for r in rows
        if (r.get(key) or {}).get("value") is not None and (r.get("utility") or {}).get("value") is not None
    ]
    if not pts:
        return '<p class="legend" id="model-leak-none">No record carries a model-privacy audit yet.</p>'

    def span(ests: list[dict[str, Any]], floor: float) -> tuple[float, float]:
        lo = min(v for x in ests for v in (x.get("ci_low"), x["value"]) if v is not None)
        hi = max(v for x in ests for v in (x.get("ci_high"), x["value"]) if v is not None)
        pad = max((hi - lo) * 0.1, floor)
        return lo - pad, hi + pad

    x0, x1 = span([p[1] for p in pts] + [{"value": 0.5}], 0.02)
    y0, y1 = span([p[2] for p in pts], 0.01)
    w, h, ml, mb, mt, mr = 560, 320, 56, 40, 12, 120
    iw, ih = w - ml - mr, h - mt - mb

    def sx(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * iw

    def sy(v: float) -> float:
        return mt + ih - (v - y0) / (y1 - y0) * ih

    out = [
        f'<svg id="model-leak" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        'aria-label="Utility against model leakage">',
        f'<rect x="{ml}" y="{mt}" width="{iw}" height="{ih}" fill="#fbfcfd" stroke="#d0d7de"/>',
        f'<line x1="{sx(0.5):.1f}" y1="{mt}" x2="{sx(0.5):.1f}" y2="{mt + ih}" stroke="#999" stroke-dasharray="4 3"/>',
        f'<text x="{sx(0.5) + 3:.1f}" y="{mt + 11}" font-size="10" fill="#666">0.5: reveals nothing</text>',
        f'<text x="{ml}" y="{h - 6}" font-size="11">model leakage: membership-attack AUROC '
        f"({x0:.2f} to {x1:.2f})</text>",
        f'<text x="{ml - 4}" y="{mt + 8}" font-size="10" text-anchor="end">{y1:.2f}</text>',
        f'<text x="{ml - 4}" y="{mt + ih:.0f}" font-size="10" text-anchor="end">{y0:.2f}</text>',
    ]
    for name, leak, util in pts:
        cx, cy = sx(leak["value"]), sy(util["value"])
        if leak.get("ci_low") is not None and leak.get("ci_high") is not None:
            out.append(
                f'<line x1="{sx(leak["ci_low"]):.1f}" y1="{cy:.1f}" x2="{sx(leak["ci_high"]):.1f}" y2="{cy:.1f}" '
                'stroke="hsl(210,40%,60%)"/>'
            )
        if util.get("ci_low") is not None and util.get("ci_high") is not None:
            out.append(
                f'<line x1="{cx:.1f}" y1="{sy(util["ci_low"]):.1f}" x2="{cx:.1f}" y2="{sy(util["ci_high"]):.1f}" '
                'stroke="hsl(210,40%,60%)"/>'
            )
        tip = f"{name}: attack AUROC {leak['value']:.3f}, utility {util['value']:.3f}"
        out.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="hsl(210,70%,50%)"><title>{e(tip)}</title></circle>'
            f'<text x="{cx + 7:.1f}" y="{cy + 4:.1f}" font-size="10">{e(name)}</text>'
        )
    out.append("</svg>")
    metric = e(str(facts.get("primary_metric", "")))
    return (
        f'<p class="legend">Each record: how much its model reveals about the real training patients (x: attack '
        f"AUROC of the synthetic-only model, the reference's real-only model) against utility ({metric} on the "
        f"{e(str(facts.get('split', '')))} split, y), with 95% patient-bootstrap intervals. Left and high is the "
        "trade-off synthetic data is shared for.</p>" + "".join(out)
    )
