"""The model audit on a real RUN folder: who counts as a member, which models serve as references, and where the
result shows (report section, control check, summary, leaderboard record and column)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_TASK, make_tiny_dataset
from test_matrix import card_for, make_synthetic

from bench.cli import main
from bench.evaluation.controls import FAIL, NOT_RUN, PASS
from bench.evaluation.model_privacy import check_copycat_leak
from bench.generators.card import hash_id
from bench.leaderboard.model_privacy import model_privacy_cells, record_model_privacy
from bench.leaderboard.record import validate_record
from bench.manifest import read_manifest
from bench.privacy.model import aggregate_figures
from bench.runfolder import RunDir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    """A tiny matrix with a reserve split; the synthetic set's card says it was trained on reserve patients (as
    the real-holdout control is), so real-only and synthetic-only models can serve as each other's references."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mia")
    spec = copy.deepcopy(TINY_TASK)
    spec["splits"] = {
        "unit": "patient_id",
        "train": 0.35,
        "reserve": 0.25,
        "val": 0.1,
        "test": 0.3,
        "seed": 0,
    }
    (root / "tasks" / "tiny").mkdir(parents=True)
    task_path = root / "tasks" / "tiny" / "task.yaml"
    task_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    from bench.tasks import load_task

    task = load_task(task_path)
    real = make_tiny_dataset(root / "data", task, patients_per_site=24)
    df = read_manifest(real).df
    reserve = sorted(set(df.loc[(df["split"] == "reserve") & (df["origin"] == "real"), "patient_id"]))
    card = card_for(real, patients=[hash_id(p) for p in reserve], splits=["reserve"])
    syn = make_synthetic(root / "syn", card=card)
    out = root / "run"
    args = ["run", "--task", str(task_path), "--real", str(real), "--out", str(out)]
    args += ["--synthetic", f"shapes={syn}", "--regimes", "real,synthetic,scarce:0.5", "--seeds", "0"]
    args += ["--preset", "smoke", "--backbone", "resnet10t", "--epochs", "2", "--threads", "1"]
    args += ["--cache-dir", str(root / "cache"), "--wandb", "disabled", "--quiet"]
    try:
        assert main(args) == 0
        rc = main(["privacy-model", str(out), "--n-boot", "50", "--cache-dir", str(root / "cache")])
        assert rc == 0
        assert main(["evaluate", str(out), "--n-boot", "30"]) == 0
    finally:
        torch.set_num_threads(before)
    result = json.loads(RunDir(out).model_privacy_file.read_text())
    return out, df, reserve, result


def _arm(result, generator, regime):
    return next(a for a in result["arms"] if a["generator"] == generator and a["regime"] == regime)


def test_members_are_the_patients_whose_data_reached_each_model(audited_run):
    out, df, reserve, result = audited_run
    train = set(df.loc[df["split"] == "train", "patient_id"])
    scores = pd.read_parquet(RunDir(out).model_privacy_dir / "scores.parquet")
    hashed = {hash_id(p)[:16]: p for p in df["patient_id"].unique()}
    for run, s in scores.groupby("run"):
        members = {hashed[h] for h in s.loc[s["member"], "patient"]}
        non = {hashed[h] for h in s.loc[~s["member"], "patient"]}
        assert not members & non
        assert not non & set(df.loc[df["split"] == "val", "patient_id"])
        if run.startswith("none__real__"):
            assert members == train
            assert not non & set(reserve)  # the references (synthetic-only, trained on reserve) saw those
        elif run.startswith("shapes__synthetic__"):
            assert members == set(reserve)
            assert not non & train
        else:  # scarce: half of the training patients, the other half may serve as non-members
            assert members < train and 0.3 < len(members) / len(train) < 0.7


