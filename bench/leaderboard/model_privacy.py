"""Model privacy on the leaderboard: the record's optional `model_privacy` field (membership inference against the
models a generator's data trained, from RUN/model-privacy/model_privacy.json) and its board column."""

from __future__ import annotations

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
