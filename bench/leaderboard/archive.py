"""Safe unpacking of submitted run bundles (.zip, .tar.gz / .tgz).

Every member is inspected before anything is written: absolute paths, `..` components, symbolic and hard links,
device files and FIFOs are rejected, and so is a bundle whose files add up to more than the limit. Files the
benchmark never reads and that could carry pickled code (torch checkpoints, pickles) are skipped, not unpacked:
nothing from a bundle is ever unpickled.
"""

from __future__ import annotations

import contextlib
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
        else:
            kind = "file"
        out.append(_Member(info.filename, info.file_size, kind))
    return out


def _tar_members(tf: tarfile.TarFile) -> list[_Member]:
    out = []
    for m in tf.getmembers():
        if m.isdir():
            kind = "dir"
        elif m.issym():
            kind = "symbolic link"
        elif m.islnk():
            kind = "hard link"
        elif m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            kind = "special file (device or FIFO)"
        elif m.isreg():
            kind = "file"
        else:
            kind = f"unsupported member type {m.type!r}"
        out.append(_Member(m.name, m.size, kind))
    return out


def inspect_archive(path: Path, max_bytes: int) -> list[_Member]:
    """List members; raise BadInput naming every unsafe member (and the size overrun) before any extraction."""
    name = path.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                members = _zip_members(zf)
        else:
            with tarfile.open(path, "r:gz") as tf:
                members = _tar_members(tf)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise BadInput(
            f"{path}: not a readable {'zip' if name.endswith('.zip') else 'tar.gz'} archive: {e}"
        ) from e
    problems = []
    if len(members) > MAX_MEMBERS:
        problems.append(f"{len(members)} members (more than {MAX_MEMBERS})")
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
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
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
        with tarfile.open(path, "r:gz") as tf:
            for m in tf.getmembers():
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
