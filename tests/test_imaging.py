"""Ingestion: readers checked against pydicom / Pillow and hand-worked windows; the cache's hit, key and atomicity."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import bench.imaging.cache as imaging
from bench.cli import main
from bench.errors import BadInput
from bench.imaging import (
    ImageCache,
    PreprocessSpec,
    UnknownCase,
    build_cache,
    check_readable,
    load_image,
    read_dicom_hu,
    window,
)
from bench.manifest import Manifest, read_manifest, write_manifest

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
# JPEG-LS Lossless: Pillow cannot decode it; only pylibjpeg-libjpeg, gdcm or pyjpegls can.
JPEG_LS = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
# pyjpegls (a highdicom dependency) is hidden from pydicom by `no_pyjpegls`; the other decoders cannot be.
HAS_JPEG_LS_DECODER = any(importlib.util.find_spec(m) for m in ("libjpeg", "gdcm"))


@pytest.fixture
def no_pyjpegls(monkeypatch):
    """pydicom as it is without pyjpegls, so the missing-decoder message can be tested where highdicom put it."""
    from pydicom.pixels import decoders

    for name in ("JPEGLSLosslessDecoder", "JPEGLSNearLosslessDecoder"):
        d = getattr(decoders, name)
        monkeypatch.setattr(d, "_available", {k: v for k, v in d._available.items() if k != "pyjpegls"})


def spec(size=8, channels=1, kind="uint8", center=None, width=None) -> PreprocessSpec:
    return PreprocessSpec(size=size, channels=channels, intensity=kind, center=center, width=width)


def write_ct(
    path: Path,
    stored: np.ndarray,
    *,
    slope=1.0,
    intercept=-1024.0,
    photometric="MONOCHROME2",
    frames: int = 1,
    drop_rescale: bool = False,
) -> Path:
    """A CT DICOM (CT_small's header) with the given stored values (int16 [H, W] or [F, H, W])."""
    ds = pydicom.dcmread(CT_SMALL)
    stored = np.asarray(stored, dtype=np.int16)
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.PhotometricInterpretation = photometric
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = stored.tobytes()
    if drop_rescale:
        del ds.RescaleSlope
        del ds.RescaleIntercept
    else:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------------- DICOM


def test_ct_small_gives_rescaled_pixels_exactly():
    ds = pydicom.dcmread(CT_SMALL)
    assert float(ds.RescaleIntercept) == -1024  # a non-trivial rescale, so the test can fail
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu = read_dicom_hu(CT_SMALL)
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, expected)


def test_rescale_slope_and_defaults(tmp_path):
    stored = np.arange(-8, 8, dtype=np.int16).reshape(4, 4) * 10
    hu = read_dicom_hu(write_ct(tmp_path / "a.dcm", stored, slope=2.5, intercept=-100))
    np.testing.assert_allclose(hu, stored * 2.5 - 100)
    raw = read_dicom_hu(write_ct(tmp_path / "b.dcm", stored, drop_rescale=True))
    np.testing.assert_array_equal(raw, stored.astype(np.float32))


def test_window_hand_worked():
    # center 40, width 400: [-160, 240] -> [0, 1]
    hu = np.array([-1000, -160, -60, 40, 140, 240, 3000], dtype=np.float32)
    np.testing.assert_allclose(window(hu, 40, 400), [0, 0, 0.25, 0.5, 0.75, 1, 1])


def test_dicom_window_to_uint8(tmp_path):
    # stored + intercept(-1024) = HU; HU 40 is mid-window -> 0.5 -> 128 (half rounds up); 140 -> 0.75 -> 191.25 -> 191
    hu = np.array([[-1000, -160, 40, 140], [240, 1000, -60, 40]], dtype=np.int16)
    p = write_ct(tmp_path / "w.dcm", np.tile(hu + 1024, (2, 1)))
    out = load_image(p, spec(size=4, kind="ct_window", center=40, width=400))
    assert out.shape == (1, 4, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :2], [[0, 0, 128, 191], [255, 255, 64, 128]])


