from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from bench.cli import main
from bench.phantom import write_phantom
from bench.sources import build_manifest, pseudonym
from bench.sources.dicom import parse_age
from bench.tasks import load_task

TASK = "mediastinal-neoplasm"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dicom") / "export"
    write_phantom(out, patients=10, slices=3, size=40, seed=2, workers=1)
    return out


@pytest.fixture
def copy(export, tmp_path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(export, dst)
    return dst


def _manifest(root: Path, out: Path, capsys) -> tuple[int, str]:
    rc = main(["data", "manifest", "--task", TASK, "--root", str(root), "--out", str(out)])
    return rc, capsys.readouterr().err


def test_manifest_rows_match_headers_and_labels(export):
    task = load_task(TASK)
    df = build_manifest(task, export)
    labels = pd.read_csv(export / "labels.csv").set_index("patient_id")
    assert len(df) == 30 and df["case_id"].is_unique
    assert df.groupby("patient_id").size().eq(3).all()
    for r in df.itertuples():
        ds = pydicom.dcmread(r.image, stop_before_pixels=True)
        pid = str(ds.PatientID)
        assert r.patient_id == pseudonym(pid, task.name)
        lab = labels.loc[pid]
        assert (r.label, r.site, r.sex, r.contrast) == (
            lab["label"],
            lab["site"],
            lab["sex"],
            lab["contrast"],
        )
        assert r.age == float(lab["age"])
        assert Path(r.image).is_absolute()
    # Slice index runs head to feet (DICOM z decreases) within each patient.
    for _, g in df.groupby("patient_id"):
        z = [
            float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
            for p in g.sort_values("slice")["image"]
        ]
        assert sorted(g["slice"]) == [0, 1, 2] and z == sorted(z, reverse=True)


def test_header_fallbacks_when_labels_has_only_id_and_label(copy):
    full = pd.read_csv(copy / "labels.csv")
    full[["patient_id", "label"]].to_csv(copy / "labels.csv", index=False)
    (copy / "README.txt").write_text("exported by PACS\n")
    (copy / "PA000000" / "notes").write_bytes(b"\x00\x01 not dicom")
    df = build_manifest(load_task(TASK), copy)
    assert len(df) == 30  # the stray files are skipped
    per_patient = df.groupby("patient_id").first()
    expect = full.assign(patient_id=full["patient_id"].map(lambda v: pseudonym(v, TASK))).set_index(
        "patient_id"
    )
    for col in ("site", "sex", "contrast"):
        assert per_patient[col].to_dict() == expect[col].to_dict()
    assert per_patient["age"].to_dict() == expect["age"].astype(float).to_dict()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda df: df.assign(label=df["label"].where(df.index != 3, "lymphoma")), ["row 5", "'lymphoma'"]),
        (
            lambda df: pd.concat([df, pd.DataFrame([{**df.iloc[0].to_dict(), "patient_id": "XX999"}])]),
            ["row 12", "no DICOM images", "'XX999'"],
        ),
        (lambda df: df.drop(index=[2, 6]), ["without a row", "PatientID"]),
        (lambda df: pd.concat([df, df.iloc[[1]]]), ["rows 3, 12", "more than once"]),
        (lambda df: df.assign(contrast=df["contrast"].where(df.index != 0, "yes")), ["row 2", "contrast"]),
        (lambda df: df.assign(age=df["age"].astype(str).where(df.index != 1, "old")), ["row 3", "age"]),
    ],
    ids=[
        "unknown-class",
        "patient-without-images",
        "images-without-label",
        "duplicate",
        "bad-contrast",
        "bad-age",
    ],
)
def test_bad_labels_exit_2_naming_the_rows(copy, tmp_path, capsys, mutate, expected):
    df = pd.read_csv(copy / "labels.csv")
    bad = mutate(df)
    bad.to_csv(copy / "labels.csv", index=False)
    out = tmp_path / "m.parquet"
    rc, err = _manifest(copy, out, capsys)
    assert rc == 2
    assert "labels.csv" in err
    for text in expected:
        assert text in err, (text, err)
    if "without a row" in expected:
        for pid in df.loc[[2, 6], "patient_id"]:
            assert repr(pid) in err
    assert not out.exists() and not list(tmp_path.glob(".m.parquet*"))


