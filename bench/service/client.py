"""The team's side of the hosted service: upload a file, optionally wait for its score (standard library only)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench.errors import BadInput


def _request(url: str, token: str, data: bytes | None = None, content_type: str | None = None) -> Any:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Accept", "application/json")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read().decode())
        except ValueError:
            body = {}
        detail = body.get("detail", e.reason) if isinstance(body, dict) else e.reason
        problems = body.get("problems", []) if isinstance(body, dict) else []
        raise BadInput(
            f"{url}: the service answered {e.code}: {detail}", [str(p) for p in problems]
        ) from None
    except urllib.error.URLError as e:
        raise BadInput(f"{url}: cannot reach the service: {e.reason}") from None


def multipart(fields: dict[str, str], file_field: str, path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
    )
    parts.append(path.read_bytes())
    parts.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def guess_kind(path: Path) -> str:
    """predictions for a table or a segmentation board's label maps (.npz), else a synthetic bundle."""
    return "predictions" if path.name.lower().endswith((".csv", ".parquet", ".npz")) else "synthetic"


def submit_to_server(
    path: str | Path, server: str, token: str, *, kind: str | None = None, wait: float = 0
) -> dict[str, Any]:
    """Upload; with `wait` > 0, poll for up to that many seconds until the submission is scored or failed."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(
            f"{path}: not a file (send a .zip/.tar.gz synthetic bundle, a .csv/.parquet of predictions or a "
            ".npz of label maps)"
        )
    base = server.rstrip("/")
    body, ctype = multipart({"kind": kind or guess_kind(path)}, "file", path)
    sub = _request(f"{base}/api/submissions", token, body, ctype)
    deadline = time.monotonic() + wait
    while wait > 0 and sub["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.1)))
        sub = _request(f"{base}/api/submissions/{sub['id']}", token)
    return sub
