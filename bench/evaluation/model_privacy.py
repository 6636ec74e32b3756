"""The model audit's result (`medsynbench privacy-model RUN`) where evaluation reads it: the file, and the control
check it adds to the Controls section."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.errors import BadInput
from bench.evaluation.controls import FAIL, NOT_RUN, PASS, ControlResult
from bench.io import read_json
from bench.runfolder import RunDir

COPYCAT = "copycat"
# How far copycat's synthetic-only attack AUROC may sit from real-only's (the interval of the difference must reach
# within this of zero): copies carry the members, so a model trained on them leaks as a model trained on them does.
LEAK_MARGIN = 0.05
CHECK = "synthetic-only model leaks about as much as real-only (model privacy)"


def read_model_privacy(run: str | Path) -> dict[str, Any] | None:
    """RUN/model-privacy/model_privacy.json, or None when the model audit has not been run."""
    path = RunDir(run).model_privacy_file
    if not path.is_file():
        return None
    try:
        out = read_json(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not readable JSON: {e}") from None
    if not isinstance(out, dict) or not isinstance(out.get("arms"), list):
        raise BadInput(f"{path}: not a model privacy result (no 'arms' list)")
    return out


def check_copycat_leak(
    result: Mapping[str, Any] | None, generators: Mapping[str, str]
) -> list[ControlResult]:
    """The copycat control's model-privacy check, one result per copycat generator of the run: PASS when the
    interval of (copycat synthetic-only attack AUROC minus real-only's) reaches within LEAK_MARGIN of zero."""
    gens = sorted(g for g, c in generators.items() if c == COPYCAT) or [None]
    out = []
    for gen in gens:

        def res(
            status: str, reason: str = "", e: Mapping[str, Any] | None = None, gen: str | None = gen
        ) -> ControlResult:
            e = e or {}
            return ControlResult(
                control=COPYCAT,
                generator=gen,
                role="positive",
                check=CHECK,
                regime="synthetic",
                expected=f"attack AUROC difference vs real-only: interval within {LEAK_MARGIN} of 0 or above",
                status=status,
                metric="attack_auroc_diff",
                split="members vs non-members",
                value=e.get("value"),
                ci_low=e.get("ci_low"),
                ci_high=e.get("ci_high"),
                reason=reason,
            )

        if gen is None:
            out.append(res(NOT_RUN, "copycat is not in the run"))
            continue
        if not result:
            out.append(res(NOT_RUN, "no model privacy audit (run `medsynbench privacy-model RUN`)"))
            continue
        arm = next(
            (a for a in result.get("arms", []) if a["generator"] == gen and a["regime"] == "synthetic"), None
        )
        if arm is None:
            out.append(res(NOT_RUN, f"no synthetic-only run of {gen} was audited"))
            continue
        d = arm.get("auroc_diff_vs_real") or {}
        if d.get("ci_low") is None or d.get("ci_high") is None:
            out.append(res(NOT_RUN, "difference from real-only undefined (no real-only run audited)", d))
            continue
        ok = d["ci_high"] >= -LEAK_MARGIN
        out.append(
            res(
                PASS if ok else FAIL,
                ""
                if ok
                else "copycat's synthetic-only model leaks less than real-only: the audit misses members reached "
                "through copies",
                d,
            )
        )
    return out


def model_privacy_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """What `summary.json` (and from it a leaderboard record) carries: per run key the attack's headline numbers."""
    keep = ("auroc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "advantage")
    return {
        "attack": (result.get("attack") or {}).get("name"),
        "n_boot": result.get("n_boot"),
        "arms": [
            {
                "generator": a["generator"],
                "regime": a["regime"],
                "backbone": a["backbone"],
                "n_members": a.get("n_members"),
                "n_nonmembers": a.get("n_nonmembers"),
                "calibrated": a.get("calibrated"),
                **{k: a["metrics"][k] for k in keep if k in a.get("metrics", {})},
                **({"auroc_diff_vs_real": a["auroc_diff_vs_real"]} if a.get("auroc_diff_vs_real") else {}),
            }
            for a in result.get("arms", [])
        ],
    }
