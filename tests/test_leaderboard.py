"""Records against their schema, ranks and rank intervals on hand-made cases, the built pages, the W&B push."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_leaderboard_support import make_board, make_run, snapshot

from bench.cli import main
from bench.leaderboard.build import pareto_front
from bench.leaderboard.rank import Entry, competition_ranks, rank_entries, tie_groups
from bench.leaderboard.record import read_record, record_schema, validate_record
from bench.metrics import get_metric


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    t = tmp_path_factory.mktemp("built")
    run = make_run(
        t / "run", {"good": 2.5, "weak": 0.3}, privacy={"good": {"memorization_rate": 0.4, "flagged": True}}
    )
    # Ranked with its flag shown: this board's eligibility rule keeps flagged generators in the ranking.
    board = make_board(t / "board", eligibility={"privacy_flagged": "show", "contamination": "exclude"})
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    assert main(["leaderboard", "build", str(board)]) == 0
    return board


# ------------------------------------------------------------------------------------------------ schema


def test_schema_is_draft_2020_12_and_versioned():
    import jsonschema

    s = record_schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["properties"]["schema_version"] == {"const": "1.0"}


def test_record_round_trips_through_the_schema(built):
    for p in (built / "records").glob("*.json"):
        rec = json.loads(p.read_text())
        assert validate_record(rec) == []
        again = json.loads(json.dumps(rec))
        assert again == rec and validate_record(again) == []
        assert read_record(p) == rec


def test_schema_names_every_broken_field(built):
    rec = json.loads(next((built / "records").glob("*good*.json")).read_text())
    bad = copy.deepcopy(rec)
    del bad["task"]
    bad["predictions_sha256"] = "not-a-hash"
    bad["metrics"]["regimes"]["synthetic"]["n_cases"] = -1
    bad["surprise"] = 1
    bad["schema_version"] = "2.0"
    problems = "\n".join(validate_record(bad))
    for text in (
        "'task' is a required property",
        "'predictions_sha256'",
        "'metrics.regimes.synthetic.n_cases'",
        "'surprise' was unexpected",
        "'schema_version'",
    ):
        assert text in problems, problems


def test_a_hand_edited_record_stops_the_build(built, tmp_path, capsys):
    board = tmp_path / "board"
    shutil.copytree(built, board)
    p = next((board / "records").glob("*weak*.json"))
    rec = json.loads(p.read_text())
    rec["metrics"]["regimes"]["synthetic"]["value"] = "0.99"
    p.write_text(json.dumps(rec))
    before = snapshot(board)
    assert main(["leaderboard", "build", str(board)]) == 2
    err = capsys.readouterr().err
    assert p.name in err and "metrics.regimes.synthetic.value" in err
    assert snapshot(board) == before


def test_changed_predictions_stop_the_build(built, tmp_path, capsys):
    board = tmp_path / "board"
    shutil.copytree(built, board)
    rec = json.loads(next((board / "records").glob("*good*.json")).read_text())
    pred = board / rec["predictions"]["file"]
    pred.write_bytes(pred.read_bytes() + b"\0")
    before = snapshot(board)
    assert main(["leaderboard", "build", str(board)]) == 2
    assert f"record {rec['id']}" in capsys.readouterr().err
    assert snapshot(board) == before


# ------------------------------------------------------------------------------------------------ ranking


def test_competition_ranks_and_ties():
    assert competition_ranks(np.array([0.9, 0.8, 0.8, 0.7]), True).tolist() == [[1, 2, 2, 4]]
    assert competition_ranks(np.array([0.1, 0.3, 0.2]), False).tolist() == [[1, 3, 2]]


def test_tie_groups_anchor_on_the_group_leader():
    # A [1,2], B [2,3], C [3,4]: B overlaps A, C overlaps B but not A -> chaining would make one group.
    rank, low, high = np.array([1, 2, 3]), np.array([1, 2, 3]), np.array([2, 3, 4])
    assert tie_groups(rank, low, high, np.array([0.9, 0.8, 0.7]), True).tolist() == [1, 1, 2]
    # Disjoint intervals: every record alone.
    assert tie_groups(rank, rank, rank, np.array([0.9, 0.8, 0.7]), True).tolist() == [1, 2, 3]


def _hand_case(n_pat: int = 60, seed: int = 0):
    """Binary labels; 'perfect' separates them, 'good' is noisy, 'coin' is noise, 'coin2' a copy of 'coin'."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n_pat)  # two cases per patient, one of each class
    pid = np.repeat(np.arange(n_pat), 2).astype(str)
    site = np.where(np.arange(2 * n_pat) % 4 < 2, "a", "b")

    def probs(score):
        return np.column_stack([1 - score, score])

    perfect = probs(np.where(y == 1, 0.9, 0.1) + rng.uniform(-0.05, 0.05, len(y)))
    good = probs(np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.2, len(y)), 0, 1))
    coin = probs(rng.uniform(0, 1, len(y)))
    return y, pid, site, {"perfect": perfect, "good": good, "coin": coin, "coin2": coin.copy()}


