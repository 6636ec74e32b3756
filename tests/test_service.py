"""The hosted evaluation service through FastAPI's TestClient: tokens, quotas, hostile uploads, scoring, phases.

Every test runs on SQLite, and on PostgreSQL too when MEDSYNBENCH_TEST_POSTGRES_URL names a server (`.ci/run` starts
one on 127.0.0.1).
"""

from __future__ import annotations

import io
import tarfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_TASK
from service_support import (
    add_team,
    leaked,
    make_service,
    predictions_csv,
    secrets_of,
    submit,
    synthetic_bundle,
)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from bench.leaderboard.spec import ScoringSpec  # noqa: E402
from bench.metrics import evaluate_predictions  # noqa: E402
from bench.service import db  # noqa: E402
from bench.service.app import create_app  # noqa: E402
from bench.service.host import Host  # noqa: E402
from bench.service.scoring import AnswerKey, score_parts, validate_predictions  # noqa: E402
from bench.service.settings import load_settings  # noqa: E402
from bench.service.worker import run_worker  # noqa: E402
from bench.tasks import Task  # noqa: E402


class Checked:
    """A TestClient whose every response is scanned for the host's real data."""

    def __init__(self, app, secrets):
        self.c, self.secrets, self.seen = TestClient(app), secrets, 0

    def _check(self, r):
        self.seen += 1
        bad = leaked(r.text, self.secrets)
        assert not bad, f"{r.request.method} {r.request.url}: response shows real data {bad[:3]}"
        return r

    def get(self, *a, **k):
        return self._check(self.c.get(*a, **k))

    def post(self, *a, **k):
        return self._check(self.c.post(*a, **k))


@pytest.fixture
def service(tmp_path, database):
    config = make_service(tmp_path, database, limits={"quota_submissions": 3})
    settings = load_settings(config)
    host = Host(settings)
    app = create_app(settings, host)
    yield config, host, Checked(app, secrets_of(config))
    host.dispose()


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def drain(host):
    return run_worker(host, idle_exit=True)


def test_token_is_stored_hashed_and_missing_or_bad_token_is_401(service):
    config, host, c = service
    token = add_team(config, "alpha")
    with host.sessions() as s:
        tok = s.query(db.Token).one()
    assert tok.sha256 == db.hash_token(token) and token not in (tok.sha256, tok.prefix)
    assert tok.prefix == token[:12]
    for headers in ({}, auth("msb_wrong"), {"Authorization": "Basic abc"}):
        r = c.get("/api/me", headers=headers)
        assert r.status_code == 401, headers
        r = c.post(
            "/api/submissions", headers=headers, data={"kind": "predictions"}, files={"file": ("p.csv", b"x")}
        )
        assert r.status_code == 401
    assert c.get("/api/me", headers=auth(token)).json()["team"] == "alpha"
    with host.sessions() as s, s.begin():
        assert db.revoke_tokens(s, token[:12]) == 1
    assert c.get("/api/me", headers=auth(token)).status_code == 401


def test_predictions_are_scored_on_both_parts_and_only_the_public_part_is_shown(service):
    config, host, c = service
    token = add_team(config, "alpha")
    r = submit(c, token, "predictions", "preds.csv", predictions_csv(config, skill=3.0))
    assert r.status_code == 202, r.text
    sid = r.json()["id"]
    assert r.json()["status"] == "queued"
    assert drain(host) == 1
    body = c.get(f"/api/submissions/{sid}", headers=auth(token)).json()
    assert body["status"] == "scored" and body["attempts"] == 1
    assert body["score"]["part"] == "public"
    # The stored public score is the task's primary metric on the public external cases (the board's split), by
    # hand with scikit-learn.
    from sklearn.metrics import roc_auc_score

    key = host.key.df
    preds = pd.read_csv(io.BytesIO(predictions_csv(config, skill=3.0)))
    j = key.merge(preds, on="case_id")
    pub = j[(j["part"] == "public") & (j["split"] == "external")]
    assert 0 < len(pub) < (j["part"] == "public").sum()  # the public part also holds internal test cases
    classes = ["blank", "disc", "bar"]
    want = roc_auc_score(
        pub["label"].map(classes.index), pub[[f"prob_{k}" for k in classes]].to_numpy(), multi_class="ovr"
    )
    assert body["score"]["value"] == pytest.approx(want, abs=1e-9)
    assert body["score"]["n_cases"] == len(pub)
    assert body["score"]["ci_low"] <= body["score"]["value"] <= body["score"]["ci_high"]
    with host.sessions() as s:
        parts = sorted(s.query(db.Score.part).filter_by(submission_id=sid).all())
    assert parts == [("private",), ("public",)]
    board = c.get("/api/leaderboard").json()
    assert board["part"] == "public" and [row["team"] for row in board["rows"]] == ["alpha"]
    assert (host.page_dir / "index.html").is_file()
    assert "alpha" in c.get("/").text


