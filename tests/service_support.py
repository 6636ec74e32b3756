"""A hosted service on the tiny task: settings, answer key, teams, uploads; shared by the service tests."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from conftest import TINY_TASK, draw_shape, make_tiny_dataset, write_tiny_task

REPO = Path(__file__).resolve().parents[1]


def make_service(tmp: Path, database: str | None = None, **overrides) -> Path:
    """A service folder: task, real data, service.yaml, database and answer key; returns service.yaml."""
    from bench.service.host import Host
    from bench.service.scoring import build_key
    from bench.tasks import load_task

    task_file = write_tiny_task(tmp / "hostdata")
    task = load_task(task_file)
    manifest = make_tiny_dataset(tmp / "hostdata" / "real", task)
    cfg = {
        "title": "tiny hosted board",
        "database": database or "sqlite:///service.db",
        "storage": "storage",
        "task": str(task_file),
        "real_manifest": str(manifest),
        "answer_key": "answer_key.parquet",
        "id_salt": "test-salt-0123",
        "protocol": {
            "regimes": ["synthetic"],
            "seeds": [0],
            "backbone": "resnet10t",
            "preset": "smoke",
            "epochs": 1,
            "threads": 1,
            "device": "cpu",
        },
        "privacy": {"features": ["pixel"], "bootstrap": 50},
        "limits": {"quota_submissions": 50, "quota_period_s": 3600, "max_upload_bytes": 2_000_000},
        "worker": {"lease_s": 30, "poll_s": 0.2},
        "scoring": {"n_boot": 50},
    }
    for k, v in overrides.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    svc = tmp / "service"
    svc.mkdir(parents=True, exist_ok=True)
    path = svc / "service.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)  # it holds id_salt
    host = Host.from_file(path)
    if database:  # a shared server: start from empty tables
        from bench.service.db import Base

        Base.metadata.drop_all(host.engine)
    host.init()
    st = host.settings
    build_key(st.real_manifest, host.task, st.id_salt, st.private_fraction).write(st.answer_key)
    host.dispose()
    return path


def add_team(config: Path, name: str) -> str:
    from bench.service import db
    from bench.service.host import Host

    host = Host.from_file(config)
    with host.sessions() as s, s.begin():
        token = db.issue_token(s, db.add_team(s, name))
    host.dispose()
    return token


def predictions_csv(config: Path, skill: float = 2.0, seed: int = 0) -> bytes:
    """Predictions for every evaluation case of the key; `skill` > 0 puts weight on the true label."""
    from bench.service.host import Host

    key = Host.from_file(config).key.df
    classes = TINY_TASK["labels"]["classes"]
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(key), len(classes)))
    logits[np.arange(len(key)), [classes.index(c) for c in key["label"]]] += skill
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    df = pd.DataFrame({"case_id": key["case_id"]})
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = p[:, i]
    return df.to_csv(index=False).encode()


def synthetic_bundle(n_per_class: int = 8, seed: int = 1, name: str = "shapes") -> bytes:
    """A zip of synthetic images, labels.csv and a generator card, as a team would send it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    rows = []
    with zipfile.ZipFile(buf, "w") as z:
        for label in TINY_TASK["labels"]["classes"]:
            for i in range(n_per_class):
                img = io.BytesIO()
                Image.fromarray(draw_shape(label, rng)).save(img, format="PNG")
                rel = f"images/{label}_{i}.png"
                z.writestr(f"bundle/{rel}", img.getvalue())
                rows.append(f"{rel},{label}")
        z.writestr("bundle/labels.csv", "image,label\n" + "\n".join(rows) + "\n")
        card = {
            "name": name,
            "version": "1.0",
            "task": {"name": "tiny", "version": "1.0"},
            "training": {"sites": ["s1"], "n_images": 10},
        }
        z.writestr("bundle/card.yaml", yaml.safe_dump(card))
    return buf.getvalue()


# -- hostile uploads (shared with scripts/perf_service.py) ------------------------------------------------------