def test_ranks_and_intervals_on_a_hand_made_case():
    y, pid, site, P = _hand_case()
    metric = get_metric("auroc_macro", ["neg", "pos"])
    entries = [Entry(k, [P[k]]) for k in ("coin", "good", "perfect", "coin2")]
    r = rank_entries(entries, y, pid, site, metric, n_boot=300, seed=1)
    res = r.as_dict()
    for k in P:
        assert res[k]["value"] == pytest.approx(roc_auc_score(y, P[k][:, 1]), abs=1e-12)
    assert res["perfect"]["rank"] == 1 and (res["perfect"]["rank_low"], res["perfect"]["rank_high"]) == (1, 1)
    assert res["good"]["rank"] == 2 and (res["good"]["rank_low"], res["good"]["rank_high"]) == (2, 2)
    # Identical predictions: the same rank in every replicate, so the same interval and the same group.
    assert res["coin"]["rank"] == res["coin2"]["rank"] == 3
    assert (
        (res["coin"]["rank_low"], res["coin"]["rank_high"])
        == (3, 3)
        == (res["coin2"]["rank_low"], res["coin2"]["rank_high"])
    )
    assert [res[k]["tie_group"] for k in ("perfect", "good", "coin", "coin2")] == [1, 2, 3, 3]
    assert r.n_cases == len(y) and r.n_patients == 60 and r.n_boot_used == 300


def test_close_records_share_a_tie_group():
    """Two records a hair apart on a small sample: wide, overlapping rank intervals, one tie group."""
    y, pid, site, P = _hand_case(n_pat=20, seed=3)
    rng = np.random.default_rng(7)

    def probs(s):
        return np.column_stack([1 - s, s])

    a = probs(np.clip(0.5 + 0.1 * (2 * y - 1) + rng.normal(0, 0.2, len(y)), 0, 1))
    g2 = probs(np.clip(a[:, 1] + rng.normal(0, 0.03, len(y)), 0, 1))
    P["good"] = a
    metric = get_metric("auroc_macro", ["neg", "pos"])
    r = rank_entries(
        [Entry("a", [P["good"]]), Entry("b", [g2]), Entry("z", [P["perfect"]])],
        y,
        pid,
        site,
        metric,
        n_boot=300,
        seed=0,
    ).as_dict()
    assert r["z"]["rank"] == 1 and r["z"]["tie_group"] == 1
    assert r["a"]["tie_group"] == r["b"]["tie_group"] == 2
    assert r["a"]["rank_low"] == r["b"]["rank_low"] == 2 and r["a"]["rank_high"] == r["b"]["rank_high"] == 3
    # the tie says how large a difference the board would have seen: (1.96 + 0.84) x the paired difference's
    # bootstrap sd, for the follower only; leaders and records alone in their group carry none
    follower = "a" if r["a"]["rank"] > r["b"]["rank"] else "b"
    leader = "b" if follower == "a" else "a"
    assert r[leader]["mde"] is None and r["z"]["mde"] is None
    assert 0 < r[follower]["mde"] < 0.2
    assert r[follower]["mde"] > abs(r["a"]["value"] - r["b"]["value"])


def test_training_seeds_are_averaged():
    y, pid, site, P = _hand_case(n_pat=15, seed=5)
    metric = get_metric("auroc_macro", ["neg", "pos"])
    two_seeds = Entry("avg", [P["good"], P["coin"]])
    r = rank_entries(
        [two_seeds, Entry("good", [P["good"]])], y, pid, site, metric, n_boot=100, seed=0
    ).as_dict()
    expect = np.mean([roc_auc_score(y, P["good"][:, 1]), roc_auc_score(y, P["coin"][:, 1])])
    assert r["avg"]["value"] == pytest.approx(expect, abs=1e-12)