def test_closing_the_phase_switches_page_and_api_to_the_private_part(service):
    config, host, c = service
    with host.sessions() as s, s.begin():
        s.add(db.Phase(name="dev", opened_at=db.now()))
    a, b = add_team(config, "alpha"), add_team(config, "beta")
    for tok, skill in ((a, 3.0), (b, 0.5)):
        assert submit(c, tok, "predictions", "p.csv", predictions_csv(config, skill)).status_code == 202
    drain(host)
    board = c.get("/api/leaderboard").json()
    assert board["phase_open"] and board["part"] == "public"
    with host.sessions() as s, s.begin():
        db.open_phase(s).closed_at = db.now()
    final = c.get("/api/leaderboard").json()
    assert final["part"] == "private" and not final["phase_open"]
    with host.sessions() as s:
        private = {sc.submission_id: sc.value for sc in s.query(db.Score).filter_by(part="private").all()}
    assert sorted(r["value"] for r in final["rows"]) == sorted(private.values())
    assert final["rows"][0]["team"] == "alpha"
    assert "private part" in c.get("/").text
    r = submit(c, a, "predictions", "p.csv", predictions_csv(config))
    assert r.status_code == 403 and "closed" in r.json()["detail"]


def test_a_phase_closed_while_the_upload_is_checked_refuses_it(service, monkeypatch):
    """The phase is open when the upload starts and closes while its file is being validated: the upload is
    refused (403) with nothing recorded or kept, because the state that decides is read when it is recorded."""
    import bench.service.app as app_mod

    config, host, c = service
    with host.sessions() as s, s.begin():
        s.add(db.Phase(name="dev", opened_at=db.now()))
    token = add_team(config, "alpha")
    real = app_mod.validate_predictions

    def validate_then_close(*a, **k):
        with host.sessions() as s, s.begin():
            db.open_phase(s).closed_at = db.now()
        return real(*a, **k)

    monkeypatch.setattr(app_mod, "validate_predictions", validate_then_close)
    r = submit(c, token, "predictions", "p.csv", predictions_csv(config))
    assert r.status_code == 403 and "'dev' is closed" in r.json()["detail"], r.text
    with host.sessions() as s:
        assert s.query(db.Submission).count() == 0
    assert list(host.uploads.iterdir()) == []


def test_quota_exceeded_is_429_with_retry_after(service):
    config, host, c = service
    token = add_team(config, "alpha")
    data = predictions_csv(config)
    for _ in range(3):
        assert submit(c, token, "predictions", "p.csv", data).status_code == 202
    r = submit(c, token, "predictions", "p.csv", data)
    assert r.status_code == 429
    assert "quota" in r.json()["detail"] and int(r.headers["Retry-After"]) > 0
    other = add_team(config, "beta")  # quotas are per team
    assert submit(c, other, "predictions", "p.csv", data).status_code == 202