def tar_gz(members: dict[str, bytes], n_empty: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for i in range(n_empty):
            t.addfile(tarfile.TarInfo(f"e/{i}"), io.BytesIO(b""))
    return buf.getvalue()


def gzip_bomb(inflated: int) -> bytes:
    """A tar.gz of one member of `inflated` zero bytes (about 1000:1)."""

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            k = min(len(b), self.left)
            b[:k] = bytes(k)
            self.left -= k
            return k

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as t:
        info = tarfile.TarInfo("bundle/labels.csv")
        info.size = inflated
        t.addfile(info, io.BufferedReader(Zeros(inflated)))
    return buf.getvalue()


def zip_with_method(method: int) -> bytes:
    """A bundle whose card is stored with compression `method` (patched into both headers)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("labels.csv", "image,label\n")
        z.writestr("card.yaml", "name: x\n")
    data = bytearray(buf.getvalue())
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.rfind(sig)  # the card's headers come last
        data[at + off : at + off + 2] = method.to_bytes(2, "little")
    return bytes(data)


def encrypted_zip() -> bytes:
    """A bundle whose card is flagged as encrypted (zipfile cannot write one: the flag is patched in)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("labels.csv", "image,label\n")
        z.writestr("card.yaml", b"\x00" * 12 + b"name: x\n")
    data = bytearray(buf.getvalue())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.rfind(sig)
        data[at + off] |= 0x1
    return bytes(data)


def many_member_zip(n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(n):
            z.writestr(f"e/{i}", b"")
    return buf.getvalue()


def parquet_rows_bomb(n: int) -> bytes:
    """A Parquet file of a few kB declaring `n` rows (one repeated, dictionary-encoded case id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array(["a"]))
    buf = io.BytesIO()
    pq.write_table(pa.table({"case_id": col}), buf)
    return buf.getvalue()


def yaml_alias_bomb() -> str:
    """Under 500 bytes of YAML standing for 9**10 strings once its aliases are expanded."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 10):
        p, q = chr(96 + i), chr(97 + i)
        lines.append(f"{q}: &{q} [{','.join([f'*{p}'] * 9)}]")
    return "\n".join(lines) + "\nname: x\n"


def bundle_with_card(card: str) -> bytes:
    """A valid synthetic bundle whose card.yaml is `card`."""
    z = zipfile.ZipFile(io.BytesIO(synthetic_bundle(n_per_class=2)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for n in z.namelist():
            out.writestr(n, card if n.endswith("card.yaml") else z.read(n))
    return buf.getvalue()


def secrets_of(config: Path) -> list[str]:
    """Strings no response may contain: the key's ids, the real manifest's ids and paths, label-by-case pairs."""
    from bench.manifest import read_manifest
    from bench.service.host import Host

    host = Host.from_file(config)
    key = host.key.df
    real = read_manifest(host.settings.real_manifest).df
    out = set(key["case_id"]) | set(key["patient_id"]) | set(real["case_id"]) | set(real["patient_id"])
    out |= {f"{c},{lab}" for c, lab in zip(key["case_id"], key["label"], strict=True)}
    out |= {f'"{c}":"{lab}"' for c, lab in zip(key["case_id"], key["label"], strict=True)}
    out |= {
        str(host.settings.real_manifest.parent),
        str(host.settings.answer_key),
        str(host.settings.storage),
    }
    host.dispose()
    return sorted(out)


def leaked(body: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in body]


# -- a real server on loopback --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`medsynbench serve` as a subprocess on 127.0.0.1."""

    def __init__(self, config: Path, port: int | None = None) -> None:
        self.config, self.port = config, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench", "serve", "--config", str(self.config), "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode()[-3000:])
            try:
                if httpx.get(f"{self.url}/api/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("service did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def worker_process(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "bench", "worker", "--config", str(config), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def submit(client, token: str, kind: str, name: str, data: bytes):
    return client.post(
        "/api/submissions",
        headers={"Authorization": f"Bearer {token}"},
        data={"kind": kind},
        files={"file": (name, data)},
    )


def wait_status(client, token: str, sid: str, want=("scored", "failed"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/api/submissions/{sid}", headers={"Authorization": f"Bearer {token}"})
        body = r.json()
        if body["status"] in want:
            return body
        time.sleep(0.2)
    raise AssertionError(f"submission {sid} still {body['status']} after {timeout} s")


def in_thread(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def dump(obj) -> str:
    return json.dumps(obj)


# -- jobs for bench.service.sandbox (module-level: a spawned child imports them) ---------------------------------


def hog_memory(_: str) -> int:
    blocks = []
    for _ in range(64):  # 4 GiB at most: past a 1 GiB limit well before
        blocks.append(np.ones(64 * 1024 * 1024 // 8))
    return len(blocks)


def spin(_: str) -> int:
    n = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        n += 1
    return n


def write_big_file(folder: str) -> int:
    with open(Path(folder) / "big.bin", "wb") as f:
        for _ in range(16):
            f.write(b"\0" * (1 << 20))
    return 16


def sleep_long(_: str) -> int:
    time.sleep(120)
    return 0


def small_job(_: str) -> int:
    return 42
