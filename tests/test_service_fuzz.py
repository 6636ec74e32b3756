"""The API fuzzed from its own OpenAPI schema (schemathesis): no server error, and no response shows the host's real
data, whether the caller sends a valid token, a wrong one or none.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from service_support import add_team, leaked, make_service, predictions_csv, secrets_of  # noqa: E402

from bench.service.app import create_app  # noqa: E402
from bench.service.host import Host  # noqa: E402
from bench.service.settings import load_settings  # noqa: E402
from bench.service.worker import run_worker  # noqa: E402

STATE: dict = {}


def _schema_only_app():
    """The app's OpenAPI schema needs no data: build it from settings in a scratch folder."""
    import tempfile
    from pathlib import Path

    from bench.service.settings import ServiceSettings

    d = Path(tempfile.mkdtemp(prefix="medsynbench-schema-"))
    st = ServiceSettings(
        database=f"sqlite:///{d}/schema.db",
        storage=d / "storage",
        task="tiny",
        real_manifest=d / "none.parquet",
        id_salt="schema-only",
    )
    return create_app(st).openapi()


schema = schemathesis.openapi.from_dict(_schema_only_app())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server on 127.0.0.1 with one team and one scored submission (content the fuzzer could leak)."""
    import httpx
    from service_support import Server

    tmp = tmp_path_factory.mktemp("fuzz")
    config = make_service(tmp, limits={"quota_submissions": 100000})
    token = add_team(config, "fuzzers")
    with Server(config) as srv:
        r = httpx.post(
            f"{srv.url}/api/submissions",
            headers={"Authorization": f"Bearer {token}"},
            data={"kind": "predictions"},
            files={"file": ("p.csv", predictions_csv(config))},
        )
        assert r.status_code == 202, r.text
        host = Host(load_settings(config))
        run_worker(host, idle_exit=True)
        host.dispose()
        STATE.update(token=token, secrets=secrets_of(config), url=srv.url)
        yield srv


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_fuzz_no_server_error_no_real_data(case, server):
    for headers in (
        None,
        {"Authorization": f"Bearer {STATE['token']}"},
        {"Authorization": "Bearer msb_forged"},
    ):
        response = case.call(base_url=STATE["url"], headers=headers)
        assert response.status_code < 500, (
            f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
        )
        bad = leaked(response.text, STATE["secrets"])
        assert not bad, f"{case.method} {case.formatted_path}: response shows real data {bad[:3]}"
