"""Segmentation data: task kind and masks, the phantom's DICOM SEG masks, the DICOM source's mask matching and
checks, manifest validation of masks, and label maps preprocessed in step with their images."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from bench.cli import main
from bench.errors import BadInput
from bench.imaging import PreprocessSpec, build_cache, cache_key, load_image, load_mask, read_seg_header
from bench.manifest import read_manifest, validate_manifest, write_manifest
from bench.phantom import DEFAULTS, params_key, plan_patient, render_patient, seg_path, write_phantom
from bench.sources import build_manifest
from bench.tasks import load_task

TASK = "mediastinal-neoplasm-seg"
SEED = 2


@pytest.fixture(scope="module")
def seg_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "export"
    write_phantom(out, patients=10, slices=3, size=48, seed=SEED, workers=1, masks=True)
    return out


@pytest.fixture
def copy_export(seg_export, tmp_path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(seg_export, dst)
    return dst


def _lesion_plans(n: int = 10) -> list:
    return [p for p in (plan_patient(SEED, i) for i in range(n)) if p.label != "normal"]


# ----------------------------------------------------------------------------------------------------------------
# Tasks


def test_segmentation_task_loads_and_classification_spec_is_unchanged():
    seg = load_task(TASK)
    cls = load_task("mediastinal-neoplasm")
    assert seg.kind == "segmentation" and cls.kind == "classification"
    assert seg.mask_classes == [c for c in cls.classes if c != "normal"]
    assert seg.masks.empty_label == "normal"
    # Same phantom data, sites, splits, subgroups and image handling as the classification task.
    for field in ("sites", "splits", "subgroups", "image"):
        assert getattr(seg, field) == getattr(cls, field), field
    assert seg.source.options["phantom"] == {**cls.source.options["phantom"], "masks": True}
    # A classification task's pinned spec (and so its hash) carries no trace of the new fields.
    assert "kind" not in cls.spec() and "masks" not in cls.spec()
    assert seg.spec()["kind"] == "segmentation" and seg.spec()["masks"]["classes"] == seg.mask_classes


def test_label_follows_from_the_largest_mask_class():
    t = load_task(TASK)
    assert t.label_from_mask([0, 0, 0, 0, 0]) == "normal"
    assert t.label_from_mask([3, 7, 0, 0, 1]) == "benign_cyst"
    assert t.label_from_mask([0, 0, 0, 0, 9]) == "thymic_carcinoma"


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("masks"), "masks"),
        (lambda d: d["masks"]["classes"].append("lymphoma"), "masks.classes"),
        (lambda d: d["masks"].update(empty_label="healthy"), "masks.empty_label"),
        (lambda d: d["masks"].update(empty_label="thymoma"), "empty_label"),
        (lambda d: d["masks"]["classes"].remove("thymoma"), "thymoma"),
        (lambda d: d.update(kind="classification"), "masks"),
        (lambda d: d.update(kind="detection"), "kind"),
        (lambda d: d["masks"].update(label_from_mask="smallest"), "label_from_mask"),
    ],
)
def test_bad_segmentation_task_names_file_and_field(tmp_path, capsys, mutate, field):
    raw = yaml.safe_load(Path(load_task(TASK).path).read_text())
    raw = copy.deepcopy(raw)
    mutate(raw)
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(BadInput) as e:
        load_task(p)
    assert str(p) in str(e.value) and field in str(e.value)
    assert main(["tasks", "--task", str(p)]) == 2
    assert field in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The phantom's masks


def test_masks_leave_the_images_and_the_cache_folder_of_an_export_without_masks(tmp_path, seg_export):
    plain = tmp_path / "plain"
    write_phantom(plain, patients=10, slices=3, size=48, seed=SEED, workers=1)
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    segs = {seg_path(p) for p in _lesion_plans()}
    assert segs and not segs & {str(f) for f in files}
    for f in files:
        if f.name != "phantom.json":
            assert (plain / f).read_bytes() == (seg_export / f).read_bytes(), f
    masked = sorted(p.relative_to(seg_export) for p in seg_export.rglob("*") if p.is_file())
    assert {str(f) for f in masked} - {str(f) for f in files} == segs
    assert (
        params_key(DEFAULTS)
        == params_key({**DEFAULTS, "masks": False})
        != params_key({**DEFAULTS, "masks": True})
    )


def test_seg_files_are_deterministic(tmp_path, seg_export):
    again = tmp_path / "again"
    write_phantom(again, patients=10, slices=3, size=48, seed=SEED, workers=2, masks=True)
    for plan in _lesion_plans():
        assert (again / seg_path(plan)).read_bytes() == (seg_export / seg_path(plan)).read_bytes()


def test_seg_frames_are_the_drawn_lesion_pixel_for_pixel(seg_export):
    import highdicom as hd

    plans = _lesion_plans()
    for plan in plans:
        _, geo = render_patient(plan, 3, 48, SEED)
        seg = hd.seg.segread(seg_export / seg_path(plan))
        assert seg.segmentation_type.value == "BINARY"
        assert seg.get_segment_description(1).segment_label == plan.label
        folder = (seg_export / seg_path(plan)).parent.parent / "SE000000"
        for k, img in enumerate(sorted(folder.glob("*.dcm"))):
            ds = pydicom.dcmread(img, stop_before_pixels=True)
            got = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], combine_segments=True)[0]
            assert np.array_equal(got > 0, geo["mask"][k])
            assert geo["mask"][k].sum() > 20  # every slice of a lesion patient shows its lesion
        # Bone drawn over the lesion body is not lesion in the mask.
        assert not (geo["mask"] & ~geo["lesion"]).any()


# ----------------------------------------------------------------------------------------------------------------
# The DICOM source


def test_manifest_carries_mask_paths_and_labels_from_masks(seg_export, tmp_path):
    task = load_task(TASK)
    df = build_manifest(task, seg_export)
    labels = pd.read_csv(seg_export / "labels.csv").set_index("patient_id")
    assert len(df) == 30
    for r in df.itertuples():
        ds = pydicom.dcmread(r.image, stop_before_pixels=True)
        truth = labels.loc[str(ds.PatientID), "label"]
        assert r.label == truth
        if truth == "normal":
            assert r.mask_path is None
        else:
            head = read_seg_header(r.mask_path)
            assert ds.SOPInstanceUID in head.referenced
    # Paths in the written manifest are relative like the image's; validation (with images) passes.
    out = tmp_path / "m.parquet"
    write_manifest(df, out)
    m = read_manifest(out)
    masks = m.df["mask_path"].dropna()
    assert len(masks) and not any(Path(p).is_absolute() for p in masks)
    assert validate_manifest(m, task) == []


def test_seg_is_found_by_sop_class_not_by_name(copy_export):
    plan = _lesion_plans()[0]
    src = copy_export / seg_path(plan)
    moved = copy_export / "annotations" / "lesion-export.bin"
    moved.parent.mkdir()
    src.rename(moved)
    df = build_manifest(load_task(TASK), copy_export)
    assert set(df["mask_path"].dropna()) >= {str(moved.resolve())}


def test_classification_task_ignores_seg_files(seg_export):
    df = build_manifest(load_task("mediastinal-neoplasm"), seg_export)
    assert len(df) == 30 and "mask_path" not in df.columns


def _rewrite(path: Path, edit) -> None:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def _bad_manifest(root: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "m.parquet"
    rc = main(["data", "manifest", "--task", TASK, "--root", str(root), "--out", str(out)])
    assert rc == 2
    assert not out.exists()
    return capsys.readouterr().err


def test_mask_without_its_image(copy_export, tmp_path, capsys):
    plan = _lesion_plans()[0]
    image = copy_export / seg_path(plan).replace("SE000001/IM000001", "SE000000/IM000002")
    image.unlink()
    err = _bad_manifest(copy_export, tmp_path, capsys)
    assert str((copy_export / seg_path(plan)).resolve()) in err and "a mask without its image" in err


def test_image_without_a_mask(copy_export, tmp_path, capsys):
    plan = _lesion_plans()[0]
    (copy_export / seg_path(plan)).unlink()
    err = _bad_manifest(copy_export, tmp_path, capsys)
    assert "image without a mask" in err
    assert str((copy_export / f"PA{plan.index:06d}/ST000000/SE000000/IM000001.dcm").resolve()) in err


def _shift_position(ds):
    ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient[0] += 3.0


def _spacing(ds):
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [1.5, 1.5]


def _orientation(ds):
    ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient = [
        0,
        1,
        0,
        1,
        0,
        0,
    ]


def _frame_of_reference(ds):
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (_shift_position, "position"),
        (_spacing, "pixel spacing"),
        (_orientation, "orientation"),
        (_frame_of_reference, "FrameOfReferenceUID"),
    ],
)
def test_misaligned_seg_is_refused(copy_export, tmp_path, capsys, edit, needle):
    plan = _lesion_plans()[0]
    _rewrite(copy_export / seg_path(plan), edit)
    err = _bad_manifest(copy_export, tmp_path, capsys)
    assert str((copy_export / seg_path(plan)).resolve()) in err and "does not align" in err and needle in err


def test_image_of_another_size_than_its_mask(copy_export, tmp_path, capsys):
    plan = _lesion_plans()[0]
    image = copy_export / f"PA{plan.index:06d}/ST000000/SE000000/IM000001.dcm"

    def smaller(ds):
        ds.Rows = ds.Columns = 24
        ds.PixelData = ds.PixelData[: 24 * 24 * 2]

    _rewrite(image, smaller)
    err = _bad_manifest(copy_export, tmp_path, capsys)
    assert str(image.resolve()) in err and "48x48" in err and "24x24" in err


def test_segment_label_outside_the_mask_classes(copy_export, tmp_path, capsys):
    plan = _lesion_plans()[0]

    def relabel(ds):
        ds.SegmentSequence[0].SegmentLabel = "lymphoma"

    _rewrite(copy_export / seg_path(plan), relabel)
    err = _bad_manifest(copy_export, tmp_path, capsys)
    assert str((copy_export / seg_path(plan)).resolve()) in err and "'lymphoma'" in err


def test_segment_labels_match_classes_loosely(copy_export):
    plan = _lesion_plans()[0]

    def relabel(ds):
        ds.SegmentSequence[0].SegmentLabel = plan.label.replace("_", " ").title()

    _rewrite(copy_export / seg_path(plan), relabel)
    df = build_manifest(load_task(TASK), copy_export)
    assert (df.loc[df["mask_path"].notna(), "label"] != "normal").all()


def test_mask_class_disagreeing_with_labels_csv(copy_export, tmp_path, capsys):
    plan = _lesion_plans()[0]
    other = "benign_cyst" if plan.label != "benign_cyst" else "thymoma"

    def relabel(ds):
        ds.SegmentSequence[0].SegmentLabel = other

    _rewrite(copy_export / seg_path(plan), relabel)
    err = _bad_manifest(copy_export, tmp_path, capsys)
    assert f"implies {other!r}" in err and "labels.csv: row" in err


# ----------------------------------------------------------------------------------------------------------------
# Manifest validation


@pytest.fixture(scope="module")
def seg_manifest(seg_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segm") / "m.parquet"
    write_manifest(build_manifest(load_task(TASK), seg_export), out)
    return out


def _validate(df: pd.DataFrame, tmp_path: Path, capsys) -> str:
    p = tmp_path / "bad.parquet"
    df.to_parquet(p)
    assert main(["data", "validate", str(p), "--task", TASK]) == 2
    return capsys.readouterr().err


def _moved(seg_manifest: Path, tmp_path: Path) -> pd.DataFrame:
    """The manifest with absolute paths, so it can be rewritten anywhere."""
    m = read_manifest(seg_manifest)
    df = m.df.copy()
    df["image"] = [str(p) for p in m.image_paths()]
    df["mask_path"] = [str(m.image_path(v)) if v else None for v in df["mask_path"]]
    return df


def test_validate_needs_the_mask_column_and_lesion_masks(seg_manifest, tmp_path, capsys):
    df = _moved(seg_manifest, tmp_path)
    assert "'mask_path': required" in _validate(df.drop(columns=["mask_path"]), tmp_path, capsys)
    i = int(df.index[df["mask_path"].notna()][0])
    df.loc[i, "mask_path"] = None
    err = _validate(df, tmp_path, capsys)
    assert "have a lesion label but no mask" in err and str(i) in err


def test_validate_label_map_files(seg_manifest, tmp_path, capsys):
    from PIL import Image

    df = _moved(seg_manifest, tmp_path)
    i = int(df.index[df["mask_path"].notna()][0])
    good = load_mask(
        df.loc[i, "image"], df.loc[i, "mask_path"], PreprocessSpec(size=48), load_task(TASK).mask_classes
    )
    # A label map in the image's own grid is accepted as well as a SEG.
    png = tmp_path / "mask.png"
    Image.fromarray(good).save(png)
    df.loc[i, "mask_path"] = str(png)
    p = tmp_path / "ok.parquet"
    df.to_parquet(p)
    assert validate_manifest(read_manifest(p), load_task(TASK)) == []
    # Wrong shape, a value beyond the classes, a SEG of another image: each names its row and file.
    Image.fromarray(good[:40, :40]).save(png)
    err = _validate(df, tmp_path, capsys)
    assert f"row {i}" in err and str(png) in err and "40x40" in err
    bad = good.copy()
    bad[0, 0] = 9
    Image.fromarray(bad).save(png)
    err = _validate(df, tmp_path, capsys)
    assert f"row {i}" in err and "[9]" in err
    other = df.index[df["mask_path"].notna() & (df.index != i)]
    j = next(k for k in other if df.loc[k, "patient_id"] != df.loc[i, "patient_id"])
    df.loc[i, "mask_path"] = df.loc[j, "mask_path"]
    err = _validate(df, tmp_path, capsys)
    assert f"row {i}" in err and "does not reference this image" in err


# ----------------------------------------------------------------------------------------------------------------
# Preprocessed label maps


def test_mask_stays_on_its_lesion_through_crop_and_resize(seg_export, seg_manifest, tmp_path):
    """The lesion pushed through the image pipeline (as an HU image: +1000 inside, -1000 outside) and the SEG
    pushed through the mask pipeline land on the same pixels, at a size that needs the crop and a resize."""
    task = load_task(TASK)
    spec = PreprocessSpec.from_task(task, 32)
    assert spec.crop_mm == 280
    m = read_manifest(seg_manifest)
    checked = 0
    for plan in _lesion_plans():
        _, geo = render_patient(plan, 3, 48, SEED)
        folder = seg_export / f"PA{plan.index:06d}/ST000000/SE000000"
        for k, img in enumerate(sorted(folder.glob("*.dcm"))):
            ds = pydicom.dcmread(img, stop_before_pixels=True)
            indicator = tmp_path / f"ind{plan.index}_{k}.npz"
            np.savez(
                indicator,
                image=np.where(geo["mask"][k], 1000, -1000).astype(np.int16),
                units="HU",
                spacing=np.array([float(v) for v in ds.PixelSpacing]),
            )
            lesion = load_image(indicator, spec)[0] / 255.0
            row = m.df.index[[Path(m.image_path(p)).resolve() == img.resolve() for p in m.df["image"]]][0]
            mask = load_mask(img, m.image_path(m.df.loc[row, "mask_path"]), spec, task.mask_classes)
            value = task.mask_classes.index(plan.label) + 1
            assert set(np.unique(mask)) <= {0, value}
            assert (mask[lesion > 0.99] == value).all() and (mask[lesion < 0.01] == 0).all()
            assert (mask == value).sum() > 5
            checked += 1
    assert checked >= 9


def test_lesion_hu_inside_the_preprocessed_mask(seg_export, seg_manifest):
    """In the preprocessed CT slice, the mask covers the lesion's attenuation: its pixels are soft tissue or fluid
    (window values of -160..240 HU, mostly inside), and moving the mask off the lesion changes what it covers."""
    task = load_task(TASK)
    spec = PreprocessSpec.from_task(task, 64)
    m = read_manifest(seg_manifest)
    rows = m.df.index[m.df["mask_path"].notna()]
    for i in rows:
        img = load_image(m.image_path(m.df.loc[i, "image"]), spec)[0].astype(float)
        mask = (
            load_mask(
                m.image_path(m.df.loc[i, "image"]),
                m.image_path(m.df.loc[i, "mask_path"]),
                spec,
                task.mask_classes,
            )
            > 0
        )
        # Lesions are soft tissue, fluid or fat, never air or lung (which window to 0) ...
        inside = np.mean(img[mask] > 10)
        assert inside > 0.95, i
        # ... while the same mask moved by 12 pixels (about 5 cm) lands partly on lung or air.
        shifted = [np.mean(img[np.roll(mask, d, axis=a)] > 10) for d in (12, -12) for a in (0, 1)]
        assert min(shifted) < 0.9, i


# ----------------------------------------------------------------------------------------------------------------
# The cache


def test_cache_holds_masks_beside_images(seg_manifest, tmp_path):
    task = load_task(TASK)
    m = read_manifest(seg_manifest)
    cache = build_cache(m, task, size=32, cache_dir=tmp_path / "c", progress=False, workers=1)
    assert cache.masks is not None and cache.masks.shape == (len(m), 32, 32)
    spec = PreprocessSpec.from_task(task, 32)
    for _, r in m.df.iterrows():
        mask = r["mask_path"]
        want = load_mask(
            m.image_path(r["image"]), m.image_path(mask) if mask else None, spec, task.mask_classes
        )
        assert np.array_equal(cache.masks[cache.rows([r["case_id"]])[0]], want)
    # The key covers the masks: a classification build of the same manifest is another entry, without masks.
    cls = build_cache(m, load_task("mediastinal-neoplasm"), size=32, cache_dir=tmp_path / "c", progress=False)
    assert cls.path != cache.path and cls.masks is None
    assert cache_key(m, spec) == cache_key(m, spec, None) != cache_key(m, spec, task.mask_classes)


def test_cache_key_follows_mask_files_and_bad_masks_are_named(seg_manifest, tmp_path):
    task = load_task(TASK)
    df = _moved(seg_manifest, tmp_path)
    seg = Path(df["mask_path"].dropna().iloc[0])
    local = tmp_path / "seg.dcm"
    shutil.copy(seg, local)
    df.loc[df["mask_path"] == str(seg), "mask_path"] = str(local)
    p = tmp_path / "m.parquet"
    df.to_parquet(p)
    m = read_manifest(p)
    spec = PreprocessSpec.from_task(task, 32)
    before = cache_key(m, spec, task.mask_classes)
    _rewrite(local, lambda ds: setattr(ds.SegmentSequence[0], "SegmentLabel", "lymphoma"))
    assert cache_key(m, spec, task.mask_classes) != before
    with pytest.raises(BadInput) as e:
        build_cache(m, task, size=32, cache_dir=tmp_path / "c", progress=False, workers=1)
    assert str(local) in str(e.value) or "seg.dcm" in str(e.value)
    assert "lymphoma" in str(e.value)
    kept = build_cache(
        m, task, size=32, cache_dir=tmp_path / "c", progress=False, workers=1, skip_corrupt=True
    )
    n_bad = int((df["mask_path"] == str(local)).sum())
    assert len(kept) == len(df) - n_bad and kept.masks.shape[0] == len(kept)


def test_task_phantom_option_masks(tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load(load_task(TASK).path.read_text())
    raw["source"]["options"]["phantom"] = {"patients": 6, "slices": 1, "size": 32, "seed": 1, "masks": True}
    d = tmp_path / "t"
    d.mkdir()
    (d / "task.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MEDSYNBENCH_DATA", str(tmp_path / "data"))
    out = tmp_path / "m.parquet"
    assert main(["data", "manifest", "--task", str(d), "--out", str(out)]) == 0
    m = read_manifest(out)
    lesion = m.df["label"] != "normal"
    assert lesion.any() and m.df.loc[lesion, "mask_path"].notna().all()
    assert m.df.loc[~lesion, "mask_path"].isna().all()
    raw["source"]["options"]["phantom"]["masks"] = "yes"
    (d / "task.yaml").write_text(yaml.safe_dump(raw))
    assert main(["data", "manifest", "--task", str(d), "--out", str(out)]) == 2
    assert "phantom.masks" in capsys.readouterr().err


def _user_seg(images: list[Path], pixels: np.ndarray, labels: list[str], kind: str, out: Path) -> Path:
    """A SEG as another tool would write it: highdicom, several segments, the given segmentation type."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in images]
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Mass,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for k, label in enumerate(labels)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=7,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="another tool",
        manufacturer_model_name="x",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(out)
    return out


