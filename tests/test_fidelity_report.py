"""The report's fidelity section: a table beside utility and the fidelity-vs-utility figure with Spearman's rho."""

from __future__ import annotations

import pytest
from scipy.stats import spearmanr

from bench.evaluation.report import Report
from bench.evaluation.report_sections import fidelity_section, generator_utility


def _summary():
    runs = []
    for g, u in (("a", 0.9), ("b", 0.7), ("c", 0.8)):
        runs.append(
            {
                "generator": g,
                "regime": "augment:1",
                "test_primary": {"value": u + 0.05, "ci_low": u, "ci_high": u + 0.1},
            }
        )
        runs.append(
            {
                "generator": g,
                "regime": "synthetic",
                "test_primary": {"value": u, "ci_low": u - 0.05, "ci_high": u + 0.05},
            }
        )
    return {"primary_metric": "auroc_macro", "headline_split": "test", "runs": runs}


def _fid(fd):
    return {
        "feature_space": {"label": "classifier:resnet10t:abc@32px", "statement": "penultimate features"},
        "k": 5,
        "metrics": {
            "frechet_distance": {"value": fd, "ci_low": fd - 1, "ci_high": fd + 1},
            "label_auroc": {"value": None, "ci_low": None, "ci_high": None, "status": "unavailable"},
        },
    }


def test_utility_is_synthetic_only_when_present():
    u = generator_utility(_summary(), "b")
    assert u["regime"] == "synthetic" and u["value"] == pytest.approx(0.7)
    assert generator_utility(_summary(), "zzz") is None


def test_section_table_and_correlation():
    rep = Report("t")
    fidelity_section(rep, {"a": _fid(5.0), "b": _fid(30.0), "c": _fid(10.0)}, _summary())
    kinds = [k for k, _ in rep.blocks]
    assert kinds[0] == "h2" and "table" in kinds and "figure" in kinds
    table = next(obj for k, obj in rep.blocks if k == "table")
    assert list(table["generator"]) == ["a", "b", "c"]
    assert table["Fréchet distance"].iloc[0] == "5.00 [4.00, 6.00]" and table["Label AUROC"].iloc[0] == "—"
    text = " ".join(obj for k, obj in rep.blocks if k == "p")
    rho = spearmanr([5.0, 30.0, 10.0], [0.9, 0.7, 0.8]).statistic
    assert f"Fréchet distance {rho:.2f}" in text and "classifier:resnet10t:abc@32px" in text
    assert "necessarily wide" in text
    assert "Fidelity" in rep.markdown()


def test_no_fidelity_no_section():
    rep = Report("t")
    fidelity_section(rep, {}, _summary())
    assert rep.blocks == []
