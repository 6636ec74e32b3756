"""The `ham10000` task and source on the shared 929-image sample (official layout, 200x150 JPEGs)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.manifest import read_manifest
from bench.sources import build_manifest
from bench.tasks import load_task

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-sample"
pytestmark = pytest.mark.skipif(
    not (SAMPLE / "HAM10000_metadata.csv").is_file(), reason=f"HAM10000 sample not found at {SAMPLE}"
)

# Site x diagnosis image counts of the sample, from its README.
SAMPLE_COUNTS = {
    "rosendahl": {"akiec": 24, "bcc": 25, "bkl": 44, "df": 3, "mel": 34, "nv": 77, "vasc": 3},
    "vidir_modern": {"akiec": 3, "bcc": 18, "bkl": 41, "df": 5, "mel": 57, "nv": 178, "vasc": 8},
    "vidir_molemax": {"akiec": 0, "bcc": 2, "bkl": 11, "df": 3, "mel": 2, "nv": 335, "vasc": 5},
    "vienna_dias": {"akiec": 0, "bcc": 2, "bkl": 3, "df": 4, "mel": 7, "nv": 33, "vasc": 2},
}


@pytest.fixture(scope="module")
def task():
    return load_task("ham10000")


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ham") / "manifest.parquet"
    assert main(["data", "manifest", "--task", "ham10000", "--root", str(SAMPLE), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def metadata() -> pd.DataFrame:
    return pd.read_csv(SAMPLE / "HAM10000_metadata.csv")


def test_task_definition(task):
    assert task.version == "1.2.0" and task.modality == "dermatoscopy"
    assert task.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert task.labels.binary_view.name == "melanoma" and task.labels.binary_view.positive == ["mel"]
    assert task.sites.train == ["vidir_modern", "vidir_molemax"]
    assert task.sites.external == ["rosendahl", "vienna_dias"]
    assert task.splits.unit == "patient_id"
    assert task.subgroups.exclude_from_gaps == {"sex": ["unknown"]}
    assert task.image.channels == 3 and task.image.intensity.kind == "uint8"
    assert {p: task.image.size_for(p) for p in ("smoke", "cpu", "gpu")} == {
        "smoke": 32,
        "cpu": 64,
        "gpu": 224,
    }
    assert task.source.kind == "ham10000" and "root" not in task.source.options


def test_sample_manifest_shape(sample_manifest, metadata, task):
    m = read_manifest(sample_manifest)
    df = m.df
    assert len(df) == 929
    assert df["site"].nunique() == 4 and set(df["site"]) == set(task.all_sites)
    assert sorted(df["label"].unique()) == task.classes
    counts = pd.crosstab(df["site"], df["label"]).reindex(columns=task.classes, fill_value=0)
    assert counts.to_dict(orient="index") == SAMPLE_COUNTS
    # One row per metadata row; ids and values carried over unchanged.
    meta = metadata.set_index("image_id")
    d = df.set_index("case_id")
    assert sorted(d.index) == sorted(meta.index)
    assert (d["patient_id"] == meta.loc[d.index, "lesion_id"]).all()
    assert (d["label"] == meta.loc[d.index, "dx"]).all()
    assert (d["site"] == meta.loc[d.index, "dataset"]).all()
    assert (d["localization"] == meta.loc[d.index, "localization"]).all()
    assert (d["dx_type"] == meta.loc[d.index, "dx_type"]).all()
    assert d["patient_id"].nunique() == metadata["lesion_id"].nunique() == 685
    # Each image path is the sample file of that id.
    for cid in d.index[:5]:
        assert (
            m.image_path(d.loc[cid, "image"]).resolve()
            == (SAMPLE / "HAM10000_images" / f"{cid}.jpg").resolve()
        )
    assert main(["data", "validate", str(sample_manifest), "--task", "ham10000"]) == 0


def test_subgroups_sex_unknown_and_missing_age(sample_manifest, metadata):
    d = read_manifest(sample_manifest).df.set_index("case_id")
    assert set(d["sex"]) == {"male", "female", "unknown"}
    assert (d["sex"] == "unknown").sum() == (metadata["sex"] == "unknown").sum() == 7
    no_age = metadata.loc[metadata["age"].isna(), "image_id"]
    assert len(no_age) == 7
    assert (d.loc[no_age, "age_group"] == "unknown").all()
    assert set(d["age_group"]) == {"<40", "40-60", ">=60", "unknown"}
    ages = d["age"].dropna()
    assert (d.loc[ages.index[ages < 40], "age_group"] == "<40").all()
    assert (d.loc[ages.index[(ages >= 40) & (ages < 60)], "age_group"] == "40-60").all()
    assert (d.loc[ages.index[ages >= 60], "age_group"] == ">=60").all()


def test_no_lesion_crosses_splits_and_external_sites_held_out(sample_manifest, task):
    df = read_manifest(sample_manifest).df
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    ext = df["site"].isin(task.sites.external)
    assert set(df.loc[ext, "split"]) == {"external"}
    assert set(df.loc[~ext, "split"]) == {"train", "val", "test"}
    # Split shares are by lesion and near the task's fractions.
    lesions = df.loc[~ext].groupby("patient_id")["split"].first().value_counts(normalize=True)
    assert abs(lesions["train"] - 0.7) < 0.05 and abs(lesions["val"] - 0.15) < 0.05


def test_official_layout_two_parts_and_row_order(tmp_path, metadata, task):
    """Images split over part_1/part_2 (here part_2 a linked folder) are found; row order does not matter."""
    root = tmp_path / "HAM10000"
    (root / "HAM10000_images_part_1").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "HAM10000_images_part_2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    sub = metadata.groupby("dataset", group_keys=False).head(12)
    for k, iid in enumerate(sub["image_id"]):
        part = root / f"HAM10000_images_part_{1 + k % 2}"
        shutil.copy(SAMPLE / "HAM10000_images" / f"{iid}.jpg", part / f"{iid}.jpg")
    sub.to_csv(root / "HAM10000_metadata.csv", index=False)
    a = build_manifest(task, root)
    assert len(a) == len(sub) == 48
    assert {Path(p).parent.name for p in a["image"]} == {"HAM10000_images_part_1", "elsewhere"}
    sub.iloc[::-1].to_csv(root / "HAM10000_metadata.csv", index=False)
    b = build_manifest(task, root)
    pd.testing.assert_frame_equal(a, b)


def _small_root(tmp_path: Path, metadata: pd.DataFrame, n: int = 30) -> tuple[Path, pd.DataFrame]:
    root = tmp_path / "ham"
    (root / "imgs").mkdir(parents=True)
    sub = metadata.groupby("dataset", group_keys=False).head(n // 4 + 1).reset_index(drop=True)
    for iid in sub["image_id"]:
        shutil.copy(SAMPLE / "HAM10000_images" / f"{iid}.jpg", root / "imgs" / f"{iid}.jpg")
    sub.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root, sub


def _manifest_cli(root: Path, out: Path, *options: str) -> int:
    args = ["data", "manifest", "--task", "ham10000", "--root", str(root), "--out", str(out)]
    for o in options:
        args += ["--option", o]
    return main(args)


def test_metadata_without_dataset_column_exit_2(tmp_path, metadata, capsys):
    root, sub = _small_root(tmp_path, metadata)
    sub.drop(columns=["dataset"]).to_csv(root / "HAM10000_metadata.csv", index=False)
    out = tmp_path / "out" / "m.parquet"
    assert _manifest_cli(root, out) == 2
    err = capsys.readouterr().err
    assert "HAM10000_metadata.csv" in err and "'dataset'" in err and "site" in err
    assert "ISIC archive" in err and "Harvard Dataverse" in err and "HAM10000_metadata" in err
    assert not out.exists() and not out.parent.exists()
    assert not (root / "manifest.parquet").exists()


def test_missing_images_listed_by_id(tmp_path, metadata, capsys):
    root, sub = _small_root(tmp_path, metadata)
    gone = [sub.at[3, "image_id"], sub.at[17, "image_id"]]
    for iid in gone:
        (root / "imgs" / f"{iid}.jpg").unlink()
    out = tmp_path / "out" / "m.parquet"
    assert _manifest_cli(root, out) == 2
    err = capsys.readouterr().err
    assert f"2 of {len(sub)} image(s)" in err
    assert f"line 5: image {gone[0]!r} not found" in err and f"line 19: image {gone[1]!r} not found" in err
    assert "allow_missing" in err
    assert not out.exists() and not (root / "manifest.parquet").exists()


def test_allow_missing_drops_and_lists(tmp_path, metadata, caplog):
    root, sub = _small_root(tmp_path, metadata)
    gone = sub.at[5, "image_id"]
    (root / "imgs" / f"{gone}.jpg").unlink()
    out = tmp_path / "m.parquet"
    with caplog.at_level(logging.WARNING):
        assert _manifest_cli(root, out, "allow_missing=true") == 0
    df = read_manifest(out).df
    assert len(df) == len(sub) - 1 and gone not in set(df["case_id"])
    assert any(gone in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_duplicate_copies_identical_ok_different_ambiguous(tmp_path, metadata, capsys):
    root, sub = _small_root(tmp_path, metadata)
    shutil.copytree(root / "imgs", root / "imgs_copy")
    out = tmp_path / "m.parquet"
    assert _manifest_cli(root, out) == 0
    iid = sub.at[0, "image_id"]
    (root / "imgs_copy" / f"{iid}.jpg").write_bytes(b"not the same image")
    out2 = tmp_path / "m2.parquet"
    assert _manifest_cli(root, out2) == 2
    err = capsys.readouterr().err
    assert iid in err and "images=FOLDER" in err
    assert not out2.exists()


def _edit(col: str, row: int, value):
    def f(sub: pd.DataFrame) -> pd.DataFrame:
        sub = sub.copy()
        sub[col] = sub[col].astype(object)
        sub.at[row, col] = value
        return sub

    return f


@pytest.mark.parametrize(
    "mutate, culprits",
    [
        (_edit("dx", 4, "scc"), ["'dx'", "'scc'", "line 6"]),
        (_edit("dataset", 2, "hospital_x"), ["'dataset'", "'hospital_x'", "line 4"]),
        (_edit("lesion_id", 7, None), ["'lesion_id'", "line 9"]),
        (_edit("age", 1, "old"), ["'age'", "line 3"]),
        (
            lambda s: s.assign(image_id=[s.at[0, "image_id"]] * 2 + list(s["image_id"][2:])),
            ["'image_id'", "lines 2, 3"],
        ),
        (lambda s: s.drop(columns=["dx"]), ["['dx']", "missing"]),
    ],
)
def test_bad_metadata_exit_2(tmp_path, metadata, capsys, mutate, culprits):
    root, sub = _small_root(tmp_path, metadata)
    mutate(sub).to_csv(root / "HAM10000_metadata.csv", index=False)
    out = tmp_path / "out" / "m.parquet"
    assert _manifest_cli(root, out) == 2
    err = capsys.readouterr().err
    assert "HAM10000_metadata.csv" in err
    for c in culprits:
        assert c in err, (c, err)
    assert not out.parent.exists()


def test_lesion_at_two_sites_is_rejected(tmp_path, metadata, capsys):
    root, sub = _small_root(tmp_path, metadata)
    ext = sub.index[sub["dataset"] == "rosendahl"][0]
    inner = sub.index[sub["dataset"] == "vidir_modern"][0]
    sub.at[ext, "lesion_id"] = sub.at[inner, "lesion_id"]
    sub.to_csv(root / "HAM10000_metadata.csv", index=False)
    assert _manifest_cli(root, tmp_path / "m.parquet") == 2
    err = capsys.readouterr().err
    assert sub.at[inner, "lesion_id"] in err and "several sites" in err


def test_metadata_option_and_unknown_option(tmp_path, metadata, capsys):
    root, sub = _small_root(tmp_path, metadata)
    (root / "meta").mkdir()
    (root / "HAM10000_metadata.csv").rename(root / "meta" / "my_metadata.csv")
    assert _manifest_cli(root, tmp_path / "m.parquet", "metadata=meta/my_metadata.csv") == 0
    assert len(read_manifest(tmp_path / "m.parquet").df) == len(sub)
    assert _manifest_cli(root, tmp_path / "m2.parquet", "metdata=meta/my_metadata.csv") == 2
    assert "metdata" in capsys.readouterr().err
    assert not (tmp_path / "m2.parquet").exists()


@pytest.mark.slow
def test_real_only_smoke_run_predicts_every_held_out_case(sample_manifest, tmp_path, task):
    run = tmp_path / "run"
    args = ["run", "--task", "ham10000", "--real", str(sample_manifest), "--regimes", "real", "--seeds", "0"]
    args += ["--preset", "smoke", "--epochs", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(run), "--quiet"]) == 0
    (folder,) = [d for d in run.iterdir() if d.is_dir() and (d / "DONE").exists()]
    assert folder.name.startswith("none__real__")
    preds = pd.read_parquet(folder / "predictions.parquet")
    man = read_manifest(sample_manifest).df.set_index("case_id")
    held_out = man.index[man["split"].isin(["val", "test", "external"])]
    assert preds["case_id"].is_unique
    assert sorted(preds["case_id"]) == sorted(held_out)
    p = preds.set_index("case_id")
    assert (p["split"] == man.loc[p.index, "split"]).all()
    assert (p["y_true"] == man.loc[p.index, "label"]).all()
    assert (p["site"] == man.loc[p.index, "site"]).all()
    probs = p[[f"prob_{c}" for c in task.classes]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all() and abs(probs.sum(axis=1) - 1).max() < 1e-4
    assert set(p.loc[p["split"] == "external", "site"]) == {"rosendahl", "vienna_dias"}
