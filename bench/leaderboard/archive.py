"""Safe unpacking of submitted run bundles (.zip, .tar.gz / .tgz).

Every member is inspected before anything is written: absolute paths, `..` components, symbolic and hard links,
device files and FIFOs are rejected, and so is a bundle whose files add up to more than the limit. Files the
benchmark never reads and that could carry pickled code (torch checkpoints, pickles) are skipped, not unpacked:
nothing from a bundle is ever unpickled.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bench.errors import BadInput
from bench.runfolder import MATRIX_FILE

# Never unpacked: formats that deserialize with pickle. They are still inspected (a link named `x.pt` is rejected).
SKIPPED_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".bin", ".safetensors")
MAX_MEMBERS = 100_000
_COPY_CHUNK = 1 << 20


@dataclass
class _Member:
    name: str
    size: int
    kind: str  # "file" | "dir" | a reason for rejection


def is_archive(path: str | Path) -> bool:
    n = Path(path).name.lower()
    return n.endswith((".zip", ".tar.gz", ".tgz"))


def _check_name(name: str) -> str | None:
    if not name:
        return "empty member name"
    if "\x00" in name:
        return "NUL byte in member name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "'..' in path"
    return None


def _skipped(name: str) -> bool:
    return name.lower().endswith(SKIPPED_SUFFIXES)


# What zipfile can inflate; another method (or an encrypted member) would only fail once a worker unpacks it.
_ZIP_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_TAR_BLOCK = 512


class _Stop(Exception):
    """Raised while reading an archive's index: past a limit, nothing more is read."""


class _Inflated(io.RawIOBase):
    """A gzip stream that stops after `cap` inflated bytes, headers and padding included: a few compressed kB can
    hold gigabytes of zeros or long-name headers, and tarfile would otherwise read them all."""

    def __init__(self, path: Path, cap: int) -> None:
        self._gz = gzip.open(path, "rb")  # noqa: SIM115 - closed by close(), this object is the context
        self.cap, self.read_bytes = cap, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - a writable buffer
        n = self._gz.readinto(b)
        self.read_bytes += n
        if self.read_bytes > self.cap:
            raise _Stop(f"inflates to more than {self.cap:,} bytes (reading stopped there)")
        return n

    def close(self) -> None:
        self._gz.close()
        super().close()


def _inflate_cap(max_bytes: int) -> int:
    # Room for checkpoints (not counted in max_bytes, still read past), tar headers and padding.
    return 2 * max_bytes + (64 << 20)


@contextlib.contextmanager
def _open_tar(path: Path, max_inflated: int) -> Iterator[tarfile.TarFile]:
    with _Inflated(path, max_inflated) as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
        yield tf


