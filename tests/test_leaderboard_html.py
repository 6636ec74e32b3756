"""The built page in a real browser: headless Chromium renders one row per record, with no console message.

Needs Debian's `chromium` package at /usr/bin/chromium; the test installs nothing and skips when it is absent.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from test_leaderboard_support import make_board, make_run

from bench.cli import main

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium not installed (/usr/bin/chromium; Debian package `chromium`)",
)


def render(page: Path, profile: Path) -> tuple[str, str]:
    """The DOM after the page's scripts ran, and the browser's log (console messages appear as `:CONSOLE` lines)."""
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, p.stderr


def console_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ":CONSOLE" in ln]


def test_page_renders_one_row_per_record_without_console_errors(tmp_path):
    run = make_run(
        tmp_path / "run", {"good": 2.5, "weak<script>": 0.4}, regimes=["real", "synthetic"], seeds=[0]
    )
    board = make_board(
        tmp_path / "board", protocol={"regimes": ["real", "synthetic"], "seeds": [0], "backbone": "resnet18"}
    )
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    assert main(["leaderboard", "build", str(board)]) == 0
    records = [json.loads(p.read_text()) for p in (board / "records").glob("*.json")]
    dom, log = render(board / "index.html", tmp_path / "profile")
    assert console_lines(log) == []
    m = re.search(r'<body[^>]*data-rendered-rows="(\d+)"', dom)
    assert m and int(m.group(1)) == len(records) == 3
    rows = re.findall(r'<tr[^>]*data-record="([^"]+)"', dom)
    assert sorted(rows) == sorted(r["id"] for r in records)
    # A generator name with markup stays text: escaped in the DOM, never a live element.
    assert "weak&lt;script&gt;" in dom


def test_the_check_catches_a_broken_page(tmp_path):
    """The same check fails on a page whose script throws: the console line is seen and no rows are drawn."""
    board = make_board(tmp_path / "board")
    assert main(["leaderboard", "build", str(board)]) == 0
    html = (board / "index.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace("<script>\n(function", "<script>\nnoSuchFunction();\n(function", 1))
    dom, log = render(broken, tmp_path / "profile")
    assert any("noSuchFunction" in ln for ln in console_lines(log))
    assert 'data-rendered-rows="0"' in dom
