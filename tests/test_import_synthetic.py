"""`data import-synthetic`: a user's generated images + labels CSV + card -> a validated synthetic manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from bench.cli import main
from bench.generators.card import hash_id, read_card
from bench.manifest import read_manifest, validate_manifest
from tests.conftest import draw_shape

CARD = {
    "name": "my-gan",
    "version": "2.1",
    "link": "https://example.org/my-gan",
    "training": {"manifest_sha256": "0" * 64, "sites": ["s1", "s2"], "patients": [hash_id("s1-p000")]},
    "config": {"epochs": 100},
}


def write_dicom(path: Path, arr: np.ndarray) -> Path:
    """A minimal 8-bit MONOCHROME2 secondary-capture DICOM file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def user_set(tmp_path, tiny_task):
    """A folder with PNG, JPEG, NPZ and DICOM images of one size, a labels CSV and a card."""
    rng = np.random.default_rng(0)
    root = tmp_path / "gen_out"
    (root / "imgs").mkdir(parents=True)
    rows = []
    for i in range(12):
        label = tiny_task.classes[i % 3]
        arr = draw_shape(label, rng, size=24)
        kind = ("png", "jpg", "npz", "dcm")[i % 4]
        rel = f"imgs/img{i:02d}.{kind}"
        if kind in ("png", "jpg"):
            Image.fromarray(arr).save(root / rel)
        elif kind == "npz":
            np.savez(root / rel, image=arr)
        else:
            write_dicom(root / rel, arr)
        rows.append({"image": rel, "label": label, "sex": "MF"[i % 2], "age": 30 + i})
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump(CARD))
    return {"root": root, "labels": labels, "card": card, "out": tmp_path / "out" / "syn.parquet"}


def run(tiny_task_path, s, **over) -> int:
    args = {"root": s["root"], "labels": s["labels"], "card": s["card"], "out": s["out"], **over}
    return main(
        ["data", "import-synthetic", "--task", str(tiny_task_path)]
        + [x for k, v in args.items() for x in (f"--{k}", str(v))]
    )


def test_import_writes_valid_manifest_and_card(tiny_task, tiny_task_path, user_set):
    assert run(tiny_task_path, user_set) == 0
    m = read_manifest(user_set["out"])
    assert validate_manifest(m, tiny_task, check_images=True) == []
    df = m.df
    assert len(df) == 12
    assert set(df["origin"]) == {"synthetic"} and set(df["generator"]) == {"my-gan"}
    assert set(df["site"]) == {"synthetic"} and set(df["split"]) == {"train"}
    assert (df["case_id"] == df["patient_id"]).all() and df["case_id"].is_unique
    assert list(df["age_group"][:2]) == ["<50", "<50"] and set(df["sex"]) == {"M", "F"}
    # Image paths are stored relative to the manifest and resolve to the user's files.
    assert not any(Path(p).is_absolute() for p in df["image"])
    assert [p.name for p in m.image_paths()][:4] == ["img00.png", "img01.jpg", "img02.npz", "img03.dcm"]
    card = read_card(user_set["out"].with_name("syn.card.yaml"))
    assert card.name == "my-gan" and card.version == "2.1" and card.link == CARD["link"]
    assert card.samples_per_class == {"blank": 4, "disc": 4, "bar": 4} and card.n_samples == 12
    assert card.image.height == 24 and card.image.width == 24 and card.image.channels == 1
    assert card.training.sites == ["s1", "s2"] and card.training.manifest_sha256 == "0" * 64


def test_case_ids_from_csv_are_kept(tiny_task_path, user_set):
    df = pd.read_csv(user_set["labels"])
    df["case_id"] = [f"mine-{i}" for i in range(len(df))]
    df.to_csv(user_set["labels"], index=False)
    assert run(tiny_task_path, user_set) == 0
    assert list(read_manifest(user_set["out"]).df["case_id"]) == list(df["case_id"])


def _no_output(s) -> bool:
    out = s["out"]
    return not out.exists() and not out.with_name(out.stem + ".card.yaml").exists()


def test_missing_card(tiny_task_path, user_set, capsys):
    missing = user_set["card"].with_name("nope.yaml")
    assert run(tiny_task_path, user_set, card=missing) == 2
    assert str(missing) in capsys.readouterr().err and _no_output(user_set)


def test_card_with_raw_patient_ids_or_missing_sites(tiny_task_path, user_set, capsys):
    bad = dict(CARD, training={"sites": ["s1"], "patients": ["s1-p000"]})
    user_set["card"].write_text(yaml.safe_dump(bad))
    assert run(tiny_task_path, user_set) == 2
    err = capsys.readouterr().err
    assert "training.patients" in err and "SHA-256" in err and _no_output(user_set)
    bad = dict(CARD, training={"patients": []})
    user_set["card"].write_text(yaml.safe_dump(bad))
    assert run(tiny_task_path, user_set) == 2
    assert "training.sites" in capsys.readouterr().err and _no_output(user_set)