def test_monochrome1_keeps_hu_and_inverts_display(tmp_path):
    stored = np.random.default_rng(0).integers(700, 1300, (16, 16))
    m2 = write_ct(tmp_path / "m2.dcm", stored)
    m1 = write_ct(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_dicom_hu(m1), read_dicom_hu(m2))  # HU are physical
    s = spec(size=16, kind="ct_window", center=0, width=400)
    a2, a1 = load_image(m2, s).astype(int), load_image(m1, s).astype(int)
    assert np.abs(a1 - (255 - a2)).max() <= 1  # 1 = rounding at exact halves
    hottest = np.unravel_index(np.argmax(stored), stored.shape)
    assert a2[0][hottest] == 255 and a1[0][hottest] == 0
    mm2, mm1 = load_image(m2, spec(size=16, kind="minmax")), load_image(m1, spec(size=16, kind="minmax"))
    assert np.abs(mm1.astype(int) - (255 - mm2.astype(int))).max() <= 1


def test_multiframe_uses_middle_frame(tmp_path):
    frames = np.stack([np.full((4, 4), v, dtype=np.int16) for v in (1000, 1100, 1200)])
    p = write_ct(tmp_path / "mf.dcm", frames, frames=3)
    np.testing.assert_array_equal(read_dicom_hu(p), np.full((4, 4), 1100 - 1024, dtype=np.float32))


@pytest.mark.skipif(HAS_JPEG_LS_DECODER, reason="a JPEG-LS decoder is installed")
def test_compressed_dicom_without_decoder_names_file_and_decoder(tmp_path, no_pyjpegls):
    with pytest.raises(BadInput) as e:
        read_dicom_hu(JPEG_LS)
    msg = str(e.value)
    assert str(JPEG_LS) in msg and "1.2.840.10008.1.2.4.80" in msg and "pylibjpeg-libjpeg" in msg
    assert "needs a decoder" in check_readable(JPEG_LS)
    with pytest.raises(BadInput, match="pip install pylibjpeg"):
        load_image(JPEG_LS, spec(kind="minmax"))


def test_color_dicom_is_not_hu():
    rgb = Path(get_testdata_file("SC_rgb_rle.dcm"))
    with pytest.raises(BadInput, match="colour"):
        read_dicom_hu(rgb)
    ref = pydicom.dcmread(rgb).pixel_array  # 8-bit RGB
    out = load_image(rgb, spec(size=ref.shape[0], channels=3))
    np.testing.assert_array_equal(out, np.moveaxis(ref, -1, 0))


# ---------------------------------------------------------------------------------------------------- PNG / JPEG / NPZ


