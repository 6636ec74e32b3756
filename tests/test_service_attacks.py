"""A hostile team against the hosted service: label and membership oracles, work before authentication,
decompression and parser bombs, uploads the worker would refuse, stalled bodies, tokens in URLs, file modes.

Every attack is a request a team can make; each test asserts what the service must not give away or spend.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import stat
import time

import pandas as pd
import pytest
from service_support import (
    Server,
    add_team,
    bundle_with_card,
    encrypted_zip,
    gzip_bomb,
    leaked,
    make_service,
    many_member_zip,
    predictions_csv,
    secrets_of,
    submit,
    tar_gz,
    yaml_alias_bomb,
    zip_with_method,
)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from bench.errors import BadInput  # noqa: E402
from bench.service import db  # noqa: E402
from bench.service.app import create_app  # noqa: E402
from bench.service.bundle import read_predictions  # noqa: E402
from bench.service.host import Host  # noqa: E402
from bench.service.sandbox import Limits, run_limited  # noqa: E402
from bench.service.settings import load_settings  # noqa: E402
from bench.service.worker import OWNER_FILE, clean_work, run_worker  # noqa: E402

KEY_COLUMNS = ["y_true", "label", "site", "split", "sex", "age_group", "patient_id", "part"]


@pytest.fixture
def service(tmp_path, database):
    config = make_service(tmp_path, database, limits={"quota_submissions": 3})
    host = Host(load_settings(config))
    client = TestClient(create_app(host.settings, host))
    yield config, host, client, secrets_of(config)
    host.dispose()


def n_submissions(host: Host) -> int:
    with host.sessions() as s:
        return s.query(db.Submission).count()


def key_frame(config) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(predictions_csv(config)), dtype={"case_id": str})


# -- 1. the label oracle -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", KEY_COLUMNS)
def test_a_key_column_in_predictions_is_refused_by_name_and_costs_no_quota(service, column):
    config, host, c, secrets = service
    token = add_team(config, "alpha")
    df = key_frame(config).assign(**{column: "guess"})
    r = submit(c, token, "predictions", "p.csv", df.to_csv(index=False).encode())
    assert r.status_code == 400, r.text
    text = r.json()["detail"] + " ".join(r.json()["problems"])
    assert f"'{column}'" in text and "answered by the host's answer key" in text
    assert not leaked(r.text, secrets)
    assert n_submissions(host) == 0


def test_replaying_the_label_oracle_recovers_nothing(service):
    """A team sends its predictions again and again with a guessed key column, one guess per request (every case
    guessed as each class, each site, each split, each subgroup value in turn). Were any response to depend on
    whether a guess is right, the team could read the key off the differences: every response must be the same."""
    config, host, c, secrets = service
    token = add_team(config, "alpha")
    key = host.key.df
    base = key_frame(config)
    tried = 0
    for column, values in (
        ("y_true", sorted(key["label"].unique())),
        ("site", sorted(key["site"].unique())),
        ("split", ["test", "external"]),
        ("sex", sorted(key["sex"].unique())),
        ("age_group", sorted(key["age_group"].unique())),
    ):
        assert len(values) >= 2, column  # a guess that is right for some cases and wrong for others
        bodies = set()
        for v in values:
            r = submit(
                c, token, "predictions", "p.csv", base.assign(**{column: v}).to_csv(index=False).encode()
            )
            assert r.status_code == 400
            assert not leaked(r.text, secrets)
            bodies.add(r.text)
            tried += 1
        assert len(bodies) == 1, f"responses to guesses of {column!r} differ: {bodies}"
    # The key's values themselves never appear either (a class name the team did not send is not echoed).
    r = submit(c, token, "predictions", "p.csv", base.assign(y_true="zzz").to_csv(index=False).encode())
    assert not any(f"'{lab}'" in r.text for lab in key["label"].unique())
    assert tried >= 8 and n_submissions(host) == 0


def test_answer_key_mismatch_messages_show_the_submitted_value_never_the_keys(service):
    _, host, _, _ = service
    key = host.key
    preds = key.df[["case_id"]].assign(y_true="zzz", site="nowhere")
    problems = key.cross_check(preds)
    assert len(problems) == 2
    text = " ".join(problems)
    assert "'zzz' differs from the key" in text and "'nowhere' differs from the key" in text
    for value in set(key.df["label"]) | set(key.df["site"]):
        assert f"'{value}'" not in text


# -- 2. the membership oracle -------------------------------------------------------------------------------------


def test_a_known_and_an_unknown_id_get_the_same_response(service):
    """Ids of the host's data (a training patient, an evaluation case) and made-up ids of the same length, put
    where a response could echo them: a predictions row, a column name, the file name. The responses are the same
    once each id is replaced by a placeholder: nothing says which ids the host holds."""
    from bench.manifest import read_manifest

    config, host, c, _ = service
    token = add_team(config, "alpha")
    real = read_manifest(host.settings.real_manifest).df
    train = real[real["split"].astype(str) == "train"]
    # (The key's salted case ids are the board's list of cases to predict: teams hold them already.)
    known = [str(train["patient_id"].iloc[0]), str(train["case_id"].iloc[0]), str(real["case_id"].iloc[-1])]
    base = key_frame(config)

    def probe(guess: str) -> list[str]:
        out = []
        row = base.iloc[[0]].assign(case_id=guess)
        for name, df in (
            ("p.csv", pd.concat([base, row], ignore_index=True)),
            ("p.csv", base.assign(**{f"prob_{guess}": 0.0})),
            (f"{guess}.csv", base.iloc[1:]),
        ):
            r = submit(c, token, "predictions", name, df.to_csv(index=False).encode())
            assert r.status_code == 400, r.text
            out.append(r.text.replace(guess, "<ID>"))
        return out

    for k in known:
        made_up = "q" * len(k)
        assert made_up not in set(real["case_id"].astype(str)) | set(real["patient_id"].astype(str))
        assert probe(k) == probe(made_up), k
    assert n_submissions(host) == 0


# -- 3 and 4. bombs and what the upload can refuse ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name,data,cause",
    [
        ("gz.tar.gz", lambda: gzip_bomb(300_000_000), "more than"),
        ("many.tar.gz", lambda: tar_gz({}, n_empty=30_000), "more than 1,000 members"),
        ("many.zip", lambda: many_member_zip(3_000), "3,000 members"),
        ("enc.zip", encrypted_zip, "encrypted"),
        ("lzw.zip", lambda: zip_with_method(99), "compression method 99"),
    ],
)
def test_bombs_and_bundles_the_worker_would_refuse_are_400_quickly_and_free(service, name, data, cause):
    config, host, c, _ = service
    data = data()
    host.settings = host.settings.model_copy(
        update={
            "limits": host.settings.limits.model_copy(
                update={"max_unpacked_bytes": 1_000_000, "max_bundle_members": 1_000}
            )
        }
    )
    assert len(data) < host.settings.limits.max_upload_bytes
    token = add_team(config, "alpha")
    t0 = time.monotonic()
    r = submit(c, token, "synthetic", name, data)
    took = time.monotonic() - t0
    assert r.status_code == 400, r.text
    assert cause in r.text and name in r.text
    assert took < 5, f"{name}: {took:.1f} s in the API"
    assert n_submissions(host) == 0 and list(host.uploads.iterdir()) == []


def test_a_prob_column_of_an_unknown_class_and_an_oversized_table_are_400_at_upload(service):
    config, host, c, _ = service
    token = add_team(config, "alpha")
    base = key_frame(config)
    r = submit(c, token, "predictions", "p.csv", base.assign(prob_dragon=0.0).to_csv(index=False).encode())
    assert r.status_code == 400 and "'prob_dragon'" in r.text
    host.settings = host.settings.model_copy(
        update={"limits": host.settings.limits.model_copy(update={"max_prediction_rows": 20})}
    )
    buf = io.BytesIO()
    pd.concat([base] * 3, ignore_index=True).to_parquet(buf)
    r = submit(c, token, "predictions", "p.parquet", buf.getvalue())
    assert r.status_code == 400 and f"{3 * len(base)} rows, more than the limit of 20" in r.text
    wide = ",".join(f"c{i}" for i in range(500)) + "\n" + ",".join("0" * 500) + "\n"
    r = submit(c, token, "predictions", "p.csv", wide.encode())
    assert r.status_code == 400 and "500 columns" in r.text
    assert n_submissions(host) == 0


def test_parquet_limits_are_read_from_the_metadata_before_the_table_is_loaded(tmp_path, monkeypatch):
    # A few hundred kB of Parquet can declare ten million rows: the count must stop it before pandas loads it.
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"case_id": pa.array(["a"] * 2_000_000)}), path)
    assert path.stat().st_size < 1_000_000

    def refuse(*a, **k):
        raise AssertionError("the table was loaded")

    monkeypatch.setattr(pd, "read_parquet", refuse)
    with pytest.raises(BadInput, match="2,000,000 rows, more than the limit of 1,000"):
        read_predictions(path, "p.parquet", max_rows=1_000)


def test_a_yaml_alias_bomb_in_the_card_fails_the_job_naming_the_cause(service):
    """462 bytes of nested aliases once expanded to gigabytes in the worker: now a named failure at once."""
    config, host, c, _ = service
    token = add_team(config, "alpha")
    assert len(yaml_alias_bomb()) < 500
    r = submit(c, token, "synthetic", "bomb.zip", bundle_with_card(yaml_alias_bomb()))
    assert r.status_code == 202, r.text
    t0 = time.monotonic()
    assert run_worker(host, idle_exit=True) == 1
    assert time.monotonic() - t0 < 60
    with host.sessions() as s:
        sub = s.query(db.Submission).one()
    assert sub.status == "failed" and "YAML nodes" in sub.reason and "bomb.zip!bundle/card.yaml" in sub.reason


# -- a job's resources --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn,limits,which",
    [
        ("hog_memory", Limits(memory_bytes=1 << 30), "memory"),
        ("spin", Limits(cpu_s=1), "cpu"),
        ("write_big_file", Limits(file_bytes=1 << 20), "file"),
        ("sleep_long", Limits(wall_s=3), "wall"),
    ],
)
def test_a_job_past_a_limit_is_stopped_and_the_limit_named(tmp_path, fn, limits, which):
    import service_support

    t0 = time.monotonic()
    out = run_limited(getattr(service_support, fn), (str(tmp_path),), limits)
    assert (out.kind, out.value) == ("limit", which), out
    assert time.monotonic() - t0 < 60
    assert run_limited(service_support.small_job, (str(tmp_path),), limits).value == 42


def test_a_job_killed_by_a_limit_is_failed_with_the_reason(tmp_path):
    config = make_service(tmp_path, worker={"job_wall_s": 0.05})
    token = add_team(config, "alpha")
    host = Host(load_settings(config))
    c = TestClient(create_app(host.settings, host))
    assert submit(c, token, "predictions", "p.csv", predictions_csv(config)).status_code == 202
    run_worker(host, idle_exit=True)
    with host.sessions() as s:
        sub = s.query(db.Submission).one()
    assert sub.status == "failed" and sub.reason.startswith(
        "stopped: the evaluation went past the time limit"
    )
    assert list(host.work.iterdir()) == []
    host.dispose()


# -- 5. restarts and file modes -----------------------------------------------------------------------------------


def test_abandoned_work_folders_are_removed_and_a_live_one_kept(service):
    config, host, c, _ = service
    token = add_team(config, "alpha")
    ids = [submit(c, token, "predictions", "p.csv", predictions_csv(config)).json()["id"] for _ in range(3)]
    live, dead, done = ids
    for sid, owner in ((live, "w-live"), (dead, "w-dead"), (done, "w-done")):
        d = host.work / f"{sid}-abcd1234"
        d.mkdir(parents=True)
        (d / OWNER_FILE).write_text(owner)
        (d / "host_train.parquet").write_bytes(b"real rows")
    (host.work / "stray").mkdir()
    with host.sessions() as s, s.begin():
        for sid, owner, expires in ((live, "w-live", db.now() + 60), (dead, "w-dead", db.now() - 1)):
            sub = s.get(db.Submission, sid)
            sub.status, sub.lease_owner, sub.lease_expires_at = db.RUNNING, owner, expires
        s.get(db.Submission, done).status = db.FAILED
    assert clean_work(host) == 3
    assert [p.name for p in host.work.iterdir()] == [f"{live}-abcd1234"]


def test_secret_files_are_owner_only(service):
    config, host, c, _ = service
    token = add_team(config, "alpha")
    assert submit(c, token, "predictions", "p.csv", predictions_csv(config)).status_code == 202
    st = host.settings
    files = [*host.uploads.iterdir(), st.answer_key]
    if st.database.startswith("sqlite:///"):
        files.append(st.database[len("sqlite:///") :])
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    for d in (st.storage, host.uploads, host.records, host.work):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d


# -- 6. names and tokens ------------------------------------------------------------------------------------------


def test_a_300_character_file_name_is_400(service):
    config, host, c, _ = service
    token = add_team(config, "alpha")
    r = submit(c, token, "predictions", "p" * 296 + ".csv", predictions_csv(config))
    assert r.status_code == 400 and "300 characters" in r.text
    assert n_submissions(host) == 0


# -- against a real server: headers before bodies, stalls, logs ---------------------------------------------------


def _raw(port: int, head: str, body: bytes = b"", read_s: float = 5.0) -> tuple[int, float]:
    """Send a request's head and part of its body; the status line and how long it took to come."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
        s.sendall(head.encode())
        with contextlib.suppress(OSError):  # the server answered and closed while we were still sending
            s.sendall(body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    took = time.monotonic() - t0
    return int(data.split(b" ", 2)[1]), took


def _post_head(length: int | None, token: str | None = None, boundary: str = "b") -> str:
    lines = ["POST /api/submissions HTTP/1.1", "Host: 127.0.0.1"]
    lines.append(f"Content-Type: multipart/form-data; boundary={boundary}")
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return "\r\n".join(lines) + "\r\n\r\n"


@pytest.fixture
def live(tmp_path, monkeypatch):
    tmpdir = tmp_path / "server-tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))  # where the server would spool a form's file
    config = make_service(tmp_path, limits={"body_timeout_s": 2})
    token = add_team(config, "alpha")
    srv = Server(config).start()
    yield srv, token, config, tmpdir
    srv.stop()


def _written(*folders) -> int:
    return sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file())


