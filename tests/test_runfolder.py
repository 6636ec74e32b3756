"""The run folder's layout: names that round-trip, finished runs, typed readers, and one owner of the file names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.errors import BadInput
from bench.protocol import parse_synthetic_args
from bench.regimes import parse_regime
from bench.runfolder import (
    BASELINE,
    RunDir,
    RunName,
    check_generator_name,
    run_name,
    study_key,
)

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(
    ("generator", "regime", "backbone", "seed"),
    [
        (BASELINE, "real", "resnet18", 0),
        ("ddpm-v2.1", "augment:0.5", "resnet10t", 3),
        ("my_gan", "scarce:0.25+synthetic", "densenet121", 12),
        (BASELINE, "scarce:0.25", "resnet18", 1),
        ("copycat", "pretrain", "efficientnet_b0", 0),
    ],
)
def test_names_round_trip(generator, regime, backbone, seed):
    slug = parse_regime(regime).slug
    name = run_name(generator, slug, backbone, seed)
    parsed = RunName.parse(name)
    assert parsed == RunName(generator, slug, backbone, seed)
    assert str(parsed) == name
    assert parsed.arm == study_key(generator, slug, backbone)
    assert name == f"{parsed.arm}__seed{seed}"
    assert parsed.is_baseline == (generator == BASELINE)


def test_scarce_with_synthetic_has_its_documented_slug():
    name = run_name("shapes", parse_regime("scarce:0.25+synthetic").slug, "resnet18", 0)
    assert name == "shapes__scarce-0.25+syn__resnet18__seed0"
    assert RunName.parse(name).regime_slug == "scarce-0.25+syn"


@pytest.mark.parametrize(
    "name",
    [
        "none__real__resnet18",  # no seed
        "none__real__resnet18__0",  # seed without its prefix
        "none__real__resnet18__seedx",
        "a__b__none__real__resnet18__seed0",  # a generator name holding the separator
        "__real__resnet18__seed0",  # empty generator
        "none____resnet18__seed0",  # empty regime
        "evaluation",
        ".none__real__resnet18__seed0.tmp123",  # a partial folder
    ],
)
def test_malformed_names_are_rejected(name):
    with pytest.raises(ValueError):
        RunName.parse(name)
    assert RunName.try_parse(name) is None


@pytest.mark.parametrize("bad", ["a__b", "__x", "x__", "-x", "a/b", "a b", "", BASELINE])
def test_generator_names_that_cannot_name_a_folder_are_bad_input(bad):
    with pytest.raises(BadInput):
        check_generator_name(bad)


def test_synthetic_argument_rejects_the_separator_and_the_baseline():
    assert parse_synthetic_args(["ddpm_v2=/x/m.parquet", "gan-1.0=m.csv"]) == {
        "ddpm_v2": Path("/x/m.parquet"),
        "gan-1.0": Path("m.csv"),
    }
    with pytest.raises(BadInput, match="'a__b'"):
        parse_synthetic_args(["a__b=/x/m.parquet"])
    with pytest.raises(BadInput, match="reserved"):
        parse_synthetic_args([f"{BASELINE}=/x/m.parquet"])
    with pytest.raises(BadInput, match="given twice"):
        parse_synthetic_args(["g=/a.parquet", "g=/b.parquet"])
    with pytest.raises(BadInput, match="NAME=MANIFEST"):
        parse_synthetic_args(["/a.parquet"])


def _finished(run_dir: RunDir, name: str) -> Path:
    run = run_dir.run(name)
    run.path.mkdir(parents=True)
    run.predictions.write_bytes(b"")
    run.done_marker.write_text("")
    return run.path


def test_finished_runs_ignore_partial_and_unfinished_folders(tmp_path):
    rd = RunDir(tmp_path)
    a = _finished(rd, "none__real__resnet18__seed0")
    b = _finished(rd, "good__augment-1__resnet18__seed0")
    # A killed run: its temporary folder holds everything, DONE included, under the hidden name.
    partial = tmp_path / ".good__augment-1__resnet18__seed1.abc123"
    partial.mkdir()
    (partial / rd.run("good__augment-1__resnet18__seed1").predictions.name).write_bytes(b"")
    (partial / rd.run("good__augment-1__resnet18__seed1").done_marker.name).write_text("")
    # Predictions without DONE, DONE without predictions, and folders that are not runs.
    no_done = rd.run("good__synthetic__resnet18__seed0")
    no_done.path.mkdir()
    no_done.predictions.write_bytes(b"")
    no_preds = rd.run("good__synthetic__resnet18__seed1")
    no_preds.path.mkdir()
    no_preds.done_marker.write_text("")
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "a__b").mkdir()
    (tmp_path / "none__real__resnet18__seed2").write_text("a file, not a folder")

    assert [r.path for r in rd.finished_runs()] == sorted([a, b])
    assert [r.path.name for r in rd.baseline_runs()] == [a.name]
    assert rd.baseline_runs(seed=1) == []
    assert rd.partials("good__augment-1__resnet18__seed1") == [partial]
    assert {r.path.name for r in rd.iter_runs()} == {a.name, b.name, no_done.path.name, no_preds.path.name}


def test_typed_readers_name_the_file_when_it_is_broken(tmp_path):
    rd = RunDir(tmp_path)
    with pytest.raises(BadInput, match=re.escape(str(rd.matrix_file)) + ".*missing"):
        rd.matrix()
    rd.matrix_file.write_text('{"runs": [')
    with pytest.raises(BadInput, match=re.escape(str(rd.matrix_file)) + ".*not readable JSON"):
        rd.matrix()
    rd.matrix_file.write_text("[1, 2]")
    with pytest.raises(BadInput, match=re.escape(str(rd.matrix_file)) + ".*JSON object"):
        rd.matrix()
    rd.matrix_file.write_text('{"runs": "not a list"}')
    with pytest.raises(BadInput, match=re.escape(str(rd.matrix_file))) as e:
        rd.matrix()
    assert any("runs" in p for p in e.value.problems)

    run = rd.run("none__real__resnet18__seed0")
    run.path.mkdir()
    run.config_path.write_text("{not json")
    with pytest.raises(BadInput, match=re.escape(str(run.config_path)) + ".*not readable JSON"):
        run.config()
    run.config_path.write_text('{"generator": "none"}')
    with pytest.raises(BadInput, match=re.escape(str(run.config_path))) as e:
        run.config()
    assert any("run_id" in p for p in e.value.problems)


def test_readers_keep_what_they_do_not_know(tmp_path):
    rd = RunDir(tmp_path)
    rd.matrix_file.write_text(
        '{"manifests": {"real": {"path": "r.parquet", "sha256": "ab"}, "synthetic": {}},'
        ' "generators": {"g": {"manifest": {"sha256": "cd"}}}, "future_field": 1}'
    )
    info = rd.matrix()
    assert info.real_manifest().sha256 == "ab"
    assert info.synthetic_manifest("g").sha256 == "cd"
    assert info.synthetic_manifest("other") is None
    assert info.model_dump()["future_field"] == 1


# The file names of a run folder are spelled in bench/runfolder.py only; everything else asks it.
OWNER = BENCH / "runfolder.py"
LITERALS = ['"DONE"', '"predictions.parquet"', '"matrix.json"', '"config.json"']


def test_only_runfolder_spells_the_run_folder_file_names():
    offenders = []
    for path in sorted(BENCH.rglob("*.py")):
        if path == OWNER:
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(BENCH.parent)}: {lit}" for lit in LITERALS if lit in text]
    assert offenders == []