def test_png_gray_rgb_and_16bit(tmp_path):
    g = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g.png", spec())[0], g)
    three = load_image(tmp_path / "g.png", spec(channels=3))
    assert three.shape == (3, 8, 8) and all((three[c] == g).all() for c in range(3))

    rgb = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_array_equal(
        load_image(tmp_path / "c.png", spec())[0], np.floor(luma + 0.5).astype(np.uint8)
    )
    np.testing.assert_array_equal(load_image(tmp_path / "c.png", spec(channels=3)), np.moveaxis(rgb, -1, 0))

    deep = np.array([[0, 65535], [32768, 257 * 100]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    np.testing.assert_array_equal(load_image(tmp_path / "d.png", spec(size=2))[0], [[0, 255], [128, 100]])


def test_jpeg_matches_pillow_decode(tmp_path):
    g = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.jpg", quality=90)
    ref = np.asarray(Image.open(tmp_path / "g.jpg"))
    np.testing.assert_array_equal(load_image(tmp_path / "g.jpg", spec(size=16))[0], ref)


def test_npz_rules(tmp_path):
    f = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    np.savez(tmp_path / "f.npz", image=f)
    np.testing.assert_array_equal(load_image(tmp_path / "f.npz", spec(size=4))[0], np.floor(f * 255 + 0.5))

    hu = np.array([[-160, 40], [240, 140]], dtype=np.float32)
    np.savez(tmp_path / "hu.npz", image=hu, units="HU")
    ct = spec(size=2, kind="ct_window", center=40, width=400)
    np.testing.assert_array_equal(load_image(tmp_path / "hu.npz", ct)[0], [[0, 128], [255, 191]])
    np.savez(tmp_path / "i16.npz", arr=hu.astype(np.int16))  # int16 means HU; a single unnamed array is used
    np.testing.assert_array_equal(load_image(tmp_path / "i16.npz", ct)[0], [[0, 128], [255, 191]])

    chw = np.zeros((3, 4, 4), dtype=np.uint8)
    chw[1] = 255
    np.savez(tmp_path / "chw.npz", image=chw)
    np.testing.assert_array_equal(load_image(tmp_path / "chw.npz", spec(size=4, channels=3)), chw)

    hwc = np.random.default_rng(4).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "hwc.npz", image=hwc)
    np.testing.assert_array_equal(
        load_image(tmp_path / "hwc.npz", spec(size=6, channels=3)), np.moveaxis(hwc, -1, 0)
    )
    np.savez(
        tmp_path / "mask.npz", image=np.array([[0, 1], [1, 3]], dtype=np.int64)
    )  # ints are not [0, 1] floats
    np.testing.assert_array_equal(load_image(tmp_path / "mask.npz", spec(size=2))[0], [[0, 85], [85, 255]])

    np.savez(tmp_path / "two.npz", a=f, b=f)
    with pytest.raises(BadInput, match=r"two\.npz.*'image'"):
        load_image(tmp_path / "two.npz", spec())
    np.savez(tmp_path / "nan.npz", image=np.full((4, 4), np.nan))
    with pytest.raises(BadInput, match=r"nan\.npz.*NaN"):
        load_image(tmp_path / "nan.npz", spec())


# ---------------------------------------------------------------------------------------------------- crop


def _crop_spec(crop_mm, size=4) -> PreprocessSpec:
    return PreprocessSpec(size=size, intensity="ct_window", center=0, width=1000, crop_mm=crop_mm)


def _ct_with_spacing(path: Path, stored: np.ndarray, spacing) -> Path:
    write_ct(path, stored, intercept=0.0)
    ds = pydicom.dcmread(path)
    if spacing is None:
        del ds.PixelSpacing
    else:
        ds.PixelSpacing = spacing
    ds.save_as(path, enforce_file_format=True)
    return path


def test_crop_keeps_the_centred_millimetres_of_each_axis(tmp_path):
    """12 x 8 pixels of 2 mm rows and 4 mm columns: a 16 mm crop keeps the central 8 rows and 4 columns."""
    hu = np.full((12, 8), -500, dtype=np.int16)
    hu[2:10, 2:6] = 500  # exactly the region a 16 mm crop keeps
    f = _ct_with_spacing(tmp_path / "a.dcm", hu, [2.0, 4.0])
    out = load_image(f, _crop_spec(16.0, size=4))
    assert out.shape == (1, 4, 4) and (out == 255).all()
    # Without the crop the -500 HU frame is resized in.
    assert (load_image(f, _crop_spec(None, size=4)) < 255).any()
    # A field of view smaller than the crop is used whole.
    np.testing.assert_array_equal(load_image(f, _crop_spec(500.0)), load_image(f, _crop_spec(None)))


def test_crop_hand_worked_odd_margin(tmp_path):
    """7 pixels of 1 mm, crop 3 mm: rows and columns 2..4 (the remainder of (7 - 3) / 2 goes to neither side)."""
    hu = np.arange(49, dtype=np.int16).reshape(7, 7) * 10
    f = _ct_with_spacing(tmp_path / "b.dcm", hu, [1.0, 1.0])
    got = load_image(f, PreprocessSpec(size=3, intensity="ct_window", center=250, width=500, crop_mm=3.0))[0]
    want = np.floor(np.clip(hu[2:5, 2:5] / 500.0, 0, 1) * 255 + 0.5)
    np.testing.assert_array_equal(got, want)


def test_crop_needs_a_usable_pixel_spacing(tmp_path):
    hu = np.zeros((8, 8), dtype=np.int16)
    none = _ct_with_spacing(tmp_path / "nospacing.dcm", hu, None)
    with pytest.raises(BadInput, match=r"nospacing\.dcm: the task crops 100 mm.*PixelSpacing.*has none"):
        load_image(none, _crop_spec(100.0))
    load_image(none, _crop_spec(None))  # no crop: no spacing needed
    np.savez(tmp_path / "three.npz", image=hu, units="HU", spacing=np.array([1.0, 1.0, 2.0]))
    with pytest.raises(
        BadInput, match=r"three\.npz: .*\[1\.0, 1\.0, 2\.0\] is not one or two positive numbers"
    ):
        load_image(tmp_path / "three.npz", _crop_spec(100.0))
    bad = _ct_with_spacing(tmp_path / "zero.dcm", hu, [0.0, 0.7])
    with pytest.raises(BadInput, match=r"zero\.dcm: the task crops 100 mm, but PixelSpacing \(0028,0030\)"):
        load_image(bad, _crop_spec(100.0))
    # Garbage in the header's bytes, as a broken exporter writes it: read as text, refused only under a crop.
    garbled = _ct_with_spacing(tmp_path / "garbled.dcm", hu, [1.5, 1.5])
    raw = garbled.read_bytes()
    assert raw.count(b"1.5\\1.5") == 1
    garbled.write_bytes(raw.replace(b"1.5\\1.5", b"abc\\def"))
    with pytest.raises(
        BadInput, match=r"garbled\.dcm: .*PixelSpacing \(0028,0030\) \['abc', 'def'\] is not numeric"
    ):
        load_image(garbled, _crop_spec(100.0))
    assert load_image(garbled, _crop_spec(None)).shape == (1, 4, 4)
    np.savez(tmp_path / "hu.npz", image=hu, units="HU")
    with pytest.raises(BadInput, match=r"hu\.npz: the task crops.*'spacing' array"):
        load_image(tmp_path / "hu.npz", _crop_spec(100.0))
    np.savez(tmp_path / "text.npz", image=hu, units="HU", spacing=np.array(["wide"]))
    with pytest.raises(
        BadInput, match=r"text\.npz: the task crops 100 mm, but array 'spacing' \['wide'\] is not numeric"
    ):
        load_image(tmp_path / "text.npz", _crop_spec(100.0))


def test_npz_spacing_and_display_images_under_a_crop(tmp_path):
    hu = np.full((10, 10), -500, dtype=np.float32)
    hu[3:7, 3:7] = 500
    np.savez(tmp_path / "sq.npz", image=hu, units="HU", spacing=np.array(2.5))  # one value: square pixels
    assert (load_image(tmp_path / "sq.npz", _crop_spec(10.0))[0] == 255).all()
    # A display image is what a generator wrote at the task's field of view: never cropped again.
    png = (np.indices((8, 8)).sum(0) * 16).astype(np.uint8)
    Image.fromarray(png).save(tmp_path / "g.png")
    s = PreprocessSpec(size=8, crop_mm=1.0)
    np.testing.assert_array_equal(load_image(tmp_path / "g.png", s)[0], png)


def test_crop_is_part_of_the_cache_key_and_validated():
    base = PreprocessSpec(size=8)
    assert "crop_mm" not in base.key()  # caches written before crops existed keep their keys
    assert PreprocessSpec(size=8, crop_mm=280.0).key() != base.key()
    for bad in (0.0, -5.0, float("nan")):
        with pytest.raises(BadInput, match="crop_mm"):
            PreprocessSpec(size=8, crop_mm=bad)


def test_resize_is_antialiased_and_keeps_constants(tmp_path):
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(checker).save(tmp_path / "ch.png")
    out = load_image(tmp_path / "ch.png", spec(size=16))
    assert out.shape == (1, 16, 16)
    assert np.abs(out.astype(int) - 128).max() <= 16  # nearest-neighbour would give only 0 or 255
    Image.fromarray(np.full((40, 30), 77, dtype=np.uint8)).save(tmp_path / "flat.png")
    assert (load_image(tmp_path / "flat.png", spec(size=24)) == 77).all()


def test_unreadable_reasons(tmp_path):
    (tmp_path / "t.png").write_text("hello")
    (tmp_path / "e.png").write_bytes(b"")
    png = tmp_path / "ok.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(png)
    (tmp_path / "trunc.png").write_bytes(png.read_bytes()[:40])
    assert check_readable(tmp_path / "nope.png") == "file not found"
    assert check_readable(tmp_path / "t.png") == "not a DICOM/PNG/JPEG/NPZ file"
    assert check_readable(tmp_path / "e.png") == "empty file"
    assert "corrupt PNG" in check_readable(tmp_path / "trunc.png")
    assert check_readable(png) is None and check_readable(CT_SMALL) is None
    with pytest.raises(BadInput, match=r"trunc\.png: corrupt PNG"):
        load_image(tmp_path / "trunc.png", spec())


def test_spec_from_task_and_key(tiny_task):
    s = PreprocessSpec.from_task(tiny_task)
    assert (s.size, s.channels, s.intensity) == (32, 1, "uint8")
    assert PreprocessSpec.from_task(tiny_task, "smoke").size == 16
    assert PreprocessSpec.from_task(tiny_task, 48).size == 48
    with pytest.raises(BadInput, match="gpu"):
        PreprocessSpec.from_task(tiny_task, "gpu")
    assert s.key() == PreprocessSpec.from_task(tiny_task).key()
    assert s.key() != PreprocessSpec.from_task(tiny_task, 48).key()


# ---------------------------------------------------------------------------------------------------- the cache


def tiny_cache_manifest(root: Path, n: int = 6, size: int = 12, **dicom_tags) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / f"im{i}.png")
        rows.append(
            dict(
                case_id=f"c{i}",
                patient_id=f"p{i}",
                image=f"im{i}.png",
                label="blank",
                site="s1",
                origin="real",
                split="train",
            )
        )
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_cache_matches_load_image_and_hits(tmp_path, tiny_task, monkeypatch):
    m = read_manifest(tiny_cache_manifest(tmp_path / "d"))
    cache = build_cache(m, tiny_task, size=8, cache_dir=tmp_path / "cache", progress=False)
    assert cache.images.shape == (6, 1, 8, 8) and isinstance(cache.images, np.memmap)
    assert cache.case_ids == [f"c{i}" for i in range(6)]
    s = PreprocessSpec.from_task(tiny_task, 8)
    for i in range(6):
        np.testing.assert_array_equal(cache.images[i], load_image(m.image_paths()[i], s))
    np.testing.assert_array_equal(cache.rows(["c4", "c1"]), [4, 1])

    def boom(*a, **k):
        raise AssertionError("decoded on a cache hit")

    monkeypatch.setattr(imaging, "load_image", boom)
    monkeypatch.setattr(imaging, "_load", boom)
    again = build_cache(m, tiny_task, size=8, cache_dir=tmp_path / "cache", progress=False)
    assert again.path == cache.path
    np.testing.assert_array_equal(again.images, cache.images)
    with pytest.raises(AssertionError, match="decoded"):
        build_cache(m, tiny_task, size=16, cache_dir=tmp_path / "cache", progress=False)  # new key: decodes


