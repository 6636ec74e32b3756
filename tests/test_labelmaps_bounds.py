"""Bounded reading of label maps: limits checked from the zip directory and npy headers before anything expands."""

from __future__ import annotations

import contextlib
import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bench.errors import BadInput
from bench.labelmaps import FORMAT, load_labelmaps, save_labelmaps

BOMB_MAPS = 64  # 64 maps of 1024 x 1024: 64 MiB of zeros once inflated, about 64 KiB on disk


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _small_members(n: int) -> dict[str, bytes]:
    return {
        "format.npy": _npy(np.array(FORMAT)),
        "case_ids.npy": _npy(np.array([f"c{i}" for i in range(n)])),
        "num_classes.npy": _npy(np.array(3, dtype=np.int64)),
    }


def zip_bomb(path: Path) -> Path:
    """A valid label maps file whose `maps` member inflates about a thousandfold: all-background maps."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in _small_members(BOMB_MAPS).items():
            zf.writestr(name, data)
        with zf.open("maps.npy", "w") as f:
            f.write(_npy_header((BOMB_MAPS, 1024, 1024)))
            zeros = bytes(1024 * 1024)
            for _ in range(BOMB_MAPS):
                f.write(zeros)
    return path


def header_lie(path: Path, shape: tuple[int, ...]) -> Path:
    """A tiny file whose `maps` header claims `shape`, far more than the member holds."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in _small_members(2).items():
            zf.writestr(name, data)
        zf.writestr("maps.npy", _npy_header(shape) + bytes(16))
    return path


def _peak_mib(fn) -> float:
    tracemalloc.start()
    with contextlib.suppress(BadInput):
        fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def test_the_bomb_is_a_bomb_and_loads_whole_without_limits(tmp_path):
    path = zip_bomb(tmp_path / "bomb.npz")
    assert path.stat().st_size < 2**20  # under 1 MiB on disk ...
    maps = load_labelmaps(path)
    assert maps.maps.nbytes == BOMB_MAPS * 2**20  # ... 64 MiB in memory: the limits below have work to do
    assert _peak_mib(lambda: load_labelmaps(path)) > BOMB_MAPS


@pytest.mark.parametrize(
    "limits,msg",
    [
        (
            {"max_bytes": 2**20},
            r"declare 67,1\d\d,\d\d\d bytes uncompressed, over the limit of 1,048,576 .*max_bytes",
        ),
        ({"max_maps": 10}, r"64 maps declared, over the limit of 10 \(max_maps\)"),
        ({"max_map_pixels": 512 * 512}, r"1024 x 1024 = 1,048,576 pixels, over the limit of 262,144"),
    ],
)
def test_a_zip_bomb_is_refused_before_it_inflates(tmp_path, limits, msg):
    path = zip_bomb(tmp_path / "bomb.npz")
    with pytest.raises(BadInput, match=msg) as e:
        load_labelmaps(path, **limits)
    assert str(path) in str(e.value)
    assert _peak_mib(lambda: load_labelmaps(path, **limits)) < 2  # refused from headers: nothing expanded


def test_a_header_claiming_more_than_its_member_holds_is_refused_without_limits(tmp_path):
    # Without this check numpy would allocate the claimed terabyte before finding the data short.
    path = header_lie(tmp_path / "lie.npz", (1_000_000, 1024, 1024))
    with pytest.raises(
        BadInput, match=r"lie.npz: maps: header declares a uint8 array of shape \(1000000, 1024, 1024\)"
    ):
        load_labelmaps(path)


def test_files_within_the_limits_load_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 3, (5, 32, 32), dtype=np.uint8)
    path = save_labelmaps(tmp_path / "ok.npz", [f"c{i}" for i in range(5)], maps, num_classes=3)
    with zipfile.ZipFile(path) as zf:
        declared = sum(i.file_size for i in zf.infolist())
    back = load_labelmaps(path, max_bytes=declared, max_maps=5, max_map_pixels=32 * 32)
    assert np.array_equal(back.maps, maps)
    for limits in ({"max_bytes": declared - 1}, {"max_maps": 4}, {"max_map_pixels": 32 * 32 - 1}):
        with pytest.raises(BadInput, match="ok.npz"):
            load_labelmaps(path, **limits)
