"""User files (task.yaml, generator cards, leaderboard.yaml) all go through one reader with one kind of error."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from bench.cli import main
from bench.errors import BadInput
from bench.generators.card import read_card
from bench.leaderboard.config import LeaderboardConfig, load_config
from bench.schema import Strict, StrictMutable
from bench.tasks import Task, load_task
from bench.tune import SearchRange, TuneSpec

CARD = {
    "name": "mine",
    "version": "2.0",
    "training": {"sites": ["s1"]},
    "config": {"lr": 1e-05},
}
BOARD = {"task": {"name": "tiny", "version": "1.0"}, "id_salt": "a-salt-of-length"}


def _latin1(path, text: str) -> None:
    """`text` with a Latin-1 "é" (byte 0xe9) in a comment on line 2 and a 0xff byte on line 3."""
    path.write_bytes(text.encode() + b"# caf\xe9\n# \xff\n")


def test_task_yaml_that_is_not_utf8_is_exit_2_naming_the_file(tiny_task_path, capsys):
    tiny_task_path.write_bytes(b"# \xff\n" + tiny_task_path.read_bytes())
    assert main(["tasks", "--task", str(tiny_task_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_task_path}: task file is not UTF-8 text (byte 0xff at line 1); save it as UTF-8" in err


def test_generator_card_that_is_not_utf8_is_exit_2_naming_the_file(tiny_task_path, tmp_path, capsys):
    card = tmp_path / "card.yaml"
    _latin1(card, yaml.safe_dump(CARD))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\n")
    args = ["data", "import-synthetic", "--task", str(tiny_task_path), "--root", str(tmp_path)]
    rc = main(args + ["--labels", str(labels), "--card", str(card), "--out", str(tmp_path / "syn.parquet")])
    assert rc == 2
    n = yaml.safe_dump(CARD).count("\n") + 1
    assert f"{card}: generator card is not UTF-8 text (byte 0xe9 at line {n})" in capsys.readouterr().err


def test_leaderboard_yaml_that_is_not_utf8_is_exit_2_naming_the_file(tmp_path, capsys):
    board = tmp_path / "board"
    board.mkdir()
    _latin1(board / "leaderboard.yaml", yaml.safe_dump(BOARD))
    assert main(["leaderboard", "build", str(board)]) == 2
    n = yaml.safe_dump(BOARD).count("\n") + 1
    err = capsys.readouterr().err
    assert f"{board / 'leaderboard.yaml'}: leaderboard file is not UTF-8 text (byte 0xe9 at line {n})" in err


def test_a_utf8_byte_order_mark_is_accepted(tiny_task_path):
    tiny_task_path.write_bytes(b"\xef\xbb\xbf" + tiny_task_path.read_bytes())
    assert load_task(tiny_task_path).name == "tiny"


def test_numeric_versions_stay_the_string_the_author_wrote(tiny_task_path, tmp_path):
    raw = yaml.safe_load(tiny_task_path.read_text())
    tiny_task_path.write_text(yaml.safe_dump({**raw, "version": 2.1}))
    assert load_task(tiny_task_path).version == "2.1"
    (tmp_path / "card.yaml").write_text(yaml.safe_dump({**CARD, "version": 3}))
    assert read_card(tmp_path / "card.yaml").version == "3"
    (tmp_path / "leaderboard.yaml").write_text(
        yaml.safe_dump({**BOARD, "task": {"name": "tiny", "version": 1.0}})
    )
    assert load_config(tmp_path / "leaderboard.yaml").task.version == "1.0"


def test_json_card_is_read_as_json(tmp_path):
    # YAML 1.1 reads `1e-05` as a string; a JSON card keeps it a number.
    (tmp_path / "card.json").write_text(json.dumps(CARD))
    assert read_card(tmp_path / "card.json").config == {"lr": 1e-05}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadInput, match=r"bad.json: not valid JSON"):
        read_card(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(BadInput, match=r"list.json: a generator card must be a mapping of fields, got list"):
        read_card(tmp_path / "list.json")


def test_every_problem_names_the_file_and_field(tiny_task_path, tmp_path):
    raw = yaml.safe_load(tiny_task_path.read_text())
    raw["labels"]["clases"] = raw["labels"].pop("classes")
    tiny_task_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(BadInput) as e:
        load_task(tiny_task_path)
    assert str(tiny_task_path) in str(e.value) and "invalid task" in str(e.value)
    assert e.value.problems == [
        "field 'labels.classes': required field is missing",
        "field 'labels.clases': unknown key",
    ]
    (tmp_path / "card.yaml").write_text(yaml.safe_dump({**CARD, "seed": "x", "colour": 1}))
    with pytest.raises(BadInput) as e:
        read_card(tmp_path / "card.yaml")
    assert e.value.problems == [
        "field 'seed': Input should be a valid integer, unable to parse string as an integer (got 'x')",
        "field 'colour': unknown key",
    ]


@pytest.mark.parametrize("model", [Task, LeaderboardConfig, SearchRange, TuneSpec])
def test_configuration_models_are_strict_and_frozen(model):
    assert issubclass(model, Strict)
    assert model.model_config["frozen"] is True and model.model_config["extra"] == "forbid"


def test_generator_cards_are_strict_but_editable(tmp_path):
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(CARD))
    card = read_card(tmp_path / "card.yaml")
    assert isinstance(card, StrictMutable)
    card.description = "edited"
    assert card.description == "edited"
    with pytest.raises(ValidationError):
        SearchRange(low=0, high=1, step=2)
    r = SearchRange(low=0, high=1)
    with pytest.raises(ValidationError):
        r.low = 0.5
