from __future__ import annotations

import pandas as pd
import pytest
import yaml

from bench.cli import main
from bench.errors import BadInput
from bench.manifest import manifest_hash, read_manifest, validate_manifest
from bench.tasks import load_task


def test_tiny_task_loads(tiny_task):
    assert tiny_task.classes == ["blank", "disc", "bar"]
    ages = pd.Series([10, 49.9, 50, 80, None])
    assert list(tiny_task.age_group(ages)) == ["<50", "<50", ">=50", ">=50", "unknown"]


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["image"].update(size="big"), "image.size"),
        (lambda d: d.pop("labels"), "labels"),
        (lambda d: d["sites"].update(external=["s1"]), "sites"),
    ],
)
def test_bad_task_names_file_and_field(tmp_path, mutate, field, capsys):
    import copy

    from tests.conftest import TINY_TASK

    raw = copy.deepcopy(TINY_TASK)
    mutate(raw)
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(BadInput) as e:
        load_task(p)
    assert str(p) in str(e.value) and field in str(e.value)
    assert main(["tasks", "--task", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and field in err


def test_manifest_hash_order_independent(tiny_manifest):
    df = read_manifest(tiny_manifest).df
    shuffled = df.sample(frac=1, random_state=1)[list(reversed(df.columns))]
    assert manifest_hash(df) == manifest_hash(shuffled)
    changed = df.copy()
    changed.loc[0, "label"] = "bar" if changed.loc[0, "label"] != "bar" else "disc"
    assert manifest_hash(changed) != manifest_hash(df)


def test_clean_manifest_validates(tiny_manifest, tiny_task_path, capsys):
    assert main(["data", "validate", str(tiny_manifest), "--task", str(tiny_task_path)]) == 0
    assert "rows" in capsys.readouterr().out


def test_every_problem_reported(tiny_manifest, tiny_task, tiny_task_path, capsys):
    m = read_manifest(tiny_manifest)
    df = m.df
    df.loc[1, "case_id"] = df.loc[0, "case_id"]  # duplicate
    df.loc[2, "label"] = "triangle"  # unknown class
    df.loc[3, "patient_id"] = None  # NaN in a required field
    ext_row = df.index[df["split"] == "external"][0]
    df.loc[ext_row, "split"] = "train"  # external site in a training split
    pid = df.loc[df["split"] == "train", "patient_id"].iloc[0]
    other = df.index[(df["patient_id"] != pid) & (df["split"] == "val")][0]
    df.loc[other, "patient_id"] = pid  # leakage across splits
    df.loc[5, "origin"] = "synthetic"  # synthetic without generator
    df.loc[6, "image"] = "images/nope.png"  # missing file
    (m.root / df.loc[7, "image"]).write_bytes(b"not a png")  # unreadable file
    df = df.drop(columns=["site"]).assign(site=df["site"])
    bad = tiny_manifest.with_name("bad.csv")
    df.drop(columns=["sex"]).to_csv(bad, index=False)
    problems = validate_manifest(read_manifest(bad), tiny_task)
    text = "\n".join(problems)
    for needle in [
        "duplicate",
        "triangle",
        "'patient_id'",
        "external site rows",
        "several splits",
        "without a generator",
        "nope.png",
        df.loc[7, "image"],
    ]:
        assert needle in text, needle
    before = sorted(p.name for p in bad.parent.iterdir())
    assert main(["data", "validate", str(bad), "--task", str(tiny_task_path)]) == 2
    err = capsys.readouterr().err
    assert "row 6" in err and "triangle" in err
    assert sorted(p.name for p in bad.parent.iterdir()) == before


def test_missing_column(tiny_manifest, tiny_task):
    df = read_manifest(tiny_manifest).df.drop(columns=["label"])
    p = tiny_manifest.with_name("nolabel.csv")
    df.to_csv(p, index=False)
    problems = validate_manifest(read_manifest(p), tiny_task, check_images=False)
    assert any("column 'label': required column is missing" in x for x in problems)


def test_clean_manifest_summary_counts(tiny_manifest, tiny_task_path, capsys):
    # make_tiny_dataset: 4 sites x 12 patients x 2 images, classes cycling over patients
    assert main(["data", "validate", str(tiny_manifest), "--task", str(tiny_task_path)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (
        f"{tiny_manifest}: ok: 96 rows, 48 patients, 4 sites (s1, s2, s3, x1), 3 classes (bar, blank, disc)"
    )


def _mutated(tiny_manifest, mutate):
    m = read_manifest(tiny_manifest)
    df = m.df.copy()
    df = mutate(df, m.root)
    path = tiny_manifest.with_name("mutated.csv")
    df.to_csv(path, index=False)
    return path


def _leak(df, root):
    pid = df.loc[df["split"] == "train", "patient_id"].iloc[0]
    other = df.index[(df["split"] == "val") & (df["site"] == "s1")][0]
    df.loc[other, "patient_id"] = pid
    return df


def _external_in_train(df, root):
    df.loc[df.index[df["split"] == "external"][0], "split"] = "train"
    return df


def _corrupt_png(df, root):
    (root / df.loc[7, "image"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return df


@pytest.mark.parametrize(
    "mutate, needles",
    [
        (lambda df, r: df.drop(columns=["site"]), ["column 'site': required column is missing"]),
        (
            lambda df, r: df.assign(label=df["label"].where(df.index != 4, None)),
            ["column 'label': empty/NaN in rows 4"],
        ),
        (
            lambda df, r: df.assign(case_id=[df["case_id"][0], *df["case_id"][:-1]]),
            ["duplicate", "rows 0, 1"],
        ),
        (
            lambda df, r: df.assign(image=df["image"].where(df.index != 6, "images/nope.png")),
            ["row 6: image 'images/nope.png': file not found"],
        ),
        (_corrupt_png, ["row 7: image", "corrupt PNG"]),
        (
            lambda df, r: df.assign(label=df["label"].where(df.index != 2, "triangle")),
            ["['triangle'] not among", "(rows 2)"],
        ),
        (_leak, ["appears in several splits ['train', 'val']", "leakage"]),
        (_external_in_train, ["external site rows in a training split"]),
        (
            lambda df, r: df.assign(origin=df["origin"].where(df.index != 5, "synthetic")),
            ["column 'generator': synthetic rows without a generator (rows 5)"],
        ),
        (
            lambda df, r: df.drop(columns=["generator"]).assign(origin="synthetic"),
            ["column 'generator': required when there are synthetic rows"],
        ),
        (
            lambda df, r: df.assign(split=df["split"].where(df.index != 9, "training")),
            ["column 'split': must be one of"],
        ),
        (
            lambda df, r: df.assign(origin=df["origin"].where(df.index != 9, "fake")),
            ["column 'origin': must be one of"],
        ),
    ],
    ids=[
        "missing-column",
        "nan",
        "duplicate",
        "missing-image",
        "corrupt-image",
        "unknown-label",
        "leakage",
        "external-in-train",
        "synthetic-no-generator",
        "no-generator-column",
        "bad-split",
        "bad-origin",
    ],
)
def test_each_bad_manifest_exits_2_naming_culprit(tiny_manifest, tiny_task_path, capsys, mutate, needles):
    bad = _mutated(tiny_manifest, mutate)
    before = sorted(p.name for p in bad.parent.rglob("*"))
    assert main(["data", "validate", str(bad), "--task", str(tiny_task_path)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert sorted(p.name for p in bad.parent.rglob("*")) == before  # validation writes nothing


def test_unreadable_manifest_files_exit_2(tmp_path, tiny_task_path, capsys):
    garbage = tmp_path / "m.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    cases = [
        (tmp_path / "absent.csv", "file not found"),
        (garbage, "cannot be read as parquet"),
        (tmp_path / "m.txt", "unsupported table format"),
    ]
    (tmp_path / "m.txt").write_text("case_id\n1\n")
    for path, needle in cases:
        assert main(["data", "validate", str(path), "--task", str(tiny_task_path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and needle in err, err
    assert main(["data", "validate", str(garbage), "--task", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_no_images_skips_opening_files(tiny_manifest, tiny_task_path, capsys):
    bad = _mutated(
        tiny_manifest, lambda df, r: df.assign(image=df["image"].where(df.index != 6, "images/nope.png"))
    )
    assert main(["data", "validate", str(bad), "--task", str(tiny_task_path), "--no-images"]) == 0
    assert main(["data", "validate", str(bad), "--task", str(tiny_task_path)]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_load_valid_manifest_raises_with_every_problem(tiny_manifest, tiny_task):
    from bench.manifest import load_valid_manifest

    bad = _mutated(
        tiny_manifest,
        lambda df, r: df.assign(
            label=df["label"].where(df.index > 1, "triangle"), site=df["site"].where(df.index != 3, "mars")
        ),
    )
    with pytest.raises(BadInput) as e:
        load_valid_manifest(bad, tiny_task)
    assert str(bad) in str(e.value) and len(e.value.problems) == 2
    assert "triangle" in str(e.value) and "'mars'" in str(e.value)
    assert len(load_valid_manifest(tiny_manifest, tiny_task)) == 96
