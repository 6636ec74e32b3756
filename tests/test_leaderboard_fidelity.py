"""Fidelity on the leaderboard: the optional record field, the board's columns and the fidelity-vs-utility figure."""

from __future__ import annotations

import jsonschema
import pytest
from scipy.stats import spearmanr

from bench.io import write_json
from bench.leaderboard import fidelity as fid
from bench.leaderboard.record import record_schema
from bench.leaderboard.render import cell_text, columns
from bench.runfolder import RunDir


def _fidelity_validator():
    schema = record_schema()
    return jsonschema.Draft202012Validator({"$defs": schema["$defs"], **schema["properties"]["fidelity"]})


def _rows():
    rows = []
    for i, (name, fd, util) in enumerate(
        [("a", 10.0, 0.9), ("b", 20.0, 0.8), ("c", 30.0, 0.85), ("d", 40.0, 0.6)]
    ):
        rec = {
            "kind": "generator",
            "fidelity": {
                "feature_space": "classifier:resnet10t:abc@32px",
                "k": 5,
                "metrics": {"frechet_distance": {"value": fd, "ci_low": fd - 1, "ci_high": fd + 1}},
            },
        }
        rows.append(
            {
                "id": str(i),
                "name": name,
                "kind": "generator",
                "utility": {"value": util},
                **fid.fidelity_cells(rec),
            }
        )
    rows.append(
        {
            "id": "r",
            "name": "real-only",
            "kind": "reference",
            "utility": {"value": 0.95},
            **fid.fidelity_cells({}),
        }
    )
    return rows


def test_record_summary_from_run_folder_matches_schema(tmp_path):
    rd = RunDir(tmp_path)
    assert fid.record_fidelity(rd, "g") is None
    write_json(
        rd.fidelity_file("g"),
        {
            "feature_space": {"label": "classifier:resnet10t:abc@32px", "statement": "penultimate"},
            "k": 5,
            "metrics": {
                "precision": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95, "status": "ok"},
                "label_auroc": {"value": None, "ci_low": None, "ci_high": None, "status": "unavailable"},
            },
        },
    )
    summary = fid.record_fidelity(rd, "g")
    assert summary["feature_space"] == "classifier:resnet10t:abc@32px" and summary["k"] == 5
    assert summary["metrics"] == {"precision": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}}
    v = _fidelity_validator()
    assert not list(v.iter_errors(summary)) and not list(v.iter_errors(None))
    assert list(v.iter_errors({"feature_space": "x", "k": 5, "metrics": {}, "extra": 1}))


def test_columns_and_cells():
    keys = [k for k, _, _ in columns()]
    for _, key, *_ in fid.FIDELITY_COLUMNS:
        assert key in keys
    rows = _rows()
    assert cell_text(rows[0], "fid_frechet") == "10.00 [9.00, 11.00]"
    assert cell_text(rows[-1], "fid_frechet") == "–"


def test_rank_correlation_across_generators_and_figure():
    rows = _rows()
    corr = fid.correlations(rows)
    fd = corr["fid_frechet"]
    assert fd["n"] == 4  # the reference is not a generator
    assert fd["rho"] == pytest.approx(spearmanr([10, 20, 30, 40], [0.9, 0.8, 0.85, 0.6]).statistic)
    assert fd["ci_low"] <= fd["rho"] <= fd["ci_high"]
    assert corr["fid_kid"]["rho"] is None
    svg = fid.fidelity_svg(rows, {"primary_metric": "auroc_macro", "split": "external"})
    assert '<svg id="fidelity"' in svg and 'data-key="fid_frechet"' in svg and "fid_kid" not in svg
    assert "necessarily wide" in svg
    lines = "\n".join(fid.markdown_lines(rows))
    assert "classifier:resnet10t:abc@32px" in lines and f"{fd['rho']:.2f}" in lines


def test_no_fidelity_yet():
    rows = [r for r in _rows() if r["kind"] == "reference"]
    assert "No generator record carries a fidelity summary" in fid.fidelity_svg(rows, {})
    assert fid.markdown_lines(rows) == []