def test_cache_key_follows_size_manifest_and_files(tmp_path, tiny_task):
    mp = tiny_cache_manifest(tmp_path / "d")
    m = read_manifest(mp)
    kw = dict(cache_dir=tmp_path / "cache", progress=False)
    a = build_cache(m, tiny_task, size=8, **kw)
    b = build_cache(m, tiny_task, size=10, **kw)
    assert a.path != b.path and b.images.shape == (6, 1, 10, 10)
    m2 = Manifest(m.df.assign(label=["disc"] + list(m.df["label"][1:])), m.root, m.path)
    assert build_cache(m2, tiny_task, size=8, **kw).path != a.path
    Image.fromarray(np.full((12, 12), 9, dtype=np.uint8)).save(tmp_path / "d" / "im0.png")  # file replaced
    c = build_cache(read_manifest(mp), tiny_task, size=8, **kw)
    assert c.path != a.path and (c.images[0] == 9).all()


def test_cache_location_from_environment(tmp_path, tiny_task, monkeypatch):
    monkeypatch.setenv("MEDSYNBENCH_CACHE", str(tmp_path / "envcache"))
    cache = build_cache(read_manifest(tiny_cache_manifest(tmp_path / "d")), tiny_task, size=8, progress=False)
    assert cache.path.parent == tmp_path / "envcache"