def _zip_entry_count(path: Path) -> int | None:
    """The member count the zip's end record declares, read before zipfile loads the central directory."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
        at = tail.rfind(_EOCD)
        if at < 0 or len(tail) < at + 22:
            return None  # zipfile says what is wrong with it
        count = int.from_bytes(tail[at + 10 : at + 12], "little")
        loc = at - 20
        if count == 0xFFFF and loc >= 0 and tail[loc : loc + 4] == _EOCD64_LOCATOR:
            f.seek(int.from_bytes(tail[loc + 8 : loc + 16], "little"))
            rec = f.read(56)
            if len(rec) == 56:
                count = int.from_bytes(rec[32:40], "little")
    return count


def _zip_members(zf: zipfile.ZipFile) -> list[_Member]:
    out = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if info.is_dir() or (mode and stat.S_ISDIR(mode)):
            kind = "dir"
        elif mode and stat.S_ISLNK(mode):
            kind = "symbolic link"
        elif mode and not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            kind = "special file (device, FIFO or socket)"
        elif info.flag_bits & 0x1:
            kind = "encrypted (send the bundle without a password)"
        elif info.compress_type not in _ZIP_METHODS:
            kind = f"compression method {info.compress_type} (use one of {', '.join(_ZIP_METHODS.values())})"
        else:
            kind = "file"
        out.append(_Member(info.filename, info.file_size, kind))
    return out


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.isdir():
        return "dir"
    if m.issym():
        return "symbolic link"
    if m.islnk():
        return "hard link"
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        return "special file (device or FIFO)"
    if m.isreg():
        return "file"
    return f"unsupported member type {m.type!r}"


def _tar_stream(tf: tarfile.TarFile, max_members: int, max_bytes: int) -> Iterator[tarfile.TarInfo]:
    """Members of a tar read as a stream, stopped as soon as it has too many members or inflates too far.

    In stream mode tarfile still keeps every header it has read; dropping them keeps memory flat however many
    headers a few compressed kB hold, and the limits act while the gzip stream is inflated, not after.
    """
    n = 0
    declared = 0
    while (m := tf.next()) is not None:
        n += 1
        if n > max_members:
            raise _Stop(f"more than {max_members:,} members (counting stopped there)")
        if m.isreg() and not _skipped(m.name):
            declared += m.size
        if declared > max_bytes:
            raise _Stop(f"unpacks to more than the limit of {max_bytes:,} bytes (reading stopped there)")
        yield m
        tf.members.clear()


def _tar_members(tf: tarfile.TarFile, max_members: int, max_bytes: int) -> list[_Member]:
    return [_Member(m.name, m.size, _tar_kind(m)) for m in _tar_stream(tf, max_members, max_bytes)]


def inspect_archive(
    path: Path, max_bytes: int, max_members: int = MAX_MEMBERS, max_inflated: int | None = None
) -> list[_Member]:
    """List members; raise BadInput naming every unsafe member (and the size overrun) before any extraction.

    Bounded before anything expands: a zip's member count is read from its end record before its index is
    loaded; a tar.gz is read as a stream, its members counted and the inflated bytes capped while it is read.
    """
    name = path.name.lower()
    kind = "zip" if name.endswith(".zip") else "tar.gz"
    try:
        if kind == "zip":
            count = _zip_entry_count(path)
            if count is not None and count > max_members:
                raise _Stop(f"{count:,} members (more than {max_members:,})")
            with zipfile.ZipFile(path) as zf:
                members = _zip_members(zf)
        else:
            with _open_tar(path, max_inflated or _inflate_cap(max_bytes)) as tf:
                members = _tar_members(tf, max_members, max_bytes)
    except _Stop as e:
        raise BadInput(f"{path}: unsafe or oversized archive, nothing was unpacked", [str(e)]) from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise BadInput(f"{path}: not a readable {kind} archive: {e}") from e
    problems = []
    if len(members) > max_members:
        problems.append(f"{len(members)} members (more than {max_members})")
    for m in members:
        bad = _check_name(m.name)
        if bad:
            problems.append(f"member {m.name!r}: {bad}")
        if m.kind not in ("file", "dir"):
            problems.append(f"member {m.name!r}: {m.kind} (links and special files are not accepted)")
    total = sum(m.size for m in members if m.kind == "file" and not _skipped(m.name))
    if total > max_bytes:
        problems.append(
            f"unpacks to {total:,} bytes, more than the limit of {max_bytes:,} bytes "
            f"(checkpoints {', '.join(SKIPPED_SUFFIXES[:3])} are not counted; leave out other large files)"
        )
    if problems:
        raise BadInput(f"{path}: unsafe or oversized archive, nothing was unpacked", problems)
    return members


def _copy_limited(src, dst: Path, declared: int, budget: list[int], member: str, archive: Path) -> None:
    """Copy at most `declared` bytes: a member whose data outgrows its header is a bomb, not a submission."""
    written = 0
    with open(dst, "wb") as out:
        while block := src.read(_COPY_CHUNK):
            written += len(block)
            budget[0] -= len(block)
            if written > declared or budget[0] < 0:
                raise BadInput(f"{archive}: member {member!r} holds more data than its header declares")
            out.write(block)


def extract_archive(path: str | Path, dest: str | Path, max_bytes: int) -> list[str]:
    """Unpack the regular files of a checked archive into `dest`; returns the names written."""
    path, dest = Path(path), Path(dest).resolve()
    members = inspect_archive(path, max_bytes)
    wanted = {m.name for m in members if m.kind == "file" and not _skipped(m.name)}
    budget = [max_bytes]
    written = []

    def target(name: str) -> Path:
        t = (dest / name.replace("\\", "/")).resolve()
        if dest not in t.parents:  # belt and braces after the name checks
            raise BadInput(f"{path}: member {name!r} would land outside the unpack folder")
        return t

    try:
        _extract(path, dest, wanted, budget, written, target)
    except (zipfile.BadZipFile, gzip.BadGzipFile, tarfile.TarError, EOFError, zlib.error, _Stop) as e:
        raise BadInput(f"{path}: damaged archive, unpacking stopped: {e}") from e
    return written


def _extract(path: Path, dest: Path, wanted: set[str], budget: list[int], written: list[str], target) -> None:
    if path.name.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename not in wanted:
                    continue
                t = target(info.filename)
                t.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src:
                    _copy_limited(src, t, info.file_size, budget, info.filename, path)
                written.append(info.filename)
    else:
        with _open_tar(path, _inflate_cap(budget[0])) as tf:
            for m in _tar_stream(tf, MAX_MEMBERS, budget[0]):
                if m.name not in wanted or not m.isreg():
                    continue
                t = target(m.name)
                t.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                if src is None:
                    continue
                with src:
                    _copy_limited(src, t, m.size, budget, m.name, path)
                written.append(m.name)


def find_run_root(folder: Path, marker: str = MATRIX_FILE) -> Path:
    """The run folder inside an unpacked bundle: the top level or its single sub-folder."""
    if (folder / marker).is_file():
        return folder
    subs = [d for d in folder.iterdir() if d.is_dir()]
    hits = [d for d in subs if (d / marker).is_file()]
    if len(hits) == 1:
        return hits[0]
    raise BadInput(f"{folder}: no run folder found (a run folder holds {marker})")


@contextlib.contextmanager
def opened_run(path: str | Path, max_bytes: int) -> Iterator[Path]:
    """A run folder to read from: `path` itself, or a temporary unpacked copy of a bundle (removed afterwards)."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise BadInput(f"{path}: run folder or bundle not found")
    if not is_archive(path):
        raise BadInput(f"{path}: not a run folder, .zip or .tar.gz bundle")
    tmp = Path(tempfile.mkdtemp(prefix="medsynbench-submit-"))
    try:
        extract_archive(path, tmp, max_bytes)
        try:
            root = find_run_root(tmp)
        except BadInput:
            raise BadInput(
                f"{path}: no run folder in the bundle (a run folder holds {MATRIX_FILE})"
            ) from None
        try:
            yield root
        except BadInput as e:
            # Name files as `bundle!member`: the unpacked copy is gone by the time anyone reads the message.
            def fix(text: str) -> str:
                return text.replace(str(root), f"{path}!").replace("!/", "!")

            raise BadInput(fix(e.args[0] if e.args else ""), [fix(p) for p in e.problems]) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
