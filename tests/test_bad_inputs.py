"""Bad inputs as users make them: each is exit 2 naming the file (and row or field), and nothing written is lost."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.cli import disk_error_message, main
from bench.errors import BadInput
from bench.io import atomic_dir, read_json, write_json
from tests.conftest import draw_shape

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def folder_data(tmp_path, tiny_task) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rows = []
    for p in range(16):
        label = tiny_task.classes[p % 3]
        rel = f"img/p{p}.png"
        Image.fromarray(draw_shape(label, rng, size=16)).save(root / rel)
        rows.append(
            {"image": rel, "patient_id": f"p{p}", "label": label, "site": ["s1", "s2", "s3", "x1"][p % 4]}
        )
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def _manifest(task_path: Path, root: Path, out: Path) -> int:
    return main(["data", "manifest", "--task", str(task_path), "--root", str(root), "--out", str(out)])


def test_header_only_manifest_fails_validation(tmp_path, tiny_task_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("case_id,patient_id,image,label,site,split,origin,generator\n")
    assert main(["data", "validate", str(path), "--task", str(tiny_task_path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "no rows" in err


def test_full_disk_exit_2_names_the_file_and_keeps_the_old_one(
    tmp_path, tiny_task_path, folder_data, capsys, monkeypatch
):
    out = tmp_path / "m.parquet"
    assert _manifest(tiny_task_path, folder_data, out) == 0
    before = out.read_bytes()

    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    assert _manifest(tiny_task_path, folder_data, out) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and str(out.parent) in err and "Traceback" not in err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "m.parquet", "tasks"]  # no temporary left


def test_output_under_a_file_exit_2(tmp_path, tiny_task_path, folder_data, capsys):
    blocker = tmp_path / "notafolder"
    blocker.write_text("a file")
    assert _manifest(tiny_task_path, folder_data, blocker / "m.parquet") == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "Traceback" not in err
    assert blocker.read_text() == "a file"


@pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")
def test_read_only_output_folder_exit_2(tmp_path, tiny_task_path, folder_data, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _manifest(tiny_task_path, folder_data, ro / "m.parquet") == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err
    assert str(ro) in err and "permission denied" in err


def test_disk_error_messages():
    msg = disk_error_message(OSError(errno.EROFS, "Read-only file system", "/mnt/out/x.json"))
    assert msg.startswith("/mnt/out/x.json: read-only file system") and "left as they were" in msg
    assert "quota" in disk_error_message(OSError(errno.EDQUOT, "Disk quota exceeded", "/q"))
    assert disk_error_message(OSError(errno.EACCES, "Permission denied", "/a", None, "/b")).startswith(
        "/a -> /b"
    )
    # Anything else is ours: no message, the command line prints the traceback and exits 1.
    assert disk_error_message(OSError(errno.EBADF, "Bad file descriptor")) is None


def test_atomic_dir_keeps_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the new folder into place
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (
        sorted(p.name for p in target.iterdir()) == ["old.txt"] and (target / "old.txt").read_text() == "old"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_json_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        write_json(path, {"a": 2})
    assert read_json(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_read_json_bad_bytes_or_syntax_is_bad_input_and_value_error(tmp_path):
    p = tmp_path / "matrix.json"
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(BadInput, match=r"matrix.json: not UTF-8 text \(byte 7"):
        read_json(p)
    p.write_text('{"a": 1,}')
    with pytest.raises(ValueError, match=r"matrix.json: not valid JSON \(line 1, column 9"):
        read_json(p)


def test_folder_mapping_file_not_utf8(tmp_path, tiny_task_path, folder_data, capsys):
    (folder_data / "map.yaml").write_bytes(b"site: h\xf4pital\n")
    out = tmp_path / "m.parquet"
    args = ["data", "manifest", "--task", str(tiny_task_path), "--root", str(folder_data), "--out", str(out)]
    assert main([*args, "--option", "mapping=map.yaml"]) == 2
    err = capsys.readouterr().err
    assert "map.yaml" in err and "not UTF-8" in err and "line 1" in err and not out.exists()


def test_folder_csv_not_utf8(tmp_path, tiny_task_path, folder_data, capsys):
    csv = folder_data / "labels.csv"
    csv.write_bytes(csv.read_bytes().replace(b"p1,", b"p\xe91,", 1))
    out = tmp_path / "m.parquet"
    assert _manifest(tiny_task_path, folder_data, out) == 2
    err = capsys.readouterr().err
    assert "labels.csv" in err and "utf-8" in err.lower() and not out.exists()


def test_ct_without_pixel_spacing_under_a_cropping_task_exit_2_names_the_file(tmp_path, capsys):
    """The mediastinal task crops 280 mm, which needs each series' PixelSpacing: a file without it stops the image
    cache with exit 2 naming the file and the field, and the generator's output folder is never made."""
    import pydicom

    from bench.phantom import write_phantom

    root = tmp_path / "export"
    write_phantom(root, patients=120, slices=2, size=32, seed=0, workers=1)
    real = tmp_path / "real.parquet"
    args = ["data", "manifest", "--task", "mediastinal-neoplasm", "--root", str(root), "--out", str(real)]
    assert main(args) == 0
    from bench.manifest import read_manifest

    m = read_manifest(real)
    victim = m.image_paths()[int(np.flatnonzero((m.df["split"] == "train").to_numpy())[0])]
    ds = pydicom.dcmread(victim)
    del ds.PixelSpacing
    ds.save_as(victim, enforce_file_format=True)
    capsys.readouterr()
    out = tmp_path / "copycat"
    gen = ["generate", "--task", "mediastinal-neoplasm", "--generator", "copycat", "--real", str(real)]
    assert main([*gen, "--out", str(out), "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert str(victim.relative_to(root)) in err and "PixelSpacing" in err and "crops 280 mm" in err, err
    assert not out.exists()