def test_pareto_front_hand_case():
    pts = {"a": (0.9, 0.10, 0.40), "b": (0.8, 0.05, 0.01), "c": (0.7, 0.20, 0.02), "d": (0.9, 0.10, 0.50)}
    assert pareto_front(pts) == {"a", "b"}  # c is dominated by b; d by a


# ------------------------------------------------------------------------------------------------ pages


def test_build_writes_ranked_pages(built):
    readme = (built / "README.md").read_text()
    html = (built / "index.html").read_text()
    assert (
        readme.startswith("<!-- Generated by `medsynbench leaderboard build`")
        and "Do not edit by hand" in readme
    )
    assert "Do not edit by hand" in html.split("<html", 1)[0]
    recs = [json.loads(p.read_text()) for p in (built / "records").glob("*.json")]
    table = [ln for ln in readme.splitlines() if ln.startswith("| ") and "Rank" not in ln]
    assert len(table) == len(recs) == 3
    assert table[0].startswith("| 1 [1, 1] | 1 | [good 0.1]")
    assert "real-only (reference)" in table[1] and table[2].split(" | ")[2].startswith("[weak")
    for header in (
        "Ratio to real-only",
        "Gain when mixed",
        "Scarcity rescue",
        "Worst-subgroup AUROC",
        "Largest subgroup gap",
        "Calibration error",
        "Memorization rate",
        "Contamination",
    ):
        assert header in readme and header in html
    assert "0.400 [" in table[0] and "flagged" in table[0]
    assert not list(built.glob(".*.tmp"))


def test_html_is_self_contained(built):
    html = (built / "index.html").read_text()
    low = html.lower()
    for needle in ("<link", " src=", "@import", "url(", "<iframe", "<img"):
        assert needle not in low, needle
    # The only URLs are the generators' own links, as anchors the script writes from the data.
    import re

    urls = set(re.findall(r"https?://[^\"'\s<>]+", html))
    assert urls <= {"https://example.org/good", "https://example.org/weak"}
    assert '<svg id="pareto"' in html and 'class="front"' in html


def test_build_with_no_records(tmp_path):
    board = make_board(tmp_path / "board")
    assert main(["leaderboard", "build", str(board)]) == 0
    assert "No records yet" in (board / "README.md").read_text()
    assert 'data-expected-rows="0"' in (board / "index.html").read_text()


def test_build_is_deterministic(built, tmp_path):
    board = tmp_path / "board"
    shutil.copytree(built, board)
    first = (board / "README.md").read_text()
    assert main(["leaderboard", "build", str(board)]) == 0
    assert (board / "README.md").read_text() == first


# ------------------------------------------------------------------------------------------------ push


def test_push_writes_an_offline_run_with_the_table(built, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "wb"
    assert main(["leaderboard", "push", str(built), "--wandb-project", "lb-test", "--dir", str(out)]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    tables = list(runs[0].rglob("leaderboard_*.table.json"))
    assert len(tables) == 1
    t = json.loads(tables[0].read_text())
    n = len(list((built / "records").glob("*.json")))
    assert len(t["data"]) == n
    cols = t["columns"]
    assert {
        "rank",
        "rank_low",
        "rank_high",
        "tie_group",
        "generator",
        "utility",
        "memorization",
        "pareto",
    } <= set(cols)
    by_gen = {row[cols.index("generator")]: row for row in t["data"]}
    assert by_gen["good"][cols.index("rank")] == 1


def test_push_rejects_bad_mode_and_empty_board(tmp_path, capsys):
    board = make_board(tmp_path / "board")
    assert main(["leaderboard", "push", str(board), "--wandb-project", "p", "--dir", str(tmp_path)]) == 2
    assert "no records to push" in capsys.readouterr().err
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_the_committed_leaderboard_rebuilds_to_the_same_pages(tmp_path, monkeypatch):
    """Every number on the published board comes back from its stored predictions and answer key, re-scored
    without any cache, and the pages come out as committed."""
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "leaderboards" / "mediastinal-neoplasm"
    board = tmp_path / "board"
    shutil.copytree(committed, board)
    monkeypatch.setenv("MEDSYNBENCH_CACHE", str(tmp_path / "empty-cache"))
    assert main(["leaderboard", "build", str(board)]) == 0
    for page in ("README.md", "index.html"):
        assert (board / page).read_text() == (committed / page).read_text(), page
    cfg = (board / "leaderboard.yaml").read_text()
    from bench.tasks import load_task

    assert (
        f'version: "{load_task("mediastinal-neoplasm").version}"' in cfg
    )  # the board is of the current task
