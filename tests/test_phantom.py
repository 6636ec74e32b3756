from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from scipy import ndimage

from bench.cli import main
from bench.phantom import (
    CLASSES,
    DEFAULTS,
    EXTERNAL_SITES,
    SITE_BY_NAME,
    SITES,
    TRAIN_SITES,
    _write_series,
    phantom_phi_values,
    plan_patient,
    render_patient,
    write_phantom,
)
from bench.tasks import load_task

SMALL = {"patients": 14, "slices": 2, "size": 48, "seed": 3}


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ph") / "export"
    write_phantom(out, **SMALL, workers=1)
    return out


def _labels(out: Path) -> list[dict[str, str]]:
    with open(out / "labels.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_files_read_back_with_plain_pydicom_with_intended_hu(small_phantom):
    rows = {r["patient_id"]: r for r in _labels(small_phantom)}
    files = sorted(small_phantom.rglob("*.dcm"))
    assert len(files) == SMALL["patients"] * SMALL["slices"]
    for i in range(SMALL["patients"]):
        plan = plan_patient(SMALL["seed"], i)
        intended, geo = render_patient(plan, SMALL["slices"], SMALL["size"], SMALL["seed"])
        intended = np.clip(intended, -1024, 3071)
        series = sorted((small_phantom / f"PA{i:06d}").rglob("*.dcm"))
        assert len(series) == SMALL["slices"]
        for k, f in enumerate(series):
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == pydicom.uid.CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "CT" and ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
            assert ds.pixel_array.dtype == np.int16
            hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            # Written values are the intended HU rounded to the nearest integer.
            assert np.abs(hu - intended[k]).max() <= 0.5 + 1e-4
            site = SITE_BY_NAME[plan.site]
            assert float(ds.RescaleIntercept) == site.intercept
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx(
                [site.fov_mm / SMALL["size"]] * 2, rel=1e-5
            )
            assert float(ds.SliceThickness) == site.thickness_mm
            assert float(ds.ImagePositionPatient[2]) == pytest.approx(float(ds.SliceLocation))
            assert ds.InstanceNumber == k + 1
            row = rows[str(ds.PatientID)]
            assert ds.InstitutionName == row["site"] == plan.site
            assert ds.PatientSex == row["sex"]
            assert ds.PatientAge == f"{int(row['age']):03d}Y"
            assert ("ContrastBolusAgent" in ds) == (row["contrast"] == "CE")
            assert ds.Manufacturer == site.manufacturer
            assert str(ds.PatientName) == plan.name and ds.PatientBirthDate == plan.birth_date
        # Adjacent slices: positions step by the slice thickness, head to feet.
        z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in series]
        assert np.allclose(np.diff(z), -SITE_BY_NAME[plan.site].thickness_mm)


def test_fast_encoding_is_byte_identical_to_pydicom_save_as(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(6):
        plan = plan_patient(1, i)
        fa = _write_series(a, plan, 3, 40, 1, fast=True)
        fb = _write_series(b, plan, 3, 40, 1, fast=False)
        for x, y in zip(fa, fb, strict=True):
            assert (a / x).read_bytes() == (b / y).read_bytes()


def test_birth_date_matches_age_at_study():
    for i in range(200):
        p = plan_patient(0, i)
        b, s = pd.Timestamp(p.birth_date), pd.Timestamp(p.study_date)
        completed = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
        assert completed == p.age


def _lesion_stats(label: str, contrast: str | None = None, n: int = 6, seed: int = 0):
    out = []
    for i in range(4000):
        p = plan_patient(seed, i)
        # Attenuation is checked where the scanner is well calibrated and quiet: the external hospitals' low-dose
        # noise and calibration offsets are there to make them harder, not to move the lesions' HU.
        if p.label != label or (contrast and p.contrast != contrast) or p.site not in TRAIN_SITES:
            continue
        hu, geo = render_patient(p, 3, 256, seed)
        mask = geo["lesion"]
        assert mask.any(axis=(1, 2)).all(), "every slice of a lesion patient shows the lesion"
        # Away from the margin, where the reconstruction blur mixes the lesion with its surroundings.
        mask = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3)), iterations=3)
        out.append((hu - geo["hu_offset"], mask, p))
        if len(out) == n:
            break
    assert len(out) == n
    return out


def _iqr(v: np.ndarray) -> float:
    q1, q3 = np.percentile(v, [25, 75])
    return float(q3 - q1)