def test_simultaneous_uploads_of_one_team_do_not_exceed_its_quota(service):
    config, host, c = service
    token = add_team(config, "alpha")
    data = predictions_csv(config)
    n = 12
    # All start together, so that every upload passes the early check before the first is recorded.
    start = threading.Barrier(n)

    def send(_: int) -> int:
        start.wait(timeout=30)
        return submit(c, token, "predictions", "p.csv", data).status_code

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(send, range(n)))
    assert sorted(codes) == [202] * 3 + [429] * (n - 3), codes
    with host.sessions() as s:
        assert s.query(db.Submission).count() == 3
    # A refused upload leaves no file behind.
    assert len(list(host.uploads.iterdir())) == 3


def _zip(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, d in members.items():
            z.writestr(n, d)
        for n, target in (links or {}).items():
            info = zipfile.ZipInfo(n)
            info.external_attr = 0o120777 << 16
            z.writestr(info, target)
    return buf.getvalue()


def _tar_with_link() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("labels.csv")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,data,cause",
    [
        ("evil.zip", _zip({"../../outside.txt": b"x", "labels.csv": b"", "card.yaml": b""}), "'..' in path"),
        ("abs.zip", _zip({"/etc/cron.d/x": b"x"}), "absolute path"),
        ("link.zip", _zip({"card.yaml": b""}, {"labels.csv": "/etc/passwd"}), "symbolic link"),
        ("link.tar.gz", _tar_with_link(), "symbolic link"),
        ("bomb.zip", _zip({"labels.csv": b"0" * 3_000_000, "card.yaml": b""}), "more than the limit"),
        ("junk.zip", b"this is not a zip file", "not a readable zip"),
        ("nolabels.zip", _zip({"images/a.png": b"x"}), "no labels.csv"),
        ("bundle.exe", b"MZ", "must be a .zip or .tar.gz"),
    ],
)
def test_hostile_bundle_is_400_naming_the_cause(service, name, data, cause):
    config, host, c = service
    host.settings = host.settings.model_copy(
        update={"limits": host.settings.limits.model_copy(update={"max_unpacked_bytes": 1_000_000})}
    )
    token = add_team(config, "alpha")
    r = submit(c, token, "synthetic", name, data)
    assert r.status_code == 400, r.text
    text = r.json()["detail"] + " ".join(r.json().get("problems", []))
    assert cause in text and name in text
    assert "storage" not in text  # our copy's path is never shown
    with host.sessions() as s:
        assert s.query(db.Submission).count() == 0
    assert list(host.uploads.iterdir()) == []


def test_bad_predictions_are_400_with_every_problem(service):
    config, host, c = service
    token = add_team(config, "alpha")
    df = pd.read_csv(io.BytesIO(predictions_csv(config)))
    bad = df.iloc[3:].copy()
    bad.loc[bad.index[0], "case_id"] = "not-a-case"
    bad.loc[bad.index[1], "prob_disc"] = 1.7
    r = submit(c, token, "predictions", "p.csv", bad.to_csv(index=False).encode())
    assert r.status_code == 400
    problems = r.json()["detail"] + " | ".join(r.json()["problems"])
    assert "row(s) 1: not an evaluation case of this board" in problems
    # the file's second data row holds prob_disc 1.7: named by its row number, never by an id
    assert "row 2: a probability is above 1" in problems
    assert "probabilities do not sum to 1" in problems
    assert "not-a-case" not in problems and "case_id '" not in problems
    assert sum(p.startswith("row 2") for p in r.json()["problems"]) == 2  # no other row is blamed
    r = submit(c, token, "predictions", "p.csv", df.iloc[3:].to_csv(index=False).encode())
    assert r.status_code == 400 and "3 of the" in " ".join(r.json()["problems"])  # 3 cases not predicted
    r = submit(c, token, "predictions", "p.csv", b"\xff\xfe\x00garbage")
    assert r.status_code == 400
    r = submit(c, token, "predictions", "big.csv", b"x" * 2_100_000)
    assert r.status_code == 413