def test_corrupt_files_error_or_skip(tmp_path, tiny_task, caplog):
    mp = tiny_cache_manifest(tmp_path / "d")
    (tmp_path / "d" / "im2.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "d" / "im4.png").unlink()
    m = read_manifest(mp)
    root = tmp_path / "cache"
    with pytest.raises(BadInput) as e:
        build_cache(m, tiny_task, size=8, cache_dir=root, progress=False)
    msg = str(e.value)
    assert str(mp) in msg and "im2.png: corrupt PNG" in msg and "im4.png: file not found" in msg
    assert list(root.iterdir()) == []  # nothing half-built left behind

    cache = build_cache(m, tiny_task, size=8, cache_dir=root, skip_corrupt=True, progress=False)
    assert cache.case_ids == ["c0", "c1", "c3", "c5"] and cache.images.shape[0] == 4
    assert [img for img, _ in cache.skipped] == ["im2.png", "im4.png"]
    assert "im2.png" in caplog.text and "im4.png" in caplog.text
    s = PreprocessSpec.from_task(tiny_task, 8)
    np.testing.assert_array_equal(
        cache.images[cache.rows(["c3"])[0]], load_image(tmp_path / "d" / "im3.png", s)
    )
    np.testing.assert_array_equal(cache.contains(["c1", "c2"]), [True, False])
    with pytest.raises(UnknownCase, match="c2") as e:
        cache.rows(["c1", "c2"])
    assert isinstance(e.value, KeyError) and isinstance(e.value, BadInput)
    with pytest.raises(BadInput, match="im2.png"):  # the cached entry still refuses a strict caller
        build_cache(m, tiny_task, size=8, cache_dir=root, progress=False)


def test_failed_build_leaves_no_cache(tmp_path, tiny_task, monkeypatch):
    m = read_manifest(tiny_cache_manifest(tmp_path / "d"))
    real = imaging.load_image
    calls = []

    def crash_on_fourth(path, s):
        calls.append(path)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return real(path, s)

    monkeypatch.setattr(imaging, "load_image", crash_on_fourth)
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_cache(m, tiny_task, size=8, cache_dir=root, progress=False)
    assert list(root.iterdir()) == []
    monkeypatch.setattr(imaging, "load_image", real)
    assert len(build_cache(m, tiny_task, size=8, cache_dir=root, progress=False)) == 6


def test_damaged_cache_is_rebuilt(tmp_path, tiny_task):
    m = read_manifest(tiny_cache_manifest(tmp_path / "d"))
    kw = dict(size=8, cache_dir=tmp_path / "cache", progress=False)
    first = build_cache(m, tiny_task, **kw)
    expected = np.array(first.images)
    path = first.path
    del first
    (path / "images.npy").write_bytes(b"\x93NUMPY garbage")
    again = build_cache(m, tiny_task, **kw)
    assert again.path == path
    np.testing.assert_array_equal(again.images, expected)


def test_another_builder_wins_the_rename(tmp_path, tiny_task, monkeypatch):
    m = read_manifest(tiny_cache_manifest(tmp_path / "d"))
    kw = dict(size=8, cache_dir=tmp_path / "cache", progress=False)
    ref = build_cache(m, tiny_task, **kw)
    winner = tmp_path / "winner"
    shutil.copytree(ref.path, winner)
    shutil.rmtree(ref.path)
    real_replace = imaging.os.replace

    def racing_replace(src, dst):
        if Path(dst) == ref.path:  # the other builder renames first
            shutil.copytree(winner, dst)
        return real_replace(src, dst)

    monkeypatch.setattr(imaging.os, "replace", racing_replace)
    got = build_cache(m, tiny_task, **kw)
    assert got.path == ref.path and len(got) == 6
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [ref.path.name]


def test_cache_holds_no_dicom_header_values(tmp_path, tiny_task):
    d = tmp_path / "d"
    d.mkdir()
    rows = []
    for i in range(3):
        p = write_ct(d / f"ct{i}.dcm", np.full((8, 8), 1000 + 50 * i))
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientID, ds.InstitutionName = "Doe^Jane", "MRN-7731942", "St Elsewhere"
        ds.save_as(p)
        rows.append(
            dict(
                case_id=f"h{i}",
                patient_id=f"p{i}",
                image=f"ct{i}.dcm",
                label="blank",
                site="s1",
                origin="real",
                split="train",
            )
        )
    mp = d / "m.csv"
    pd.DataFrame(rows).to_csv(mp, index=False)
    cache = build_cache(read_manifest(mp), tiny_task, size=8, cache_dir=tmp_path / "cache", progress=False)
    blob = b"".join(f.read_bytes() for f in cache.path.rglob("*") if f.is_file())
    for value in (b"Doe", b"MRN-7731942", b"Elsewhere", b"1CT1"):
        assert value not in blob
    assert sorted(f.name for f in cache.path.iterdir()) == ["images.npy", "index.json"]


def test_parallel_build_equals_serial(tmp_path, tiny_task, monkeypatch):
    n = 40
    d = tmp_path / "d"
    d.mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append(
            dict(
                case_id=f"c{i}",
                patient_id=f"p{i}",
                image=f"{i}.png",
                label="bar",
                site="s2",
                origin="real",
                split="train",
            )
        )
    (d / "17.png").write_bytes(b"junk")
    mp = d / "m.csv"
    pd.DataFrame(rows).to_csv(mp, index=False)
    m = read_manifest(mp)
    pools = []

    class CountingPool(imaging.cf.ProcessPoolExecutor):
        def __init__(self, *a, **k):
            pools.append(a)
            super().__init__(*a, **k)

    monkeypatch.setattr(imaging, "_PARALLEL_MIN_S", 0.0)
    monkeypatch.setattr(imaging.cf, "ProcessPoolExecutor", CountingPool)
    par = build_cache(
        m, tiny_task, size=8, cache_dir=tmp_path / "a", skip_corrupt=True, progress=False, workers=2
    )
    assert len(pools) == 1
    ser = build_cache(
        m, tiny_task, size=8, cache_dir=tmp_path / "b", skip_corrupt=True, progress=False, workers=1
    )
    assert len(pools) == 1  # workers=1 decodes in-process
    assert par.case_ids == ser.case_ids and len(par) == n - 1
    assert par.skipped == ser.skipped == [("17.png", "not a DICOM/PNG/JPEG/NPZ file")]
    np.testing.assert_array_equal(par.images, ser.images)


def test_cache_reopens_from_disk(tmp_path, tiny_task):
    m = read_manifest(tiny_cache_manifest(tmp_path / "d"))
    c = build_cache(m, tiny_task, size=8, cache_dir=tmp_path / "cache", progress=False)
    again = ImageCache(c.path)
    assert again.case_ids == c.case_ids and again.spec == c.spec
    assert again.load().flags["C_CONTIGUOUS"] and not isinstance(again.load(), np.memmap)


# ---------------------------------------------------------------------------------------------------- the CLI


@pytest.mark.skipif(HAS_JPEG_LS_DECODER, reason="a JPEG-LS decoder is installed")
def test_validate_cli_names_undecodable_and_corrupt_images(
    tiny_manifest, tiny_task_path, capsys, no_pyjpegls
):
    m = read_manifest(tiny_manifest)
    df = m.df.copy()
    shutil.copy(JPEG_LS, m.root / "images" / "jls.dcm")
    (m.root / "images" / "junk.dcm").write_bytes(b"\x00" * 200)
    df.loc[3, "image"] = "images/jls.dcm"
    df.loc[8, "image"] = "images/junk.dcm"
    bad = tiny_manifest.with_name("bad.parquet")
    write_manifest(df, bad)
    before = sorted(p.name for p in bad.parent.iterdir())
    assert main(["data", "validate", str(bad), "--task", str(tiny_task_path)]) == 2
    err = capsys.readouterr().err
    assert "row 3: image 'images/jls.dcm': compressed transfer syntax 1.2.840.10008.1.2.4.80" in err
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in err
    assert "row 8: image 'images/junk.dcm': not a DICOM/PNG/JPEG/NPZ file" in err
    assert sorted(p.name for p in bad.parent.iterdir()) == before


# ---------------------------------------------------------------------------------------------------- batches


def test_cached_loader_batches_follow_rows_and_labels():
    import torch

    from bench.imaging import CachedLoader

    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 2, 2), dtype=np.uint8) * 20
    rows = np.array([7, 2, 9, 0, 5])
    labels = rows * 10  # a label that names its row
    plain = CachedLoader(images, rows, labels, batch_size=2)
    got = list(plain)
    assert len(plain) == 3 and [x.shape[0] for x, _ in got] == [2, 2, 1]
    x = torch.cat([b[0] for b in got])
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), images[rows] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(torch.cat([b[1] for b in got]).numpy(), labels)

    def epoch(loader):
        xs, ys = zip(*loader, strict=True)
        return torch.cat(xs)[:, 0, 0, 0].mul(255).round().div(20).long().numpy(), torch.cat(ys).numpy()

    a, b = (
        CachedLoader(images, rows, labels, batch_size=2, shuffle=True, seed=3),
        CachedLoader(images, rows, labels, batch_size=2, shuffle=True, seed=3),
    )
    ids1, y1 = epoch(a)
    assert sorted(ids1) == sorted(rows) and (y1 == ids1 * 10).all()  # every row once, label with its image
    np.testing.assert_array_equal(ids1, epoch(b)[0])  # same seed, same order
    orders = {tuple(epoch(a)[0]) for _ in range(4)}
    assert len(orders) > 1  # reshuffled each epoch
    assert len(CachedLoader(images, rows, batch_size=2, drop_last=True)) == 2


