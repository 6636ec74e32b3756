"""Small is not broken: an estimate without a value or interval is stored and printed as such, with its reason, and
every command that prints estimates exits 0 on it (never a traceback)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY_TASK
from test_leaderboard_support import make_board, make_run

from bench.cli import main
from bench.cli.fidelity import _line as fidelity_line
from bench.cli.privacy import summary_line as privacy_line
from bench.cli.show import estimate, number
from bench.leaderboard.record import validate_record

SMALL = {"regimes": ["real", "synthetic"], "seeds": [0]}
# More patients than the tiny data has: every estimate keeps its value but has no interval.
FEW = copy.deepcopy(TINY_TASK)
FEW["metrics"]["min_patients"] = 100


def _records(board: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((board / "records").glob("*.json"))]


def test_estimate_formats_every_case():
    assert estimate({"value": 0.91234, "ci_low": 0.8, "ci_high": 0.95}) == "0.912 [0.800, 0.950]"
    assert estimate(
        {"value": 0.9, "ci_low": None, "ci_high": None, "reason": "3 patients < min_patients 10"}
    ) == ("0.900 (no interval: 3 patients < min_patients 10)")
    assert estimate({"value": float("nan"), "ci_low": None, "ci_high": None, "reason": "one class only"}) == (
        "undefined (one class only)"
    )
    assert estimate({"value": None, "status": "undefined"}) == "undefined (undefined)"
    assert estimate(None) == "–" and number(None) == "undefined" and number(0.5) == "0.500"


def _small_board(tmp_path: Path, task: dict, **board_kw) -> tuple[Path, Path]:
    run = make_run(tmp_path / "run", {"good": 2.0}, task=task, **SMALL)
    board = make_board(tmp_path / "board", protocol={**SMALL, "backbone": "resnet18"}, **board_kw)
    (board / "task.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return run, board


def test_submit_and_build_with_too_few_patients_for_an_interval(tmp_path, capsys):
    run, board = _small_board(tmp_path, FEW)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    out = capsys.readouterr().out
    assert out.count("(no interval: 42 patients < min_patients 100)") == 2, out
    for r in _records(board):
        assert validate_record(r) == []
        head = r["metrics"]["regimes"][r["metrics"]["headline_regime"]]
        assert head["value"] is not None and head["ci_low"] is None
        assert head["status"] == "insufficient" and "min_patients 100" in head["reason"]
    assert main(["leaderboard", "build", str(board)]) == 0


def test_submit_and_build_with_an_undefined_headline(tmp_path, capsys):
    """No validation predictions: a threshold metric has no operating point, so the headline has no value."""
    run, board = _small_board(tmp_path, TINY_TASK, primary_metric="sensitivity")
    for p in run.glob("*/predictions.parquet"):
        df = pd.read_parquet(p)
        df[df["split"] != "val"].to_parquet(p)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    out = capsys.readouterr().out
    assert out.count("sensitivity") == 2 and out.count("= undefined (no validation predictions") == 2, out
    for r in _records(board):
        head = r["metrics"]["regimes"][r["metrics"]["headline_regime"]]
        assert head["value"] is None and head["status"] == "undefined" and head["reason"]
    assert main(["leaderboard", "build", str(board)]) == 0
    assert "wrote" in capsys.readouterr().out


def test_evaluate_prints_an_estimate_without_an_interval(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"good": 2.0}, task=FEW, **SMALL)
    assert main(["evaluate", str(run), "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    assert "auroc_macro" in out and "(no interval: insufficient)" in out, out


def test_audit_prints_an_estimate_without_an_interval(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"good": 2.0}, task=TINY_TASK, **SMALL)
    preds = next(run.glob("none__real__*/predictions.parquet"))
    out_dir = tmp_path / "audit"
    code = main(
        ["audit", str(preds), "--out", str(out_dir), "--by", "sex", "--min-patients", "100", "--n-boot", "20"]
    )
    assert code == 0
    assert "auroc_macro_worst undefined (insufficient)" in capsys.readouterr().out


def test_fidelity_and_privacy_lines_print_undefined():
    r = {
        "feature_space": {"label": "pixels"},
        "metrics": {
            "frechet_distance": {"value": None, "ci_low": None, "ci_high": None, "reason": "too few"}
        },
    }
    assert "frechet_distance undefined (too few)" in fidelity_line("g", r)
    line = privacy_line(
        {
            "generator": "g",
            "memorization_rate": None,
            "ci_low": None,
            "ci_high": None,
            "feature": "pixels",
            "nominal_rate": None,
            "holdout_rate": 0.05,
            "flagged": False,
            "contamination": {"status": "pass"},
        }
    )
    assert "memorization rate undefined" in line and "nominal undefined" in line and "0.050" in line


def test_hosted_submit_prints_an_undefined_score(monkeypatch, tmp_path, capsys):
    import bench.service.client as client

    score = {"metric": "auroc_macro", "part": "public", "value": None, "ci_low": None, "ci_high": None}
    monkeypatch.setattr(
        client, "submit_to_server", lambda *a, **k: {"id": "s1", "status": "done", "score": score}
    )
    run = tmp_path / "run"
    run.mkdir()
    assert main(["submit", str(run), "--server", "http://127.0.0.1:1", "--token", "t"]) == 0
    assert "auroc_macro (public part) = undefined" in capsys.readouterr().out


@pytest.mark.parametrize("value", [None, float("nan")])
def test_number_never_raises(value):
    assert number(value) == "undefined"