def test_result_is_written_once_and_only_by_the_lease_holder(service):
    config, host, c = service
    token = add_team(config, "alpha")
    sid = submit(c, token, "predictions", "p.csv", predictions_csv(config)).json()["id"]
    first = db.claim(host.engine, "w1", lease_s=0.01, max_attempts=3)
    assert first == sid
    import time

    time.sleep(0.05)  # w1's lease expires: w2 takes the job over
    assert db.claim(host.engine, "w2", lease_s=30, max_attempts=3) == sid
    sc = {
        "public": dict(
            metric="m", higher_is_better=True, value=0.5, ci_low=0.4, ci_high=0.6, n_cases=3, n_patients=2
        )
    }
    assert not db.finish(host.engine, sid, "w1", scores=sc, summary=None)  # the late worker writes nothing
    assert not db.heartbeat(host.engine, sid, "w1", 30)
    assert db.finish(host.engine, sid, "w2", scores=sc, summary=None)
    assert not db.finish(host.engine, sid, "w2", scores=sc, summary=None)  # and nothing twice
    with host.sessions() as s:
        assert s.query(db.Score).filter_by(submission_id=sid).count() == 1
        assert s.get(db.Submission, sid).attempts == 2
    assert db.claim(host.engine, "w3", lease_s=30, max_attempts=3) is None


def test_a_job_whose_workers_keep_dying_fails_with_a_reason(service):
    config, host, c = service
    token = add_team(config, "alpha")
    sid = submit(c, token, "predictions", "p.csv", predictions_csv(config)).json()["id"]
    import time

    for i in range(2):
        assert db.claim(host.engine, f"w{i}", lease_s=0.01, max_attempts=2) == sid
        time.sleep(0.05)
    assert db.claim(host.engine, "w9", lease_s=30, max_attempts=2) is None
    body = c.get(f"/api/submissions/{sid}", headers=auth(token)).json()
    assert body["status"] == "failed" and "stopped 2 times" in body["reason"]


def test_synthetic_bundle_is_trained_audited_and_scored(service):
    config, host, c = service
    token = add_team(config, "alpha")
    r = submit(c, token, "synthetic", "shapes.zip", synthetic_bundle())
    assert r.status_code == 202, r.text
    assert drain(host) == 1
    body = c.get(f"/api/submissions/{r.json()['id']}", headers=auth(token)).json()
    assert body["status"] == "scored", body["reason"]
    assert 0 <= body["score"]["value"] <= 1
    d = body["details"]
    assert d["generator"] == "shapes" and d["regime"] == "synthetic"
    assert 0 <= d["privacy"]["memorization_rate"] <= 1 and isinstance(d["privacy"]["flagged"], bool)
    # Scored under the board's spec, ranked by its eligibility checks, with the model audit's aggregates only.
    assert d["spec"]["primary"] == host.task.metrics.primary and d["spec"]["task"]["name"] == host.task.name
    assert d["excluded"] is None or isinstance(d["excluded"], str)
    mp = d["model_privacy"]
    assert mp is not None
    if "arms" in mp:
        for arm in mp["arms"]:
            assert set(arm) <= {
                "generator", "regime", "backbone", "n_members", "n_nonmembers", "calibrated", "metrics",
                "auroc_diff_vs_real", "subgroups",
            }  # fmt: skip
    else:
        assert mp["status"] == "not run" and "/" not in mp["reason"]
    rec = (host.records / f"{body['id']}.json").read_text()
    assert not leaked(rec, c.secrets)
    assert not list(host.work.iterdir())  # the work folder (real predictions, audit pairs) is removed


def test_a_bundle_the_importer_rejects_fails_with_the_reason_shown(service):
    config, host, c = service
    token = add_team(config, "alpha")
    bad = _zip(
        {
            "labels.csv": b"image,label\nmissing.png,disc\n",
            "card.yaml": b"name: g\nversion: '1'\ntraining: {sites: [s1]}\n",
        }
    )
    sid = submit(c, token, "synthetic", "bad.zip", bad).json()["id"]
    drain(host)
    body = c.get(f"/api/submissions/{sid}", headers=auth(token)).json()
    assert body["status"] == "failed" and "missing.png" in body["reason"]
    assert "<host>" in body["reason"] or "storage" not in body["reason"]