def test_run_cli_on_corrupt_image_exits_2_and_leaves_no_cache(
    tiny_manifest, tiny_task_path, tmp_path, capsys
):
    m = read_manifest(tiny_manifest)
    culprit = m.df.loc[3, "image"]
    (m.root / culprit).write_bytes(b"garbage")
    cache = tmp_path / "cache"
    args = [
        "run",
        "--task",
        str(tiny_task_path),
        "--real",
        str(tiny_manifest),
        "--out",
        str(tmp_path / "run"),
        "--regimes",
        "real",
        "--preset",
        "smoke",
        "--cache-dir",
        str(cache),
        "--quiet",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{culprit}: not a DICOM/PNG/JPEG/NPZ file" in err and "--skip-corrupt" in err
    assert not cache.exists() or list(cache.iterdir()) == []


def test_cache_refuses_duplicate_case_ids(tmp_path, tiny_task):
    m = read_manifest(tiny_cache_manifest(tmp_path / "d"))
    dup = Manifest(m.df.assign(case_id=["c0", "c1", "c1", "c3", "c4", "c5"]), m.root, m.path)
    with pytest.raises(BadInput, match=r"duplicate case_id\(s\) \['c1'\] \(rows \[1, 2\]\)"):
        build_cache(dup, tiny_task, size=8, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()
