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
    from tests.conftest import TINY_TASK
    import copy

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
    for needle in ["duplicate", "triangle", "'patient_id'", "external site rows", "several splits",
                   "without a generator", "nope.png", df.loc[7, "image"]]:
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
