"""`medsynbench submit`: accepted runs become schema-valid, re-scored records; every rejection exits 2, names the
problem and leaves the leaderboard byte-for-byte unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from test_leaderboard_support import CLASSES, make_board, make_run, snapshot

from bench.cli import main
from bench.io import sha256_file
from bench.leaderboard.record import validate_record
from bench.leaderboard.submit import eval_cases_sha256, task_spec_sha256

SMALL = {"regimes": ["real", "synthetic"], "seeds": [0]}


def small_case(tmp_path: Path, generators: dict[str, float] | None = None, **run_kw) -> tuple[Path, Path]:
    """A run and a leaderboard with two regimes and one seed: for checks that need a submission, not every regime."""
    run = make_run(tmp_path / "run", generators or {"good": 2.0}, **SMALL, **run_kw)
    board = make_board(tmp_path / "board", protocol={**SMALL, "backbone": "resnet18"})
    return run, board


@pytest.fixture(scope="module")
def accepted(tmp_path_factory):
    """One accepted submission shared by the read-only checks below."""
    t = tmp_path_factory.mktemp("accepted")
    run = make_run(t / "run")
    board = make_board(t / "board")
    rc = main(
        [
            "submit",
            str(run),
            "--leaderboard",
            str(board),
            "--submitter",
            "Team A",
            "--contact",
            "a@example.org",
        ]
    )
    assert rc == 0
    recs = {}
    for p in sorted((board / "records").glob("*.json")):
        r = json.loads(p.read_text())
        recs[r["generator"]["name"]] = r
    return run, board, recs


def _raw(run: Path) -> pd.DataFrame:
    return pd.concat(
        [pd.read_parquet(p) for p in sorted(run.glob("*/predictions.parquet"))], ignore_index=True
    )


def test_one_record_per_generator_plus_reference(accepted):
    run, board, recs = accepted
    assert sorted(recs) == ["good", "none", "weak"]
    assert recs["none"]["kind"] == "reference" and recs["good"]["kind"] == "generator"
    assert "real-only" in recs["none"]["id"]
    for r in recs.values():
        assert validate_record(r) == []
        pred = board / r["predictions"]["file"]
        assert pred.is_file() and sha256_file(pred) == r["predictions_sha256"]
        assert r["submitter"] == {"name": "Team A", "contact": "a@example.org"}
        assert {k: r["task"][k] for k in ("name", "version")} == {"name": "tiny", "version": "1.0"}
        # Each scored field of the task has its own hash, so a changed definition can be named field by field.
        assert "metrics.ece_bins" in r["task"]["fields"] and "source.kind" not in r["task"]["fields"]
    assert len({r["id"] for r in recs.values()}) == 3
    # A generator record carries its own regimes and the real-only regimes it is compared with.
    assert set(recs["good"]["metrics"]["regimes"]) == {
        "real",
        "synthetic",
        "augment:1",
        "scarce:0.5",
        "scarce:0.5+synthetic",
    }
    assert recs["good"]["metrics"]["regimes"]["real"]["generator"] == "none"
    assert set(recs["none"]["metrics"]["regimes"]) == {"real", "scarce:0.5"}
    assert recs["good"]["privacy"]["contamination"] == {"status": "pass", "problems": []}
    assert (
        recs["good"]["manifests"]["generator_training"]
        == recs["good"]["generator"]["card"]["training"]["manifest_sha256"]
    )
    assert recs["good"]["environment"]["source"] == "run"


def test_metrics_are_rescored_from_predictions(accepted):
    """The headline number equals scikit-learn's macro AUROC on the external cases, averaged over seeds."""
    run, _, recs = accepted
    raw = _raw(run)
    ext = raw[(raw["split"] == "external")]
    pcols = [f"prob_{c}" for c in CLASSES]

    def auroc(gen: str, regime: str) -> float:
        vals = []
        for _, d in ext[(ext["generator"] == gen) & (ext["regime"] == regime)].groupby("seed"):
            y = d["y_true"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
            vals.append(roc_auc_score(y, d[pcols].to_numpy(), multi_class="ovr"))
        return float(np.mean(vals))

    good = recs["good"]["metrics"]
    assert good["headline_regime"] == "synthetic"
    assert good["regimes"]["synthetic"]["value"] == pytest.approx(auroc("good", "synthetic"), abs=1e-6)
    assert good["regimes"]["real"]["value"] == pytest.approx(auroc("none", "real"), abs=1e-6)
    assert good["utility_ratio"]["value"] == pytest.approx(
        auroc("good", "synthetic") / auroc("none", "real"), abs=1e-5
    )
    assert good["gain_mixed"]["regime"] == "augment:1"
    assert good["gain_mixed"]["value"] == pytest.approx(
        auroc("good", "augment:1") - auroc("none", "real"), abs=1e-5
    )
    assert good["scarcity_rescue"]["value"] == pytest.approx(
        auroc("good", "scarce:0.5+synthetic") - auroc("none", "scarce:0.5"), abs=1e-5
    )
    head = good["regimes"]["synthetic"]
    assert head["ci_low"] <= head["value"] <= head["ci_high"]
    assert head["n_cases"] == ext["case_id"].nunique() and head["n_patients"] == ext["patient_id"].nunique()
    assert head["n_seeds"] == 2
    assert recs["none"]["metrics"]["regimes"]["real"]["value"] == pytest.approx(
        auroc("none", "real"), abs=1e-6
    )
    assert recs["weak"]["metrics"]["regimes"]["synthetic"]["value"] < good["regimes"]["synthetic"]["value"]


def test_reported_numbers_are_never_read(tmp_path):
    """A run that claims perfect metrics gets the numbers its predictions earn."""
    run, board = small_case(tmp_path)
    for d in run.glob("*__*"):
        (d / "metrics.json").write_text(json.dumps({"auroc_macro": 1.0}))
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    rec = next(json.loads(p.read_text()) for p in (board / "records").glob("*good*.json"))
    assert rec["metrics"]["regimes"]["synthetic"]["value"] < 0.999


def test_records_hold_no_patient_or_case_ids(accepted):
    run, board, recs = accepted
    raw = _raw(run)
    ids = set(raw["patient_id"].astype(str)) | set(raw["case_id"].astype(str))
    for p in (board / "records").glob("*.json"):
        text = p.read_text()
        leaked = [i for i in ids if i in text]
        assert leaked == [], f"{p.name} holds identifiers {leaked[:3]}"
    for p in (board / "predictions").glob("*.parquet"):
        stored = pd.read_parquet(p)
        assert not (set(stored["case_id"]) | set(stored["patient_id"])) & ids
        assert "age" not in stored.columns  # raw ages stay home; the task's age bins are kept
        blob = p.read_bytes()
        assert not any(i.encode() in blob for i in list(ids)[:50])
    # The card's hashed training patients are dropped from the public record (their count stays).
    card = recs["good"]["generator"]["card"]
    assert "patients" not in card["training"] and card["training"]["n_patients"] == 3


def test_ids_in_privacy_problems_are_redacted(tmp_path):
    run, board = small_case(tmp_path)
    pid = "PAT-x1-0003"
    pv = json.loads((run / "privacy/good/privacy.json").read_text())
    pv["contamination"] = {
        "status": "fail",
        "problems": [f"synthetic image 17 duplicates external case CASE-{pid}-0"],
    }
    (run / "privacy/good/privacy.json").write_text(json.dumps(pv))
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    rec = next(json.loads(p.read_text()) for p in (board / "records").glob("*good*.json"))
    assert rec["privacy"]["contamination"]["status"] == "fail"
    assert pid not in json.dumps(rec)
    assert "<redacted>" in rec["privacy"]["contamination"]["problems"][0]


def test_dry_run_writes_nothing(tmp_path, capsys):
    run, board = small_case(tmp_path)
    before = snapshot(board)
    assert main(["submit", str(run), "--leaderboard", str(board), "--dry-run"]) == 0
    assert "would add" in capsys.readouterr().out
    assert snapshot(board) == before


def test_generator_selection_and_reference_not_duplicated(tmp_path):
    run, board = small_case(tmp_path, {"good": 2.0, "weak": 0.5})
    assert main(["submit", str(run), "--leaderboard", str(board), "--generator", "good"]) == 0
    names = sorted(json.loads(p.read_text())["generator"]["name"] for p in (board / "records").glob("*.json"))
    assert names == ["good", "none"]
    # Submitting the run's other generator later adds it alone: the same real-only reference is not added twice.
    assert main(["submit", str(run), "--leaderboard", str(board), "--generator", "weak"]) == 0
    names = sorted(json.loads(p.read_text())["generator"]["name"] for p in (board / "records").glob("*.json"))
    assert names == ["good", "none", "weak"]


# ------------------------------------------------------------------------------------------------ rejections


def _edit_preds(run: Path, folder_glob: str, fn) -> None:
    for p in sorted(run.glob(f"{folder_glob}/predictions.parquet")):
        df = pd.read_parquet(p)
        fn(df).to_parquet(p, index=False)


def _task_version(run: Path) -> None:
    t = yaml.safe_load((run / "task.yaml").read_text())
    t["version"] = "2.0"
    (run / "task.yaml").write_text(yaml.safe_dump(t))


def _nan_prob(df):
    df.loc[3, "prob_disc"] = np.nan
    return df


def _neg_prob(df):
    df.loc[5, "prob_blank"] = -0.2
    df.loc[5, "prob_disc"] += 0.2
    return df


def _bad_sum(df):
    df.loc[7, "prob_bar"] += 0.3
    return df


def _dup_case(df):
    return pd.concat([df, df[df["split"] == "external"].head(1)], ignore_index=True)


def _drop_external(df):
    ext = df.index[df["split"] == "external"]
    return df.drop(ext[:2])


def _unknown_class(df):
    df.loc[0, "y_true"] = "triangle"
    return df


REJECTIONS = {
    "task version": (lambda run: _task_version(run), {}, ["task tiny 2.0", "tiny 1.0"]),
    "missing regime": (
        lambda run: shutil.rmtree(run / "good__synthetic__resnet18__seed1"),
        {},
        ["generator 'good'", "regime 'synthetic'", "seed(s) [1]"],
    ),
    "unfinished run": (
        lambda run: (run / "none__real__resnet18__seed0" / "DONE").unlink(),
        {},
        ["generator 'none'", "regime 'real'", "seed(s) [0]"],
    ),
    "nan probability": (
        lambda run: _edit_preds(run, "weak__synthetic__resnet18__seed0", _nan_prob),
        {},
        ["weak__synthetic__resnet18__seed0", "NaN"],
    ),
    "negative probability": (
        lambda run: _edit_preds(run, "good__augment-1__resnet18__seed1", _neg_prob),
        {},
        ["good__augment-1__resnet18__seed1", "negative"],
    ),
    "rows not summing to one": (
        lambda run: _edit_preds(run, "none__real__resnet18__seed1", _bad_sum),
        {},
        ["none__real__resnet18__seed1", "sum to 1"],
    ),
    "duplicate case": (
        lambda run: _edit_preds(run, "good__synthetic__resnet18__seed0", _dup_case),
        {},
        ["good__synthetic__resnet18__seed0", "duplicate case_id"],
    ),
    "missing external case": (
        lambda run: _edit_preds(run, "weak__augment-1__resnet18__seed0", _drop_external),
        {},
        ["weak__augment-1__resnet18__seed0", "2 test/external case(s) not predicted"],
    ),
    "unknown class": (
        lambda run: _edit_preds(run, "none__scarce-0.5__resnet18__seed0", _unknown_class),
        {},
        ["none__scarce-0.5__resnet18__seed0", "'triangle'"],
    ),
    "real manifest hash": (
        lambda run: None,
        {"pins": {"manifests": {"real": "a" * 64}}},
        ["real manifest sha256", "pinned"],
    ),
    "evaluation case set": (
        lambda run: None,
        {"pins": {"eval_cases_sha256": "b" * 64}},
        ["eval_cases_sha256"],
    ),
    "task definition": (
        lambda run: None,
        {"task": {"name": "tiny", "version": "1.0", "spec_sha256": "c" * 64}},
        ["task definition differs"],
    ),
    "privacy audit missing": (
        lambda run: (run / "privacy/weak/privacy.json").unlink(),
        {},
        ["privacy/weak/privacy.json", "requires the privacy audit"],
    ),
    "contamination status": (
        lambda run: (run / "privacy/good/privacy.json").write_text(json.dumps({"memorization_rate": 0.1})),
        {},
        ["privacy/good/privacy.json", "contamination.status"],
    ),
    "generator card missing": (
        lambda run: (run / "generators/good/card.json").unlink(),
        {},
        ["generators/good", "card missing"],
    ),
    "backbone": (
        lambda run: None,
        {"protocol": {"regimes": ["real"], "seeds": [0], "backbone": "vit"}},
        ["backbone 'vit'"],
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejections_exit_2_name_problem_and_change_nothing(case, tmp_path, capsys):
    mutate, board_over, expect = REJECTIONS[case]
    run = make_run(tmp_path / "run")
    mutate(run)
    board = make_board(tmp_path / "board", **board_over)
    (board / "records").mkdir()
    (board / "records" / "keep.txt").write_text("existing content")
    before = snapshot(board)
    rc = main(["submit", str(run), "--leaderboard", str(board)])
    err = capsys.readouterr().err
    assert rc == 2, err
    for text in expect:
        assert text in err, f"{text!r} not in:\n{err}"
    assert snapshot(board) == before


def test_every_problem_is_listed_at_once(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    _edit_preds(run, "weak__synthetic__resnet18__seed0", _nan_prob)
    shutil.rmtree(run / "good__synthetic__resnet18__seed1")
    (run / "privacy/weak/privacy.json").unlink()
    board = make_board(tmp_path / "board", pins={"manifests": {"real": "a" * 64}})
    before = snapshot(board)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 2
    err = capsys.readouterr().err
    for text in ("NaN", "regime 'synthetic'", "privacy/weak/privacy.json", "real manifest sha256"):
        assert text in err
    assert snapshot(board) == before


def test_manifest_in_bundle_checks_coverage_exactly(tmp_path, capsys):
    """When the run carries its real manifest, a case every run forgot is still found."""
    run = make_run(tmp_path / "run", {"good": 2.0}, with_manifest=True)
    for d in run.glob("*__*"):
        _edit_preds(run, d.name, lambda df: df[df["case_id"] != "CASE-PAT-x1-0000-0"])
    board = make_board(tmp_path / "board")
    before = snapshot(board)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 2
    assert "'CASE-PAT-x1-0000-0'" in capsys.readouterr().err
    assert snapshot(board) == before


def test_pins_that_match_are_accepted(tmp_path):
    from bench.tasks import load_task

    run, _ = small_case(tmp_path)
    task = load_task(run / "task.yaml")
    raw = pd.concat([pd.read_parquet(p) for p in run.glob("*/predictions.parquet")])
    ev = sorted(set(raw.loc[raw["split"].isin(["test", "external"]), "case_id"]))
    real = json.loads((run / "matrix.json").read_text())["manifests"]["real"]["sha256"]
    board = make_board(
        tmp_path / "board",
        task={"name": "tiny", "version": "1.0", "spec_sha256": task_spec_sha256(task)},
        pins={"manifests": {"real": real}, "eval_cases_sha256": eval_cases_sha256(ev)},
        protocol={**SMALL, "backbone": "resnet18"},
    )
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    assert len(list((board / "records").glob("*.json"))) == 2


def test_duplicate_submission_is_rejected(tmp_path, capsys):
    run, board = small_case(tmp_path)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    before = snapshot(board)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 2
    assert "already on the leaderboard" in capsys.readouterr().err
    assert snapshot(board) == before


def test_missing_leaderboard_and_run(tmp_path, capsys):
    board = make_board(tmp_path / "board")
    assert main(["submit", str(tmp_path / "nope"), "--leaderboard", str(board)]) == 2
    assert "nope" in capsys.readouterr().err
    run = make_run(tmp_path / "run", {"good": 2.0})
    assert main(["submit", str(run), "--leaderboard", str(tmp_path / "no-board")]) == 2
    assert "leaderboard.yaml" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "leaderboard.yaml").write_text("task: {name: tiny}\nid_salt: short\nextra: 1\n")
    assert main(["submit", str(run), "--leaderboard", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "'task.version'" in err and "'extra'" in err and "'id_salt'" in err


# ------------------------------------------------------------------------------------------------ concurrency


def test_concurrent_submits_both_land(tmp_path):
    """Two processes submit different runs at the same moment: both records sets land, ids are unique, and the
    built page lists every record."""
    runs = [
        make_run(tmp_path / f"run{i}", {f"gen{i}": 1.0 + i}, noise_offset=500 * i, **SMALL) for i in range(2)
    ]
    board = make_board(tmp_path / "board", protocol={**SMALL, "backbone": "resnet18"})
    exe = [sys.executable, "-m", "bench"]
    procs = [
        subprocess.Popen(
            [*exe, "submit", str(r), "--leaderboard", str(board), "--submitter", f"team{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, r in enumerate(runs)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    recs = [json.loads(p.read_text()) for p in (board / "records").glob("*.json")]
    assert len(recs) == 4 and len({r["id"] for r in recs}) == 4
    assert sorted(r["generator"]["name"] for r in recs) == ["gen0", "gen1", "none", "none"]
    for r in recs:
        assert sha256_file(board / r["predictions"]["file"]) == r["predictions_sha256"]
    assert not list(board.rglob("*.tmp"))
    assert main(["leaderboard", "build", str(board)]) == 0
    html = (board / "index.html").read_text()
    assert all(r["id"] in html for r in recs)
    assert html.count('"kind": "reference"') == 2