def test_missing_labels_file_and_empty_folder(tmp_path, copy, capsys):
    (copy / "labels.csv").unlink()
    rc, err = _manifest(copy, tmp_path / "m.parquet", capsys)
    assert rc == 2 and "labels.csv" in err and "not found" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "labels.csv").write_text("patient_id,label\nP1,normal\n")
    rc, err = _manifest(empty, tmp_path / "m.parquet", capsys)
    assert rc == 2 and "no DICOM image files" in err


def test_copied_file_is_reported(copy, tmp_path, capsys):
    src = next(copy.rglob("IM000001.dcm"))
    shutil.copy(src, src.with_name("IM000099.dcm"))
    rc, err = _manifest(copy, tmp_path / "m.parquet", capsys)
    assert rc == 2 and "SOPInstanceUID" in err


def test_manifest_then_validate(export, tmp_path, capsys):
    out = tmp_path / "real.parquet"
    rc, _ = _manifest(export, out, capsys)
    assert rc == 0 and out.is_file()
    assert main(["data", "validate", str(out), "--task", TASK]) == 0
    m = pd.read_parquet(out)
    assert set(m["split"]) <= {"train", "val", "test", "external", "reserve"}
    assert (m.loc[m["site"].isin(["hospital_d", "hospital_e"]), "split"] == "external").all()
    assert {"sex", "age", "age_group", "contrast", "slice"} <= set(m.columns)


@pytest.mark.parametrize(
    "value, years",
    [
        ("045Y", 45),
        ("006M", 0.5),
        ("052W", 0.9966),
        ("030D", 0.0821),
        ("61", 61),
        (72.5, 72.5),
        ("", None),
        (None, None),
    ],
)
def test_parse_age(value, years):
    got = parse_age(value)
    assert got == (None if years is None else pytest.approx(years, abs=1e-2))


@pytest.mark.parametrize("value", ["old", "-3", "200", "45Q"])
def test_parse_age_rejects(value):
    with pytest.raises(ValueError):
        parse_age(value)


def test_missing_columns_and_bad_sex(copy, tmp_path, capsys):
    df = pd.read_csv(copy / "labels.csv")
    df.drop(columns=["label"]).to_csv(copy / "labels.csv", index=False)
    rc, err = _manifest(copy, tmp_path / "m.parquet", capsys)
    assert rc == 2 and "['label']" in err and "missing" in err
    df.assign(sex=df["sex"].where(df.index != 4, "X")).to_csv(copy / "labels.csv", index=False)
    rc, err = _manifest(copy, tmp_path / "m.parquet", capsys)
    assert rc == 2 and "row 6" in err and "sex" in err and "'X'" in err
    assert not (tmp_path / "m.parquet").exists()


@pytest.mark.parametrize("edit, expected", [("no-id", "without a PatientID"), ("multi-frame", "multi-frame")])
def test_unusable_dicom_files_are_named(copy, tmp_path, capsys, edit, expected):
    f = sorted(copy.rglob("*.dcm"))[4]
    ds = pydicom.dcmread(f)
    if edit == "no-id":
        del ds.PatientID
    else:
        ds.NumberOfFrames = 2
    ds.save_as(f, enforce_file_format=True)
    rc, err = _manifest(copy, tmp_path / "m.parquet", capsys)
    assert rc == 2 and expected in err and str(f.resolve()) in err
    assert not (tmp_path / "m.parquet").exists()


def test_bad_phantom_option_is_bad_input(tmp_path, monkeypatch, capsys):
    import yaml

    raw = yaml.safe_load(load_task(TASK).path.read_text())
    raw["source"]["options"]["phantom"] = {"patients": 0, "colour": "red"}
    d = tmp_path / "t"
    d.mkdir()
    (d / "task.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MEDSYNBENCH_DATA", str(tmp_path / "data"))
    assert main(["data", "manifest", "--task", str(d)]) == 2
    assert "colour" in capsys.readouterr().err
    raw["source"]["options"]["phantom"] = {"patients": 0}
    (d / "task.yaml").write_text(yaml.safe_dump(raw))
    assert main(["data", "manifest", "--task", str(d)]) == 2
    assert "--patients" in capsys.readouterr().err
    assert not (tmp_path / "data" / "phantom").exists() or not any((tmp_path / "data" / "phantom").iterdir())