@pytest.mark.parametrize("kind", ["LABELMAP", "BINARY"])
def test_users_multi_segment_seg_reads_as_label_maps(seg_export, tmp_path, kind):
    task = load_task(TASK)
    plan = next(p for p in (plan_patient(SEED, i) for i in range(10)) if p.label == "normal")
    folder = seg_export / f"PA{plan.index:06d}/ST000000/SE000000"
    images = sorted(folder.glob("*.dcm"))
    rng = np.random.default_rng(0)
    # Two classes (Title Case labels, as a person types them) on the first slice, one on the second, none on the
    # third: the third slice has no frame in the file and reads as empty.
    want = np.zeros((3, 48, 48), dtype=np.uint8)
    want[0, 5:15, 5:20], want[0, 30:40, 30:35], want[1, 20:30, 10:25] = 1, 2, 2
    want[1][rng.random((48, 48)) < 0.02] = 1
    if kind == "LABELMAP":
        pixels = want
    else:
        pixels = np.stack([want == 1, want == 2], axis=-1).astype(np.uint8)
    seg = _user_seg(images, pixels, ["Thymoma", "benign cyst"], kind, tmp_path / "user.dcm")
    spec = PreprocessSpec(size=48)  # no crop, no resize: the label map as stored
    for k, img in enumerate(images):
        got = load_mask(img, seg, spec, task.mask_classes)
        assert np.array_equal(got, want[k]), k
    assert task.label_from_mask(np.bincount(want[0].ravel(), minlength=6)[1:]) == "thymoma"


def test_overlapping_segments_of_two_classes_are_refused(seg_export, tmp_path):
    task = load_task(TASK)
    plan = next(p for p in (plan_patient(SEED, i) for i in range(10)) if p.label == "normal")
    images = sorted((seg_export / f"PA{plan.index:06d}/ST000000/SE000000").glob("*.dcm"))
    pixels = np.zeros((3, 48, 48, 2), dtype=np.uint8)
    pixels[0, 10:20, 10:20, 0] = 1
    pixels[0, 15:25, 15:25, 1] = 1
    seg = _user_seg(images, pixels, ["thymoma", "thymic carcinoma"], "BINARY", tmp_path / "overlap.dcm")
    with pytest.raises(BadInput) as e:
        load_mask(images[0], seg, PreprocessSpec(size=48), task.mask_classes)
    assert str(seg) in str(e.value) and "overlap (25 pixel(s)" in str(e.value)
