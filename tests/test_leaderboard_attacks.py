"""Attempts to climb a leaderboard without a better generator, each refused: relabelled predictions, edited site or
subgroup columns, a record edited by hand, a predictions file swapped for another record's, a generator the
privacy audit flags; plus the answer key itself, published file modes and records free of local paths."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from test_leaderboard_support import CLASSES, answer_key, make_board, make_run, snapshot

from bench.cli import main
from bench.errors import BadInput
from bench.io import sha256_file
from bench.leaderboard.key import AnswerKey, MissingCases, UnknownCases, hash_ids

SMALL = {"regimes": ["real", "synthetic"], "seeds": [0]}
SALT = "test-salt-0123"


def _edit_all(run: Path, fn) -> None:
    for p in sorted(run.glob("*/predictions.parquet")):
        fn(pd.read_parquet(p)).to_parquet(p, index=False)


def _relabel(df: pd.DataFrame, by: pd.DataFrame | None = None) -> pd.DataFrame:
    """The attack of the issue: every y_true replaced by the model's own predicted class (that of `by`, the
    generator's run, when given, so that every run of the submission carries the same labels)."""
    src = df if by is None else by
    probs = src[[f"prob_{c}" for c in CLASSES]].to_numpy()
    guess = dict(zip(src["case_id"], np.asarray(CLASSES)[probs.argmax(axis=1)], strict=True))
    return df.assign(y_true=df["case_id"].map(guess))


def _relabel_run(run: Path, generator: str) -> None:
    model = pd.read_parquet(next(run.glob(f"{generator}__synthetic*/predictions.parquet")))
    _edit_all(run, lambda df: _relabel(df, model))


def _auroc(df: pd.DataFrame) -> float:
    labels = sorted(CLASSES)
    return roc_auc_score(
        df["y_true"], df[[f"prob_{c}" for c in labels]].to_numpy(), multi_class="ovr", labels=labels
    )


def _small(tmp_path: Path, generators: dict[str, float]) -> tuple[Path, Path]:
    run = make_run(tmp_path / "run", generators, **SMALL)
    board = make_board(tmp_path / "board", protocol={**SMALL, "backbone": "resnet18"})
    return run, board