def test_a_large_upload_without_a_token_is_401_before_its_body_is_read(live):
    srv, token, config, tmpdir = live
    uploads = Host(load_settings(config)).uploads
    chunk = b"x" * (1 << 20)
    code, took = _raw(srv.port, _post_head(2 << 30), chunk * 4)
    assert code == 401 and took < 1.0, (code, took)
    # A valid token, and a declared length over the cap: 413 on the header.
    code, took = _raw(srv.port, _post_head(2 << 30, token), chunk)
    assert code == 413 and took < 1.0, (code, took)
    # No length declared: counted as it streams, cut off at the cap.
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="p.csv"\r\n\r\n'
    body = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in [part] + [chunk] * 4)
    code, _ = _raw(srv.port, _post_head(None, token), body)
    assert code == 413
    cap = load_settings(config).limits.max_upload_bytes + 64 * 1024
    assert _written(tmpdir, uploads) <= cap


def test_a_stalled_body_is_cut_off_and_sigterm_stops_the_server_promptly(live):
    srv, token, _, _ = live
    code, took = _raw(srv.port, _post_head(1000, token), b"--b\r\n", read_s=20)
    assert code == 408 and 1.5 < took < 10, (code, took)
    socks = []
    for _ in range(3):  # stalled uploads, with and without a token
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(_post_head(5000, token).encode() + b"--b\r\n")
        socks.append(s)
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /api/submissions HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    socks.append(s)
    time.sleep(0.5)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(timeout=30)
    assert time.monotonic() - t0 < 15
    for s in socks:
        s.close()


def test_a_token_in_the_url_is_refused_and_never_logged(live):
    import httpx

    srv, token, _, _ = live
    for q in (f"token={token}", f"access_token={token}", f"api_key={token}"):
        r = httpx.get(f"{srv.url}/api/me?{q}")
        assert r.status_code == 400 and "Authorization header" in r.json()["detail"]
    r = httpx.get(f"{srv.url}/api/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    srv.stop()
    log = srv.proc.stderr.read().decode()
    assert token not in log and token[:12] not in log
    assert '"GET /api/me" 400' in log and '"GET /api/me" 200' in log  # the access log, path only
