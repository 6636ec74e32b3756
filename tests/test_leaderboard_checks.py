"""Leaderboard checks are one named list: each stage runs its entries, and one entry adds a check everywhere."""

from __future__ import annotations

import pytest
from test_leaderboard_support import answer_key, make_board, make_run, snapshot

from bench.cli import main
from bench.leaderboard import checks as K


def test_every_check_is_named_once_and_says_what_it_verifies():
    names = K.names()
    assert len(names) == len(set(names))
    for c in K.CHECKS:
        assert c.stage in K.STAGES and c.verifies and c.where <= {K.BOARD, K.SERVICE}
    assert {d["stage"] for d in K.describe()} == set(K.STAGES)
    assert {"task-definition", "coverage", "scoring-spec", "privacy-flag"} <= set(names)
    assert all(K.SERVICE in d["where"] for d in K.describe(K.SERVICE))


@pytest.mark.parametrize("stage", ["submission", "record"])
def test_one_new_entry_is_run_by_its_stage(tmp_path, monkeypatch, stage, capsys):
    run = make_run(tmp_path / "run", {"good": 2.0}, regimes=["real", "synthetic"], seeds=[0])
    board = make_board(
        tmp_path / "board", protocol={"regimes": ["real", "synthetic"], "seeds": [0], "backbone": "resnet18"}
    )
    if stage == "record":
        assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    extra = K.Check(
        "always-refuses", "a test check", stage, frozenset({K.BOARD}), lambda c: ["refused by the new check"]
    )
    monkeypatch.setattr(K, "CHECKS", [*K.CHECKS, extra])
    before = snapshot(board)
    cmd = (
        ["submit", str(run), "--leaderboard", str(board)]
        if stage == "submission"
        else ["leaderboard", "build", str(board)]
    )
    assert main(cmd) == 2
    assert "refused by the new check" in capsys.readouterr().err
    assert snapshot(board) == before


def test_the_service_functions_run_the_shared_checks():
    class Rules:
        privacy_flagged = "exclude"
        contamination = "show"

    assert K.service_exclusion({"flagged": True, "memorization_rate": 0.5}, Rules()).startswith("flagged")
    assert K.service_exclusion({"flagged": False, "contamination": {"status": "fail"}}, Rules()) is None
    key = answer_key("test-salt-0123")
    wrong = key.df.rename(columns={"label": "y_true"}).assign(y_true="blank")
    found = K.service_prediction_problems(key, wrong, {"id": "s1", "predictions": {"file": "upload.csv"}})
    assert found and all(p.startswith("record s1:") for p in found)
    assert K.service_prediction_problems(key, key.df.rename(columns={"label": "y_true"}), {"id": "s1"}) == []