def test_references_never_saw_the_target_members(audited_run):
    _, _, _, result = audited_run
    real = _arm(result, "none", "real")
    syn = _arm(result, "shapes", "synthetic")
    assert real["calibrated"] and syn["calibrated"]
    for seed in real["per_seed"]:
        assert seed["references"] and all(r.startswith("shapes__synthetic__") for r in seed["references"])
    for seed in syn["per_seed"]:
        assert {r.split("__")[1] for r in seed["references"]} == {"real", "scarce-0.5"}
    for a in result["arms"]:
        for k in ("auroc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "advantage"):
            e = a["metrics"][k]
            assert e["ci_low"] <= e["value"] <= e["ci_high"] or e["value"] is None


def test_non_members_take_the_members_class_mix(audited_run):
    out, df, _, _ = audited_run
    scores = pd.read_parquet(RunDir(out).model_privacy_dir / "scores.parquet")
    label = {hash_id(p)[:16]: lab for p, lab in zip(df["patient_id"], df["label"], strict=True)}
    for _, s in scores.drop_duplicates(["run", "patient"]).groupby("run"):
        mix = s.assign(label=s["patient"].map(label)).groupby("member")["label"].value_counts(normalize=True)
        m, n = mix[True], mix[False]
        assert set(n.index) <= set(m.index)
        assert np.abs(m.reindex(n.index) - n).max() < 0.2


def test_report_summary_and_service_figures_carry_the_audit(audited_run):
    out, _, _, result = audited_run
    md = (out / "evaluation" / "report.md").read_text()
    assert "## Privacy of the trained model" in md
    assert "Utility (auroc_macro" in md  # the utility-vs-leakage figure
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert {(a["generator"], a["regime"]) for a in summary["model_privacy"]["arms"]} == {
        (a["generator"], a["regime"]) for a in result["arms"]
    }
    figures = aggregate_figures(out)
    text = json.dumps(figures)
    assert (
        "per_seed" not in text and "references" not in text and "patient" not in text.replace("patients", "")
    )
    assert len(figures["arms"]) == len(result["arms"])


def test_leaderboard_record_field_validates_and_fills_the_column(audited_run):
    out, _, _, result = audited_run
    mp = record_model_privacy(RunDir(out), "shapes")
    assert mp["arms"] and {a["regime"] for a in mp["arms"]} == {"synthetic"}
    old = json.loads(
        next((REPO / "leaderboards" / "mediastinal-neoplasm" / "records").glob("*.json")).read_text()
    )
    assert validate_record({**old, "model_privacy": mp}) == []
    assert validate_record({**old, "model_privacy": None}) == []
    bad = copy.deepcopy(mp)
    del bad["arms"][0]["auroc"]
    assert any("auroc" in p for p in validate_record({**old, "model_privacy": bad}))
    cell = model_privacy_cells({"kind": "generator", "model_privacy": mp})["model_leak"]
    assert cell == _arm(result, "shapes", "synthetic")["metrics"]["auroc"]
    ref = record_model_privacy(RunDir(out), "none")
    assert (
        model_privacy_cells({"kind": "reference", "model_privacy": ref})["model_leak"]
        == (_arm(result, "none", "real")["metrics"]["auroc"])
    )


def test_committed_records_with_and_without_the_field_validate():
    # The committed records carry the field; the same records without it are what older submissions hold.
    paths = sorted((REPO / "leaderboards" / "mediastinal-neoplasm" / "records").glob("*.json"))
    assert paths
    for p in paths:
        rec = json.loads(p.read_text())
        assert "model_privacy" in rec
        assert validate_record(rec) == [], p.name
        old = {k: v for k, v in rec.items() if k != "model_privacy"}
        assert validate_record(old) == [], p.name
        broken = {**rec, "model_privacy": {"arms": "not a list"}}
        assert validate_record(broken) != [], p.name


def _result(diff):
    arms = [{"generator": "copycat", "regime": "synthetic", "auroc_diff_vs_real": diff}]
    return {"arms": arms}


@pytest.mark.parametrize(
    "diff, status",
    [
        ({"value": 0.01, "ci_low": -0.08, "ci_high": 0.1}, PASS),
        ({"value": 0.2, "ci_low": 0.1, "ci_high": 0.3}, PASS),
        ({"value": -0.04, "ci_low": -0.1, "ci_high": -0.049}, PASS),
        ({"value": -0.2, "ci_low": -0.3, "ci_high": -0.051}, FAIL),
        ({"value": None, "ci_low": None, "ci_high": None}, NOT_RUN),
    ],
)
def test_copycat_leak_check(diff, status):
    [r] = check_copycat_leak(_result(diff), {"copycat": "copycat"})
    assert r.status == status
    assert r.control == "copycat" and r.regime == "synthetic"


def test_copycat_leak_check_without_audit_or_copycat_is_not_run():
    assert check_copycat_leak(None, {"copycat": "copycat"})[0].status == NOT_RUN
    assert check_copycat_leak(_result({}), {})[0].status == NOT_RUN
