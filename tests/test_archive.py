"""Run bundles: safe archives submit like folders; unsafe ones are rejected before anything is unpacked."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from test_leaderboard_support import make_board, make_run, snapshot

from bench.cli import main
from bench.errors import BadInput
from bench.leaderboard.archive import extract_archive, inspect_archive

SMALL = {"regimes": ["real", "synthetic"], "seeds": [0]}


class _Trap:
    """Unpickling this creates `path`: a checkpoint in a bundle must never be loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def small_run(tmp_path) -> Path:
    return make_run(tmp_path / "run", {"good": 2.0}, **SMALL)


@pytest.fixture
def board(tmp_path) -> Path:
    return make_board(tmp_path / "board", protocol={**SMALL, "backbone": "resnet18"})


def _zip_dir(src: Path, dest: Path, prefix: str = "myrun/", extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + str(p.relative_to(src)))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return dest


def _tar_dir(src: Path, dest: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname="myrun")
        for info, data in extra:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest


def _tmp_leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("medsynbench-submit-*")}


def test_zip_and_tar_bundles_submit_like_folders(small_run, board, tmp_path):
    sentinel = tmp_path / "unpickled"
    ckpt = pickle.dumps(_Trap(str(sentinel)))
    z = _zip_dir(
        small_run, tmp_path / "run.zip", extra={"myrun/good__synthetic__resnet18__seed0/checkpoint.pt": ckpt}
    )
    assert main(["submit", str(z), "--leaderboard", str(board), "--generator", "good"]) == 0
    assert not sentinel.exists()
    t = _tar_dir(small_run, tmp_path / "run.tar.gz")
    board2 = make_board(tmp_path / "board2", protocol={**SMALL, "backbone": "resnet18"})
    assert main(["submit", str(t), "--leaderboard", str(board2)]) == 0
    r1 = sorted(
        json.loads(p.read_text())["predictions"]["submitted_sha256"]
        for p in (board / "records").glob("*.json")
    )
    r2 = sorted(
        json.loads(p.read_text())["predictions"]["submitted_sha256"]
        for p in (board2 / "records").glob("*.json")
    )
    assert r1 == r2  # the same predictions, whichever way they arrived


def test_checkpoints_are_not_unpacked(tmp_path):
    sentinel = tmp_path / "unpickled"
    z = tmp_path / "b.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("run/a/checkpoint.pt", pickle.dumps(_Trap(str(sentinel))))
        zf.writestr("run/a/model.pkl", pickle.dumps(_Trap(str(sentinel))))
        zf.writestr("run/matrix.json", "{}")
    out = tmp_path / "out"
    out.mkdir()
    assert extract_archive(z, out, 10_000) == ["run/matrix.json"]
    assert not (out / "run/a/checkpoint.pt").exists() and not sentinel.exists()


def _zip_with(tmp_path: Path, name: str, data: bytes = b"x", mode: int | None = None) -> Path:
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("run/matrix.json", "{}")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return z


def _tar_with(tmp_path: Path, info: tarfile.TarInfo, data: bytes | None = None) -> Path:
    t = tmp_path / "bad.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        ok = tarfile.TarInfo("run/matrix.json")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"{}"))
        if data is not None:
            info.size = len(data)
        tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return t