def _core_and_rim(h: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    """Median HU of the inner and outer halves of a lesion (by distance from its edge), middle slice."""
    k = len(m) // 2
    depth = ndimage.distance_transform_edt(m[k])
    inner = depth > np.median(depth[m[k]])
    return float(np.median(h[k][inner])), float(np.median(h[k][m[k] & ~inner]))


def test_lesion_structure_follows_radiology():
    cysts = _lesion_stats("benign_cyst")
    # Interquartile ranges: the spine, drawn after the lesion, may cover a corner of a paravertebral one.
    assert all(_iqr(h[m]) < 32 for h, m, _ in cysts)  # homogeneous fluid: scanner noise only
    germ = _lesion_stats("germ_cell_tumor", n=8)
    assert sum((h[m] < -60).sum() > 0 for h, m, _ in germ) >= 6  # fat foci
    assert sum((h[m] > 300).sum() > 0 for h, m, _ in germ) >= 6  # calcification
    carc = [_core_and_rim(h, m) for h, m, _ in _lesion_stats("thymic_carcinoma")]
    assert all(core < rim - 40 for core, rim in carc), carc  # necrotic centre
    neuro = [_core_and_rim(h, m) for h, m, _ in _lesion_stats("neurogenic_tumor")]
    assert all(core > rim + 40 for core, rim in neuro), neuro  # target sign
    thy = _lesion_stats("thymoma")
    assert all(_iqr(h[m]) > 60 for h, m, _ in thy)  # lobules and septa


def test_lesion_classes_share_first_order_statistics():
    """Mean attenuation, area and position carry no class: a classifier has to look at structure."""
    mean_hu, area, row = {}, {}, {}
    for c in CLASSES[1:]:
        vals = []
        for i in range(4000):
            p = plan_patient(0, i)
            if p.label != c or p.contrast != "PL" or p.site not in TRAIN_SITES:
                continue
            hu, geo = render_patient(p, 1, 128, 0)
            m = geo["lesion"]
            vals.append(
                (np.clip(hu[m] - geo["hu_offset"], -160, 240).mean(), m.sum(), np.nonzero(m)[1].mean())
            )
            if len(vals) == 15:
                break
        mean_hu[c], area[c], row[c] = np.mean(vals, axis=0)
    assert max(mean_hu.values()) - min(mean_hu.values()) < 12, mean_hu
    assert max(area.values()) < 1.5 * min(area.values()), area
    assert max(row.values()) - min(row.values()) < 15, row  # of 128 rows


def test_the_task_crop_holds_every_lesion():
    """The task keeps the central `crop_mm` of each image; no lesion pixel of any class or site may fall outside."""
    crop = load_task("mediastinal-neoplasm").image.crop_mm
    assert crop is not None
    farthest, seen = 0.0, set()
    for i in range(300):
        p = plan_patient(0, i)
        if p.label == "normal":
            continue
        _, geo = render_patient(p, 2, 64, 0)
        rows, cols = np.nonzero(geo["lesion"].any(axis=0))
        c = (64 - 1) / 2
        # Pixel centres, plus half a pixel: the farthest edge of a lesion pixel.
        far = (max(np.abs(rows - c).max(), np.abs(cols - c).max()) + 0.5) * geo["spacing"]
        farthest = max(farthest, far)
        seen.add((p.label, p.site))
    assert {lab for lab, _ in seen} == set(CLASSES[1:]) and {s for _, s in seen} == set(SITE_BY_NAME)
    assert farthest <= crop / 2, (farthest, crop)
    assert farthest > 0.4 * crop, farthest  # and the crop is not needlessly wide


def test_normal_anatomy_hu():
    p = next(plan_patient(0, i) for i in range(100) if plan_patient(0, i).label == "normal")
    hu, geo = render_patient(p, 1, 256, 0)
    assert not geo["lesion"].any()
    img = hu[0] - geo["hu_offset"]
    assert np.median(img[:3, :]) == pytest.approx(-1000, abs=40)  # air in the corners
    assert (img > 500).sum() > 20  # bone
    lungish = img[(img < -600) & (img > -950)]
    assert lungish.size > 0.1 * img.size and np.median(lungish) == pytest.approx(-850, abs=60)


def test_every_class_and_site_at_default_size():
    plans = [plan_patient(DEFAULTS["seed"], i) for i in range(DEFAULTS["patients"])]
    df = pd.DataFrame([p.__dict__ for p in plans])
    assert set(df["label"]) == set(CLASSES)
    assert set(df["site"]) == {s.name for s in SITES}
    assert len(TRAIN_SITES) == 3 and len(EXTERNAL_SITES) == 2
    counts = pd.crosstab(df["site"], df["label"])
    assert (counts.loc[list(TRAIN_SITES)].sum() >= 10).all()  # every class learnable from the training sites
    assert (counts.loc[list(EXTERNAL_SITES)] >= 3).all().all()  # every class at every external site
    assert df["patient_id"].is_unique


def test_subgroups_shift_prevalence_and_sites_differ():
    df = pd.DataFrame([plan_patient(0, i).__dict__ for i in range(3000)])
    young_men = df[(df["sex"] == "M") & (df["age"] < 40)]
    others = df.drop(young_men.index)
    assert (young_men["label"] == "germ_cell_tumor").mean() > 2 * (
        others["label"] == "germ_cell_tumor"
    ).mean()
    old = df[df["age"] >= 50]
    young = df[df["age"] < 35]
    thymic = ["thymoma", "thymic_carcinoma"]
    assert old["label"].isin(thymic).mean() > 1.2 * young["label"].isin(thymic).mean()
    ce = df.groupby("site")["contrast"].apply(lambda s: (s == "CE").mean())
    assert ce.max() - ce.min() > 0.3
    specs = list(SITES)
    for attr in ("noise_sd", "sharp_mm", "hu_offset", "fov_mm", "manufacturer"):
        assert len({getattr(s, attr) for s in specs}) >= 3, attr


def test_deterministic_for_a_seed_and_worker_count(tmp_path):
    args = {"patients": 9, "slices": 2, "size": 40}
    write_phantom(tmp_path / "a", seed=5, workers=1, **args)
    write_phantom(tmp_path / "b", seed=5, workers=2, **args)
    write_phantom(tmp_path / "c", seed=6, workers=1, **args)
    ha, hb, hc = (_tree_hashes(tmp_path / k) for k in "abc")
    assert ha == hb
    assert ha.keys() == hc.keys() and all(ha[k] != hc[k] for k in ha if k.endswith(".dcm"))
    # A patient does not depend on how many others are written.
    write_phantom(tmp_path / "d", seed=5, workers=1, patients=4, slices=2, size=40)
    hd = _tree_hashes(tmp_path / "d")
    assert all(hd[k] == ha[k] for k in hd if k.endswith(".dcm"))


def test_cli_writes_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "export"
    assert (
        main(["data", "phantom", "--out", str(out), "--patients", "5", "--slices", "2", "--size", "40"]) == 0
    )
    assert "5 patients, 10 DICOM images" in capsys.readouterr().out
    labels = pd.read_csv(out / "labels.csv")
    assert list(labels.columns) == ["patient_id", "label", "site", "sex", "age", "contrast"]
    assert len(labels) == 5
    before = _tree_hashes(out)
    assert main(["data", "phantom", "--out", str(out), "--patients", "3"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _tree_hashes(out) == before
    bad = tmp_path / "bad"
    assert main(["data", "phantom", "--out", str(bad), "--patients", "0", "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert "--patients" in err and "--size" in err
    assert not bad.exists() and not list(tmp_path.glob(".bad*"))


def test_no_phi_in_manifest(small_phantom, tmp_path, capsys):
    phi = phantom_phi_values(small_phantom)
    labels = _labels(small_phantom)
    assert {r["patient_id"] for r in labels} <= phi
    assert any("^" in v for v in phi) and any(len(v) == 8 and v.isdigit() for v in phi)  # names, birth dates
    out = tmp_path / "manifest.csv"
    assert (
        main(
            [
                "data",
                "manifest",
                "--task",
                "mediastinal-neoplasm",
                "--root",
                str(small_phantom),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text(encoding="utf-8")
    leaked = sorted(v for v in phi if v in text)
    assert not leaked
    df = pd.read_csv(out)
    assert df["patient_id"].nunique() == SMALL["patients"]


def test_without_root_the_task_uses_the_phantom_once(tmp_path, monkeypatch, caplog):
    import bench.sources.dicom as dicom_mod

    task_dir = tmp_path / "tasks" / "mediastinal-neoplasm"
    task_dir.mkdir(parents=True)
    raw = yaml.safe_load((load_task("mediastinal-neoplasm").path).read_text())
    raw["source"]["options"]["phantom"] = {"patients": 12, "slices": 2, "size": 40, "seed": 1}
    (task_dir / "task.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MEDSYNBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(dicom_mod, "_ANNOUNCED", set())
    with caplog.at_level(logging.INFO):
        assert main(["data", "manifest", "--task", str(task_dir), "--out", str(tmp_path / "m1.parquet")]) == 0
        assert main(["data", "manifest", "--task", str(task_dir), "--out", str(tmp_path / "m2.parquet")]) == 0
    homes = list((tmp_path / "data" / "phantom").iterdir())
    assert len(homes) == 1 and (homes[0] / "labels.csv").is_file()
    assert sum("using the built-in CT phantom" in r.getMessage() for r in caplog.records) == 1
    assert sum("writing the built-in phantom" in r.getMessage() for r in caplog.records) == 1
    a, b = pd.read_parquet(tmp_path / "m1.parquet"), pd.read_parquet(tmp_path / "m2.parquet")
    assert len(a) == 24 and a.equals(b)


@pytest.mark.slow
def test_thousand_patients_in_under_a_minute(tmp_path):
    s = write_phantom(tmp_path / "big", patients=1000, slices=3, size=128, seed=0, workers=2)
    assert s["images"] == 3000 and len(list((tmp_path / "big").rglob("*.dcm"))) == 3000
    assert s["seconds"] < 60, s["seconds"]
