"""One scoring spec: a board's verdict never depends on its score cache, and a changed task is named field by field."""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml
from conftest import TINY_TASK
from test_leaderboard_support import make_board, make_run, snapshot

from bench.cli import main
from bench.leaderboard.spec import ScoringSpec, cache_file, changed_fields, registry_fingerprint, task_fields
from bench.tasks import Task

# Every scored field of the task's `metrics` section, with a valid value it does not already hold, plus fields of
# other sections that change what a score is.
CHANGES = {
    "metrics.primary": "balanced_accuracy",
    "metrics.target_specificity": 0.7,
    "metrics.min_patients": 40,
    "metrics.min_positives": 3,
    "metrics.min_negatives": 3,
    "metrics.permutations": 10,
    "metrics.patient_aggregation": "mean",
    "metrics.bootstrap": 60,
    "metrics.ece_bins": 5,
    "labels.binary_view.positive": ["disc"],
    "subgroups.age_bins": [40],
}


def _set(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
    d[last] = value


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    t = tmp_path_factory.mktemp("spec")
    run = make_run(t / "run", {"good": 2.0})
    b = make_board(t / "board")
    assert main(["submit", str(run), "--leaderboard", str(b)]) == 0
    assert main(["leaderboard", "build", str(b)]) == 0
    return b


def test_the_task_spec_covers_every_metrics_field():
    fields = task_fields(Task.model_validate(TINY_TASK))
    assert {f"metrics.{k}" for k in Task.model_fields["metrics"].annotation.model_fields} <= set(fields)
    assert set(CHANGES) <= set(fields)
    assert not any(f.startswith("source") for f in fields)


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_changed_task_field_is_refused_with_a_warm_and_a_cold_cache(board, tmp_path, field, capsys):
    copy_ = tmp_path / "board"
    shutil.copytree(board, copy_)
    task = copy.deepcopy(TINY_TASK)
    _set(task, field, CHANGES[field])
    (copy_ / "task.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    before = snapshot(copy_)
    verdicts = []
    for warm in (True, False):
        if not warm and cache_file().exists():
            cache_file().unlink()
        code = main(["leaderboard", "build", str(copy_)])
        err = capsys.readouterr().err
        verdicts.append((code, field in err))
    assert verdicts == [(2, True), (2, True)]
    assert snapshot(copy_) == before


def test_an_unchanged_board_builds_with_a_warm_and_a_cold_cache(board, tmp_path):
    copy_ = tmp_path / "board"
    shutil.copytree(board, copy_)
    assert main(["leaderboard", "build", str(copy_)]) == 0
    cache_file().unlink()
    assert main(["leaderboard", "build", str(copy_)]) == 0


def test_a_submission_with_another_task_definition_is_refused_naming_the_field(board, tmp_path, capsys):
    task = copy.deepcopy(TINY_TASK)
    task["metrics"]["ece_bins"] = 5
    run = make_run(tmp_path / "run", {"other": 1.0}, task=task)
    before = snapshot(board)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 2
    assert "metrics.ece_bins" in capsys.readouterr().err
    assert snapshot(board) == before


def test_the_cache_key_changes_with_everything_a_score_depends_on():
    task = Task.model_validate(TINY_TASK)
    base = ScoringSpec.of(task, n_boot=40, seed=0)
    key = base.cache_key("p" * 64, "k" * 64, "good")
    other_task = copy.deepcopy(TINY_TASK)
    other_task["metrics"]["ece_bins"] = 5
    variants = [
        ScoringSpec.of(Task.model_validate(other_task), n_boot=40, seed=0),
        ScoringSpec.of(task, n_boot=41, seed=0),
        ScoringSpec.of(task, n_boot=40, seed=1),
        ScoringSpec.of(task, n_boot=40, seed=0, primary="balanced_accuracy"),
        ScoringSpec(**{**base.__dict__, "registry": "0" * 64}),
        ScoringSpec(**{**base.__dict__, "record_schema": "9.9"}),
    ]
    keys = {v.cache_key("p" * 64, "k" * 64, "good") for v in variants}
    assert key not in keys and len(keys) == len(variants)
    assert base.cache_key("q" * 64, "k" * 64, "good") != key
    assert base.cache_key("p" * 64, "j" * 64, "good") != key
    assert base.cache_key("p" * 64, "k" * 64, "weak") != key
    # Same inputs, same key (a fresh spec object, a fresh registry fingerprint).
    assert ScoringSpec.of(task, n_boot=40, seed=0).cache_key("p" * 64, "k" * 64, "good") == key
    assert registry_fingerprint() == base.registry


def test_changed_fields_names_added_removed_and_changed():
    assert changed_fields({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["b", "c"]
    assert changed_fields({"a": "1"}, {}) == ["a"]


def test_a_warm_build_joins_nothing_and_writes_the_pages_a_cold_build_writes(board, tmp_path, monkeypatch):
    from bench.leaderboard.key import AnswerKey

    copy_ = tmp_path / "board"
    shutil.copytree(board, copy_)
    assert main(["leaderboard", "build", str(copy_)]) == 0  # the cache holds every record now
    calls = []
    real = AnswerKey.join
    monkeypatch.setattr(AnswerKey, "join", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert main(["leaderboard", "build", str(copy_)]) == 0
    assert calls == []
    warm = snapshot(copy_)
    cache_file().unlink()
    assert main(["leaderboard", "build", str(copy_)]) == 0
    assert len(calls) == len(list((copy_ / "records").glob("*.json")))
    assert snapshot(copy_) == warm


def test_a_warm_build_parses_no_predictions_and_ranks_as_a_cold_one(board, tmp_path, monkeypatch):
    import numpy as np
    import pandas as pd

    from bench.leaderboard import rank as rank_module

    copy_ = tmp_path / "board"
    shutil.copytree(board, copy_)
    shutil.rmtree(cache_file().parent, ignore_errors=True)  # cold: no scores, replicates or validated records
    assert main(["leaderboard", "build", str(copy_)]) == 0
    cold = snapshot(copy_)
    replicates = sorted((cache_file().parent / "rank-replicates").glob("*.npy"))
    assert replicates and (cache_file().parent / "valid-records.json").is_file()
    parsed, scored = [], []
    real_read, real_rep = pd.read_parquet, rank_module.entry_replicates
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **k: parsed.append(1) or real_read(*a, **k))
    monkeypatch.setattr(
        rank_module, "entry_replicates", lambda *a, **k: scored.append(1) or real_rep(*a, **k)
    )
    assert main(["leaderboard", "build", str(copy_)]) == 0
    # the answer key and one table (the shared cases) are read; no record is re-scored or re-bootstrapped
    assert (len(parsed), scored) == (2, [])  # the answer key, one table
    assert snapshot(copy_) == cold
    # A damaged replicate file is not trusted: that record is bootstrapped again, the pages do not change.
    np.save(replicates[0], np.zeros(3))
    assert main(["leaderboard", "build", str(copy_)]) == 0
    assert len(scored) == 1 and snapshot(copy_) == cold


def test_the_build_after_a_submit_finds_its_ranking_replicates(tmp_path, monkeypatch):
    from bench.leaderboard import rank as rank_module

    shutil.rmtree(cache_file().parent, ignore_errors=True)
    run = make_run(tmp_path / "run", {"good": 2.0})
    b = make_board(tmp_path / "board")
    assert main(["submit", str(run), "--leaderboard", str(b)]) == 0
    from bench.leaderboard import record as record_module

    scored, validated = [], []
    real_rep, real_check = rank_module.entry_replicates, record_module.check_record
    monkeypatch.setattr(
        rank_module, "entry_replicates", lambda *a, **k: scored.append(1) or real_rep(*a, **k)
    )
    monkeypatch.setattr(
        record_module, "check_record", lambda *a, **k: validated.append(1) or real_check(*a, **k)
    )
    assert main(["leaderboard", "build", str(b)]) == 0
    # every record's replicates and its schema check were cached by submit
    assert (scored, validated) == ([], [])
    warm = snapshot(b)
    shutil.rmtree(cache_file().parent)
    assert main(["leaderboard", "build", str(b)]) == 0
    assert scored == [1] and snapshot(b) == warm  # cold: bootstrapped here, the same pages