def test_row_pointing_to_missing_file(tiny_task_path, user_set, capsys):
    df = pd.read_csv(user_set["labels"])
    df.loc[5, "image"] = "imgs/ghost.png"
    df.to_csv(user_set["labels"], index=False)
    assert run(tiny_task_path, user_set) == 2
    err = capsys.readouterr().err
    # Row 7 of the CSV file (header is row 1).
    assert "row 7" in err and "imgs/ghost.png" in err and _no_output(user_set)


def test_unknown_label(tiny_task_path, user_set, capsys):
    df = pd.read_csv(user_set["labels"])
    df.loc[2, "label"] = "triangle"
    df.to_csv(user_set["labels"], index=False)
    assert run(tiny_task_path, user_set) == 2
    err = capsys.readouterr().err
    assert "row 4" in err and "triangle" in err and _no_output(user_set)


def test_image_of_another_size(tiny_task_path, user_set, capsys):
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(user_set["root"] / "imgs" / "img04.png")
    assert run(tiny_task_path, user_set) == 2
    err = capsys.readouterr().err
    assert "img04.png" in err and "row 6" in err and "20x24" in err and "img00.png" in err
    assert _no_output(user_set)


def test_image_with_wrong_channels(tiny_task_path, user_set, capsys):
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(user_set["root"] / "imgs" / "img08.png")
    assert run(tiny_task_path, user_set) == 2
    err = capsys.readouterr().err
    assert "img08.png" in err and "3 channel" in err and _no_output(user_set)


def test_duplicate_case_ids_and_missing_columns(tiny_task_path, user_set, capsys):
    df = pd.read_csv(user_set["labels"])
    df["case_id"] = ["a"] * 2 + [f"c{i}" for i in range(10)]
    df.to_csv(user_set["labels"], index=False)
    assert run(tiny_task_path, user_set) == 2
    assert "duplicate case_id 'a'" in capsys.readouterr().err and _no_output(user_set)
    df.drop(columns=["label"]).to_csv(user_set["labels"], index=False)
    assert run(tiny_task_path, user_set) == 2
    assert "label" in capsys.readouterr().err and _no_output(user_set)


def test_existing_output_is_not_overwritten(tiny_task_path, user_set, capsys):
    assert run(tiny_task_path, user_set) == 0
    before = user_set["out"].read_bytes()
    assert run(tiny_task_path, user_set) == 2
    assert "already exists" in capsys.readouterr().err
    assert user_set["out"].read_bytes() == before


def test_card_trained_on_an_external_site_or_other_split_is_refused(tiny_task_path, user_set, capsys):
    user_set["card"].write_text(
        yaml.safe_dump(dict(CARD, training=dict(CARD["training"], sites=["s1", "x1"])))
    )
    assert run(tiny_task_path, user_set) == 2
    err = capsys.readouterr().err
    assert str(user_set["card"]) in err and "field 'training.sites'" in err and "['x1']" in err
    assert _no_output(user_set)
    user_set["card"].write_text(
        yaml.safe_dump(dict(CARD, training=dict(CARD["training"], splits=["train", "test"])))
    )
    assert run(tiny_task_path, user_set) == 2
    assert "field 'training.splits': ['test']" in capsys.readouterr().err and _no_output(user_set)


def test_image_outside_root_is_refused(tmp_path, tiny_task_path, user_set, capsys):
    # A real patient's image elsewhere on disk must not become a "synthetic" one.
    elsewhere = tmp_path / "hospital" / "patient.png"
    elsewhere.parent.mkdir()
    Image.fromarray(np.zeros((24, 24), dtype=np.uint8)).save(elsewhere)
    df = pd.read_csv(user_set["labels"])
    df.loc[3, "image"] = str(elsewhere)
    df.loc[6, "image"] = "../hospital/patient.png"
    df.loc[8, "image"] = str(user_set["root"] / df.loc[8, "image"])  # absolute but under --root: fine
    df.to_csv(user_set["labels"], index=False)
    assert run(tiny_task_path, user_set) == 2
    err = capsys.readouterr().err
    assert f"row 5: image {str(elsewhere)!r} is outside --root" in err
    assert "row 8: image '../hospital/patient.png' is outside --root" in err
    assert "row 10" not in err and _no_output(user_set)


def test_linked_image_folder_under_root_is_accepted(tmp_path, tiny_task_path, user_set):
    real = tmp_path / "store"
    (user_set["root"] / "imgs").rename(real)
    (user_set["root"] / "imgs").symlink_to(real, target_is_directory=True)
    assert run(tiny_task_path, user_set) == 0