def test_other_teams_submissions_are_not_visible(service):
    config, host, c = service
    a, b = add_team(config, "alpha"), add_team(config, "beta")
    sid = submit(c, a, "predictions", "p.csv", predictions_csv(config)).json()["id"]
    assert c.get(f"/api/submissions/{sid}", headers=auth(b)).status_code == 404
    assert c.get("/api/submissions", headers=auth(b)).json() == []
    assert [s["id"] for s in c.get("/api/submissions", headers=auth(a)).json()] == [sid]


def test_hiding_host_paths_leaves_ids_alone_whoever_holds_them(service):
    """Host paths are hidden; ids are not touched: hiding only those the host holds would answer a guess."""
    config, host, c = service
    cid = host.key.df["case_id"].iloc[0]
    text = host.hide_paths(f"case {cid} and case {'q' * len(cid)} at {host.settings.real_manifest} failed")
    assert str(host.settings.real_manifest) not in text and "<host>" in text
    assert cid in text and "q" * len(cid) in text


def test_host_commands_set_up_a_service(tmp_path, capsys):
    from bench.cli import main

    config = make_service(tmp_path / "a")
    key = load_settings(config).answer_key
    key.unlink()
    assert main(["host", "init", "--config", str(config)]) == 0
    assert key.is_file() and "wrote answer key" in capsys.readouterr().out
    assert main(["host", "team-add", "gamma", "--config", str(config)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith(db.TOKEN_PREFIX)
    assert main(["host", "team-add", "gamma", "--config", str(config)]) == 2  # names are unique
    assert main(["host", "teams", "--config", str(config)]) == 0
    assert f"gamma: {token[:12]}..." in capsys.readouterr().out
    assert main(["host", "phase-open", "dev", "--config", str(config)]) == 0
    assert main(["host", "phase-open", "dev2", "--config", str(config)]) == 2  # one open phase at a time
    assert main(["host", "phase-close", "--config", str(config)]) == 0
    assert main(["host", "token-revoke", token[:12], "--config", str(config)]) == 0
    assert main(["submit", str(config)]) == 2  # neither --leaderboard nor --server
    assert "--server URL" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_loops_on_a_local_ray_cluster_score_every_submission(tmp_path):
    ray = pytest.importorskip("ray")
    from bench.service.worker import run_on_ray

    config = make_service(tmp_path, None)
    settings = load_settings(config)
    host = Host(settings)
    c = Checked(create_app(settings, host), secrets_of(config))
    tokens = [add_team(config, name) for name in ("alpha", "beta", "gamma")]
    ids = []
    for k, token in enumerate(tokens):
        r = submit(c, token, "predictions", "preds.csv", predictions_csv(config, skill=1.0 + k))
        assert r.status_code == 202, r.text
        ids.append((token, r.json()["id"]))
    try:
        assert run_on_ray(config, 2, None, idle_exit=True) == len(ids)
    finally:
        ray.shutdown()
    for token, sid in ids:
        body = c.get(f"/api/submissions/{sid}", headers=auth(token)).json()
        assert body["status"] == "scored" and body["attempts"] == 1, body
    with host.sessions() as s:
        assert s.query(db.Score).count() == 2 * len(ids)  # one score per part, written once
    host.dispose()


# -- scoring against the answer key, without the API ----------------------------------------------------------------


def _key_and_predictions(seed: int, patients_per_site: int = 30):
    """A key (two internal test sites, one external; a quarter of the patients private) and noisy predictions."""
    task = Task.model_validate(TINY_TASK)
    rng = np.random.default_rng(seed)
    rows = []
    for site, split in (("s1", "test"), ("s2", "test"), ("x1", "external")):
        for p in range(patients_per_site):
            label = task.classes[p % len(task.classes)]  # every class in every part and split
            sex, age = rng.choice(["F", "M"]), rng.choice(["<50", ">=50"])
            for k in range(int(rng.integers(1, 4))):
                rows.append(
                    dict(
                        case_id=f"c-{site}-{p}-{k}",
                        patient_id=f"p-{site}-{p}",
                        label=label,
                        site=site,
                        split=split,
                        part="private" if p % 4 == 0 else "public",
                        sex=sex,
                        age_group=age,
                    )
                )
    key = AnswerKey.from_frame(pd.DataFrame(rows), ["sex", "age_group"])
    logits = rng.normal(0, 1, (len(key.df), len(task.classes)))
    logits[np.arange(len(key.df)), key.df["label"].map(task.classes.index).to_numpy()] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    preds = pd.DataFrame(
        {"case_id": key.df["case_id"], **{f"prob_{c}": p[:, i] for i, c in enumerate(task.classes)}}
    )
    return key, preds.sample(frac=1.0, random_state=seed).reset_index(drop=True), task


def test_hosted_score_is_the_metric_tables_overall_row_on_the_external_split():
    key, preds, task = _key_and_predictions(seed=5)
    got = score_parts(key, preds, task, ScoringSpec.of(task, n_boot=200, seed=3))
    for part in ("public", "private"):
        # the reference: a plain merge, other run-key values, and the engine's defaults (subgroups, permutations)
        ref = key.df[key.df["part"] == part].drop(columns="part").rename(columns={"label": "y_true"})
        ref = ref.merge(preds, on="case_id").assign(generator="g", regime="r", seed=7, backbone="b")
        table = evaluate_predictions(ref, task, n_boot=200, seed=3)
        row = table[
            (table["metric"] == task.metrics.primary)
            & (table["scope"] == "overall")
            & (table["split"] == "external")
        ].iloc[0]
        assert row["status"] == "ok"
        s = got[part]
        assert s["metric"] == task.metrics.primary and s["higher_is_better"] is True
        for k in ("value", "ci_low", "ci_high"):
            assert s[k] == pytest.approx(float(row[k]), abs=1e-12), (part, k)
        assert s["ci_low"] < s["value"] < s["ci_high"]
        ext = ref[ref["split"] == "external"]
        assert (s["n_cases"], s["n_patients"]) == (len(ext), ext["patient_id"].nunique())
        assert s["n_cases"] == int(row["n_cases"]) and s["n_patients"] == int(row["n_patients"])


def test_hosted_value_is_scikit_learns_macro_one_vs_rest_auroc():
    from sklearn.metrics import roc_auc_score

    key, preds, task = _key_and_predictions(seed=11)
    got = score_parts(key, preds, task, ScoringSpec.of(task, n_boot=20, seed=0))
    j = key.df.merge(preds, on="case_id")
    for part in ("public", "private"):
        ext = j[(j["part"] == part) & (j["split"] == "external")]
        want = roc_auc_score(
            ext["label"].map(
                task.classes.index
            ),  # codes in task order: labels must be sorted for scikit-learn
            ext[[f"prob_{c}" for c in task.classes]].to_numpy(),
            multi_class="ovr",
            average="macro",
            labels=list(range(len(task.classes))),
        )
        assert got[part]["value"] == pytest.approx(want, abs=1e-12), part


def test_a_predictions_file_holding_several_runs_is_rejected_before_scoring():
    key, preds, task = _key_and_predictions(seed=2, patients_per_site=6)
    two = pd.concat([preds.assign(seed=0), preds.assign(seed=1)], ignore_index=True)
    problems = validate_predictions(key, two, task)
    n = len(preds)
    assert any(f"and {n - 5} more: a case predicted more than once" in p for p in problems), problems
    assert validate_predictions(key, preds.assign(seed=0), task) == []


def test_a_part_without_external_cases_has_no_score_rather_than_a_test_split_one():
    key, preds, task = _key_and_predictions(seed=3, patients_per_site=12)
    df = key.df.copy()
    df.loc[df["split"] == "external", "part"] = "public"
    got = score_parts(
        AnswerKey.from_frame(df, list(key.subgroup_columns)),
        preds,
        task,
        ScoringSpec.of(task, n_boot=20, seed=0),
    )
    assert got["private"]["value"] is None and got["private"]["n_cases"] == 0
    assert got["public"]["n_cases"] == int((df["split"] == "external").sum())
