"""The service as it runs: `medsynbench serve` on 127.0.0.1, workers as separate processes, Chromium on the page."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

httpx = pytest.importorskip("httpx")
from service_support import (  # noqa: E402
    Server,
    add_team,
    leaked,
    make_service,
    predictions_csv,
    secrets_of,
    synthetic_bundle,
    wait_status,
    worker_process,
)

from bench.service import db  # noqa: E402
from bench.service.host import Host  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


class Client(httpx.Client):
    """Every response is scanned for the host's real data."""

    def __init__(self, url: str, secrets: list[str]):
        super().__init__(base_url=url, timeout=60)
        self.secrets = secrets

    def request(self, *a, **k):
        r = super().request(*a, **k)
        bad = leaked(r.text, self.secrets)
        assert not bad, f"{r.request.url}: response shows real data {bad[:3]}"
        return r


def post(c: Client, token: str, kind: str, name: str, data: bytes):
    return c.post(
        "/api/submissions",
        headers={"Authorization": f"Bearer {token}"},
        data={"kind": kind},
        files={"file": (name, data)},
    )


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        p.wait(timeout=30)


def test_two_teams_at_once_with_two_workers_are_both_scored(tmp_path):
    config = make_service(tmp_path)
    tokens = {t: add_team(config, t) for t in ("alpha", "beta")}
    secrets = secrets_of(config)
    with Server(config) as srv, Client(srv.url, secrets) as c:
        ids: dict[str, str] = {}

        def send(team: str) -> None:
            r = post(c, tokens[team], "predictions", f"{team}.csv", predictions_csv(config, seed=len(team)))
            assert r.status_code == 202, r.text
            ids[team] = r.json()["id"]

        threads = [threading.Thread(target=send, args=(t,)) for t in tokens]
        for t in threads:
            t.start()
        workers = [worker_process(config) for _ in range(2)]
        try:
            for t in threads:
                t.join(60)
            assert set(ids) == set(tokens)
            bodies = {team: wait_status(c, tokens[team], ids[team]) for team in tokens}
        finally:
            for w in workers:
                stop(w)
        assert all(b["status"] == "scored" and b["attempts"] == 1 for b in bodies.values()), bodies
        board = c.get("/api/leaderboard").json()
        assert sorted(r["team"] for r in board["rows"]) == ["alpha", "beta"]


def test_a_worker_killed_mid_job_is_retried_and_the_job_scored_once(tmp_path):
    config = make_service(tmp_path, worker={"lease_s": 2, "hold_s": 60, "poll_s": 0.2})
    # The second worker reads the same service without the hold.
    spec = yaml.safe_load(config.read_text())
    spec["worker"]["hold_s"] = 0
    fast = config.with_name("service-fast.yaml")
    fast.write_text(yaml.safe_dump(spec))
    token = add_team(config, "alpha")
    with Server(config) as srv, Client(srv.url, secrets_of(config)) as c:
        sid = post(c, token, "predictions", "p.csv", predictions_csv(config)).json()["id"]
        slow = worker_process(config)
        try:
            wait_status(c, token, sid, want=("running",), timeout=90)
            slow.send_signal(signal.SIGKILL)
            slow.wait(10)
        finally:
            stop(slow)
        retry = worker_process(fast)
        try:
            body = wait_status(c, token, sid, timeout=120)
        finally:
            stop(retry)
    assert body["status"] == "scored" and body["attempts"] == 2
    host = Host.from_file(config)
    with host.sessions() as s:
        assert s.query(db.Score).filter_by(submission_id=sid).count() == 2  # one per part, written once
        assert sorted(p for (p,) in s.query(db.Score.part).filter_by(submission_id=sid)) == [
            "private",
            "public",
        ]
    host.dispose()


def test_a_restart_of_the_service_loses_no_submission(tmp_path):
    config = make_service(tmp_path)
    token = add_team(config, "alpha")
    secrets = secrets_of(config)
    srv = Server(config).start()
    with Client(srv.url, secrets) as c:
        sent = [
            post(c, token, "predictions", "p.csv", predictions_csv(config, seed=i)).json()["id"]
            for i in range(3)
        ]
    srv.proc.send_signal(signal.SIGKILL)  # not even a clean shutdown
    srv.proc.wait(10)
    with Server(config) as again, Client(again.url, secrets) as c:
        listed = c.get("/api/submissions", headers={"Authorization": f"Bearer {token}"}).json()
        assert [s["id"] for s in listed] == sent and {s["status"] for s in listed} == {"queued"}
        w = worker_process(config, "--drain")
        out, err = w.communicate(timeout=180)
        assert w.returncode == 0, err.decode()[-2000:]
        assert b"processed 3 submission(s)" in out
        for sid in sent:
            assert wait_status(c, token, sid, timeout=5)["status"] == "scored"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (/usr/bin/chromium)")
def test_page_in_headless_chromium(tmp_path):
    config = make_service(tmp_path)
    a, b = add_team(config, "alpha"), add_team(config, "beta <b>")
    with Server(config) as srv, Client(srv.url, secrets_of(config)) as c:
        for tok, skill in ((a, 3.0), (b, 0.3)):
            assert post(c, tok, "predictions", "p.csv", predictions_csv(config, skill)).status_code == 202
        w = worker_process(config, "--drain")
        w.communicate(timeout=180)
        cmd = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=3000",
            "--dump-dom",
            f"{srv.url}/",
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    assert dom.count("<tr><td>") == 2
    assert dom.index("alpha") < dom.index("beta &lt;b&gt;")  # ranked, and the team name is escaped
    assert "public part" in dom
    assert not [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln]


@pytest.mark.slow
def test_two_teams_send_synthetic_bundles_at_once_through_the_cli(tmp_path):
    """The whole path for synthetic data: `medsynbench submit --server`, two workers, training and audit."""
    import os
    import sys

    config = make_service(tmp_path)
    tokens = {t: add_team(config, t) for t in ("alpha", "beta")}
    bundles = {}
    for i, t in enumerate(tokens):
        bundles[t] = tmp_path / f"{t}.zip"
        bundles[t].write_bytes(synthetic_bundle(seed=i, name=f"gen-{t}"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with Server(config) as srv:
        workers = [worker_process(config) for _ in range(2)]
        try:
            procs = {
                t: subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench",
                        "submit",
                        str(bundles[t]),
                        "--server",
                        srv.url,
                        "--token",
                        tokens[t],
                        "--wait",
                        "300",
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for t in tokens
            }
            outs = {t: p.communicate(timeout=400) for t, p in procs.items()}
        finally:
            for w in workers:
                stop(w)
    for t, (out, err) in outs.items():
        assert procs[t].returncode == 0, err[-2000:]
        assert "scored" in out and "auroc_macro (public part)" in out, out
    time.sleep(0)