def _ti(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type = kind
    i.linkname = linkname
    return i


UNSAFE = {
    "zip absolute path": (lambda t: _zip_with(t, "/etc/cron.d/x"), ["'/etc/cron.d/x'", "absolute path"]),
    "zip dot-dot": (lambda t: _zip_with(t, "run/../../escape.txt"), ["'run/../../escape.txt'", "'..'"]),
    "zip symlink": (
        lambda t: _zip_with(t, "run/link", b"/etc/passwd", 0o120777),
        ["'run/link'", "symbolic link"],
    ),
    "zip fifo": (lambda t: _zip_with(t, "run/pipe", b"", 0o010644), ["'run/pipe'", "special file"]),
    "tar absolute path": (
        lambda t: _tar_with(t, tarfile.TarInfo("/tmp/abs.txt"), b"x"),
        ["'/tmp/abs.txt'", "absolute"],
    ),
    "tar dot-dot": (lambda t: _tar_with(t, tarfile.TarInfo("../up.txt"), b"x"), ["'../up.txt'", "'..'"]),
    "tar symlink": (
        lambda t: _tar_with(t, _ti("run/s", tarfile.SYMTYPE, "/etc/passwd")),
        ["'run/s'", "symbolic link"],
    ),
    "tar hardlink": (
        lambda t: _tar_with(t, _ti("run/h", tarfile.LNKTYPE, "run/matrix.json")),
        ["'run/h'", "hard link"],
    ),
    "tar device": (lambda t: _tar_with(t, _ti("run/dev", tarfile.CHRTYPE)), ["'run/dev'", "device"]),
    "tar fifo": (lambda t: _tar_with(t, _ti("run/fifo", tarfile.FIFOTYPE)), ["'run/fifo'", "FIFO"]),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_rejected_before_extraction(case, tmp_path, board, capsys):
    make, expect = UNSAFE[case]
    archive = make(tmp_path)
    before, tmp_before = snapshot(board), _tmp_leftovers()
    rc = main(["submit", str(archive), "--leaderboard", str(board)])
    err = capsys.readouterr().err
    assert rc == 2, err
    for text in [archive.name, *expect]:
        assert text in err
    assert "nothing was unpacked" in err
    assert snapshot(board) == before
    assert _tmp_leftovers() == tmp_before
    with pytest.raises(BadInput):
        inspect_archive(archive, 10**9)
    assert not (tmp_path.parent / "escape.txt").exists() and not Path("/tmp/abs.txt").exists()


def test_size_limit(small_run, board, tmp_path, capsys):
    z = _zip_dir(small_run, tmp_path / "run.zip")
    before = snapshot(board)
    assert main(["submit", str(z), "--leaderboard", str(board), "--max-archive-bytes", "1000"]) == 2
    err = capsys.readouterr().err
    assert "more than the limit of 1,000 bytes" in err
    assert snapshot(board) == before
    # The leaderboard's own limit applies without the option.
    board2 = make_board(
        tmp_path / "board2", protocol={**SMALL, "backbone": "resnet18"}, max_archive_bytes=2048
    )
    assert main(["submit", str(z), "--leaderboard", str(board2)]) == 2
    assert "limit of 2,048 bytes" in capsys.readouterr().err


def test_bomb_whose_data_outgrows_its_header(tmp_path):
    """A zip member that inflates past its declared size is stopped while copying."""
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("run/big.bin.txt", b"\0" * 200_000)
    raw = bytearray(z.read_bytes())
    # Patch the declared uncompressed size (central directory) down to 100 bytes.
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24 : cd + 28] = (100).to_bytes(4, "little")
    lh = raw.find(b"PK\x03\x04")
    raw[lh + 22 : lh + 26] = (100).to_bytes(4, "little")
    z.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BadInput, match="bomb.zip"):
        extract_archive(z, out, 10_000)


def test_not_an_archive(tmp_path, board, capsys):
    bad = tmp_path / "run.zip"
    bad.write_bytes(b"not a zip")
    assert main(["submit", str(bad), "--leaderboard", str(board)]) == 2
    assert "run.zip: not a readable zip archive" in capsys.readouterr().err
    other = tmp_path / "run.rar"
    other.write_bytes(b"x")
    assert main(["submit", str(other), "--leaderboard", str(board)]) == 2
    assert "not a run folder, .zip or .tar.gz bundle" in capsys.readouterr().err


def test_problems_inside_a_bundle_name_the_bundle_member(small_run, board, tmp_path, capsys):
    (small_run / "privacy/good/privacy.json").unlink()
    t = _tar_dir(small_run, tmp_path / "run.tar.gz")
    before = snapshot(board)
    assert main(["submit", str(t), "--leaderboard", str(board)]) == 2
    err = capsys.readouterr().err
    assert f"{t}!privacy/good/privacy.json" in err
    assert snapshot(board) == before