def _records(board: Path) -> dict[str, dict]:
    return {
        r["generator"]["name"]: r
        for r in (json.loads(p.read_text()) for p in (board / "records").glob("*.json"))
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An honest board: a strong and a weak generator and the real-only reference, submitted and built."""
    t = tmp_path_factory.mktemp("honest")
    run = make_run(t / "run", {"strong": 2.5, "weak": 0.3}, **SMALL)
    board = make_board(t / "board", protocol={**SMALL, "backbone": "resnet18"})
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    assert main(["leaderboard", "build", str(board)]) == 0
    return run, board


def _copy(built, tmp_path: Path) -> Path:
    board = tmp_path / "board"
    shutil.copytree(built[1], board)
    return board


# ------------------------------------------------------------------------------------------------ submit


def test_relabelled_predictions_are_refused_naming_rows(tmp_path, capsys):
    run, board = _small(tmp_path, {"weak": 0.3})
    _relabel_run(run, "weak")
    before = snapshot(board)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 2
    err = capsys.readouterr().err
    assert "answer key" in err and "column 'y_true'" in err
    assert "predictions.parquet row " in err and "(case CASE-" in err
    assert snapshot(board) == before


def test_cross_check_numbers_rows_from_one_like_every_row_message():
    key = answer_key(SALT)
    preds = key.df.rename(columns={"label": "y_true"}).head(4).copy()
    wrong = next(c for c in CLASSES if c != preds.loc[2, "y_true"])
    preds.loc[2, "y_true"] = wrong  # the third data row
    (problem,) = key.cross_check(preds)
    assert f"row 3 (case {preds.loc[2, 'case_id']})" in problem and "column 'y_true'" in problem, problem


def test_relabelled_predictions_score_what_the_key_says(tmp_path):
    """Joined to the key, relabelled predictions carry the true labels: the score is the honest one."""
    run = make_run(tmp_path / "run", {"weak": 0.3}, **SMALL)
    p = next(run.glob("weak__synthetic*/predictions.parquet"))
    honest = pd.read_parquet(p)
    forged = _relabel(honest)
    key = answer_key(SALT)
    salted = forged.assign(
        case_id=hash_ids(forged["case_id"], SALT), patient_id=hash_ids(forged["patient_id"], SALT)
    )
    joined = key.join(salted)
    want = _auroc(honest[honest["split"] == "external"])
    got = _auroc(joined[joined["split"] == "external"])
    inflated = _auroc(forged[forged["split"] == "external"])
    assert got == pytest.approx(want) and inflated > want + 0.1
    # Validation rows are not evaluation cases: the key drops them.
    assert set(joined["split"]) == {"test", "external"} and len(joined) == len(key.df)


@pytest.mark.parametrize(
    ("column", "edit"),
    [
        ("site", lambda df: df.assign(site=df["site"].where(df["split"] != "external", "site_a"))),
        ("sex", lambda df: df.assign(sex="F")),
        ("age_group", lambda df: df.assign(age_group=">=50")),
        ("split", lambda df: df.assign(split=df["split"].replace({"test": "external"}))),
    ],
)
def test_edited_site_or_subgroup_columns_are_refused(tmp_path, capsys, column, edit):
    run, board = _small(tmp_path, {"good": 2.0})
    _edit_all(run, edit)
    before = snapshot(board)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 2
    err = capsys.readouterr().err
    assert f"column {column!r} disagrees with the answer key" in err
    assert snapshot(board) == before


def test_a_board_without_an_answer_key_accepts_nothing(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"good": 2.0}, **SMALL)
    board = make_board(tmp_path / "board", key=False, protocol={**SMALL, "backbone": "resnet18"})
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 2
    assert "no answer_key" in capsys.readouterr().err
    assert not (board / "records").exists()


# ------------------------------------------------------------------------------------------------ build


def test_a_hand_edited_headline_is_refused_and_pages_kept(built, tmp_path, capsys):
    board = _copy(built, tmp_path)
    p = next((board / "records").glob("*weak*.json"))
    rec = json.loads(p.read_text())
    true_value = rec["metrics"]["regimes"]["synthetic"]["value"]
    rec["metrics"]["regimes"]["synthetic"]["value"] = 0.999  # schema-valid, just not true
    p.write_text(json.dumps(rec))
    before = snapshot(board)
    assert main(["leaderboard", "build", str(board)]) == 2
    err = capsys.readouterr().err
    assert f"record {rec['id']}" in err
    assert f"metrics.regimes.synthetic.value: record says 0.999, predictions give {true_value}" in err
    assert snapshot(board) == before


def test_a_swapped_predictions_file_is_refused(built, tmp_path, capsys):
    """The weak record given the strong record's predictions (hash updated to match): the file's generator and,
    once that is relabelled too, the numbers give it away."""
    board = _copy(built, tmp_path)
    recs = _records(board)
    weak, strong = recs["weak"], recs["strong"]
    target = board / weak["predictions"]["file"]
    shutil.copyfile(board / strong["predictions"]["file"], target)
    path = board / "records" / f"{weak['id']}.json"

    def point_at_file() -> None:
        rec = json.loads(path.read_text())
        rec["predictions_sha256"] = sha256_file(target)
        path.write_text(json.dumps(rec))

    point_at_file()
    before = snapshot(board)
    assert main(["leaderboard", "build", str(board)]) == 2
    err = capsys.readouterr().err
    assert f"record {weak['id']}" in err and "predictions of another record" in err
    assert snapshot(board) == before

    df = pd.read_parquet(target)
    df.loc[df["generator"] == "strong", "generator"] = "weak"
    df.to_parquet(target, index=False)
    point_at_file()
    before = snapshot(board)
    assert main(["leaderboard", "build", str(board)]) == 2
    err = capsys.readouterr().err
    assert f"record {weak['id']}: its stored numbers disagree" in err
    assert snapshot(board) == before


def test_relabelled_stored_predictions_are_refused_at_build(built, tmp_path, capsys):
    """Predictions relabelled inside the board itself (hash updated): the build's cross-check names the rows."""
    board = _copy(built, tmp_path)
    rec = _records(board)["weak"]
    target = board / rec["predictions"]["file"]
    _relabel(pd.read_parquet(target)).to_parquet(target, index=False)
    path = board / "records" / f"{rec['id']}.json"
    r = json.loads(path.read_text())
    r["predictions_sha256"] = sha256_file(target)
    path.write_text(json.dumps(r))
    assert main(["leaderboard", "build", str(board)]) == 2
    err = capsys.readouterr().err
    assert f"record {rec['id']}: column 'y_true' disagrees with the answer key" in err
    assert f"{rec['predictions']['file']} row " in err


def test_an_edited_answer_key_is_refused(built, tmp_path, capsys):
    board = _copy(built, tmp_path)
    key = pd.read_parquet(board / "answer_key.parquet")
    key.loc[0, "label"] = next(c for c in CLASSES if c != key.loc[0, "label"])
    key.to_parquet(board / "answer_key.parquet", index=False)
    assert main(["leaderboard", "build", str(board)]) == 2
    assert "does not match the sha256 recorded in leaderboard.yaml" in capsys.readouterr().err


def test_cached_scores_are_used_only_for_the_same_inputs(built, tmp_path, monkeypatch):
    """A second build reads the cache; a record edited afterwards is still refused (the cache is keyed by the
    predictions, not by what the record says)."""
    import importlib

    build_mod = importlib.import_module("bench.leaderboard.build")
    board = _copy(built, tmp_path)
    assert main(["leaderboard", "build", str(board)]) == 0
    calls = []
    real = build_mod.score_submission
    monkeypatch.setattr(build_mod, "score_submission", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["leaderboard", "build", str(board)]) == 0
    assert calls == []
    p = next((board / "records").glob("*strong*.json"))
    rec = json.loads(p.read_text())
    rec["metrics"]["utility_ratio"]["value"] += 0.01
    p.write_text(json.dumps(rec))
    assert main(["leaderboard", "build", str(board)]) == 2


def test_a_build_after_submit_reuses_its_scores_and_agrees_without_them(tmp_path, monkeypatch):
    """`submit` leaves its scores where `build` looks, so the build that follows recomputes nothing; with that
    cache gone, the build recomputes every record and agrees with what submit stored."""
    import importlib

    build_mod = importlib.import_module("bench.leaderboard.build")
    monkeypatch.setenv("MEDSYNBENCH_CACHE", str(tmp_path / "cache"))
    run, board = _small(tmp_path, {"weak": 0.3})
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    calls = []
    real = build_mod.score_submission
    monkeypatch.setattr(build_mod, "score_submission", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["leaderboard", "build", str(board)]) == 0
    assert calls == []
    from bench.leaderboard.spec import cache_file

    cache_file().unlink()
    assert main(["leaderboard", "build", str(board)]) == 0
    assert len(calls) == len(list((board / "records").glob("*.json"))) == 2


def test_pages_and_records_are_world_readable(built):
    board = built[1]
    for p in [
        board / "README.md",
        board / "index.html",
        *board.glob("records/*.json"),
        *board.glob("predictions/*"),
    ]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o444 == 0o444 and not mode & 0o022, (p, oct(mode))


def test_the_page_says_numbers_come_from_the_key(built):
    readme = (built[1] / "README.md").read_text()
    assert "joined to the answer key" in readme and "`answer_key.parquet`" in readme
    assert "public data" in readme


# ------------------------------------------------------------------------------------------------ eligibility


def _flagged_board(tmp_path: Path, eligibility: dict | None = None, privacy: dict | None = None) -> Path:
    run = make_run(
        tmp_path / "run",
        {"copier": 3.0, "honest": 1.0},
        **SMALL,
        privacy=privacy
        or {"copier": {"memorization_rate": 0.9, "ci_low": 0.8, "ci_high": 0.95, "flagged": True}},
    )
    over = {"eligibility": eligibility} if eligibility else {}
    board = make_board(tmp_path / "board", protocol={**SMALL, "backbone": "resnet18"}, **over)
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    assert main(["leaderboard", "build", str(board)]) == 0
    return board


def _ranked_names(readme: str) -> list[str]:
    main_table = readme.split("## Not ranked")[0]
    return [
        ln.split(" | ")[2]
        for ln in main_table.splitlines()
        if ln.startswith("| ") and not ln.startswith("| Rank")
    ]


def test_a_flagged_generator_is_not_ranked_nor_on_the_front(tmp_path):
    board = _flagged_board(tmp_path)
    readme = (board / "README.md").read_text()
    ranked = _ranked_names(readme)
    assert not any("copier" in n for n in ranked) and any("honest" in n for n in ranked)
    assert ranked[0].startswith("real-only") or ranked[0].startswith("[honest")
    section = readme.split("## Not ranked")[1]
    assert "copier" in section and "flagged by the privacy audit: memorization rate 0.900" in section
    front = readme.split("Pareto front (")[1].split("\n")[0]
    assert "copier" not in front
    html = (board / "index.html").read_text()
    data = json.loads(html.split('id="board-data">')[1].split("</script>")[0])
    assert all(r["name"] != "copier" for r in data["rows"])
    assert [r["name"] for r in data["facts"]["not_ranked"]] == ["copier"]
    assert '<table id="not-ranked">' in html and "copier" in html.split('<svg id="pareto"')[0]
    assert "copier" not in html.split('<svg id="pareto"')[1].split("</svg>")[0]


def test_a_contaminated_generator_is_not_ranked(tmp_path):
    board = _flagged_board(
        tmp_path,
        privacy={
            "copier": {"contamination": {"status": "fail", "problems": ["test images in training data"]}}
        },
    )
    readme = (board / "README.md").read_text()
    assert not any("copier" in n for n in _ranked_names(readme))
    assert "contamination checks fail (test images in training data)" in readme.split("## Not ranked")[1]


def test_the_rule_lives_in_leaderboard_yaml(tmp_path):
    board = _flagged_board(tmp_path, eligibility={"privacy_flagged": "show", "contamination": "exclude"})
    readme = (board / "README.md").read_text()
    assert "## Not ranked" not in readme
    assert _ranked_names(readme)[0].startswith("[copier")


# ------------------------------------------------------------------------------------------------ key and paths


def test_key_from_the_manifest_matches_the_evaluation_cases(tmp_path, tiny_task):
    run = make_run(tmp_path / "run", {"good": 2.0}, **SMALL, with_manifest=True)
    key = AnswerKey.build_from_manifest(run / "manifests" / "real.parquet", tiny_task, SALT)
    want = answer_key(SALT).df
    cols = ["case_id", "patient_id", "label", "site", "split", "sex", "age_group", "part"]
    assert key.df[cols].equals(want[cols])
    split = AnswerKey.build_from_manifest(
        run / "manifests" / "real.parquet", tiny_task, SALT, private_fraction=0.5, seed=1
    )
    per_patient = split.df.groupby("patient_id")["part"].nunique()
    assert per_patient.max() == 1  # a patient's cases stay in one part
    for _, g in split.df.drop_duplicates("patient_id").groupby("site"):
        assert (g["part"] == "private").sum() == round(0.5 * len(g))
    path = tmp_path / "key.parquet"
    sha = split.write(path)
    assert AnswerKey.read(path, sha).df.equals(split.df)
    with pytest.raises(BadInput, match="does not match the sha256"):
        AnswerKey.read(path, "0" * 64)


def test_join_names_unknown_and_missing_cases():
    key = answer_key(SALT)
    rows = key.df.rename(columns={"label": "y_true"}).assign(
        prob_circle=1.0,
        prob_square=0.0,
        prob_triangle=0.0,
        generator="g",
        regime="real",
        seed=0,
        backbone="b",
    )
    rows = rows.drop(columns=["part"])
    assert len(key.join(rows)) == len(key.df)
    extra = pd.concat([rows, rows.iloc[:1].assign(case_id="not-in-key")], ignore_index=True)
    with pytest.raises(UnknownCases, match="1 case"):
        key.join(extra)
    with pytest.raises(MissingCases) as e:
        key.join(rows.iloc[3:])
    assert "3 of the" in "\n".join(e.value.problems)


def test_records_hold_no_local_paths(tmp_path):
    run = make_run(tmp_path / "run", {"good": 2.0}, **SMALL)
    preset = tmp_path / "home" / "someone" / "presets" / "mine.yaml"
    preset.parent.mkdir(parents=True)
    preset.write_text("epochs: 3\n")
    for cfg in run.glob("*/config.json"):
        c = json.loads(cfg.read_text())
        c["preset"] = {"name": "mine", "path": str(preset)}
        c["protocol"] = {"name": "", "path": str(tmp_path / "protocols" / "p.yaml")}
        c["notes"] = f"made in {tmp_path}"
        cfg.write_text(json.dumps(c))
    board = make_board(tmp_path / "board", protocol={**SMALL, "backbone": "resnet18"})
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    for p in (board / "records").glob("*.json"):
        text = p.read_text()
        assert str(tmp_path) not in text and '"path"' not in text
        config = json.loads(text)["protocol"]["config"]
        assert config["preset"] == {"name": "mine", "sha256": sha256_file(preset)}
        assert config["protocol"] == {"name": "", "sha256": None}
    assert main(["leaderboard", "build", str(board)]) == 0
    for page in ("README.md", "index.html"):
        assert str(tmp_path) not in (board / page).read_text()


def test_key_command_writes_the_key_and_points_leaderboard_yaml_at_it(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"good": 2.0}, **SMALL, with_manifest=True)
    board = make_board(tmp_path / "board", key=False, protocol={**SMALL, "backbone": "resnet18"})
    rc = main(["leaderboard", "key", str(board), "--real", str(run / "manifests" / "real.parquet")])
    assert rc == 0, capsys.readouterr().err
    cfg = yaml.safe_load((board / "leaderboard.yaml").read_text())
    assert cfg["answer_key"] == {
        "path": "answer_key.parquet",
        "sha256": sha256_file(board / "answer_key.parquet"),
    }
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    assert main(["leaderboard", "build", str(board)]) == 0
