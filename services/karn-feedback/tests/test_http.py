"""HTTP endpoints: a real uvicorn on a free port, with the service's real readiness checks on a
real database and Redis."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import pytest
from karn.service import readiness_checks
from karn.store import FieldReportStore
from oona import BusSettings
from oona.connection import client_for
from oona.embedded import free_port
from oona.http import HttpServer, create_app

Response = tuple[int, str]


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[FieldReportStore]:
    store = FieldReportStore.open(sqlite_url)
    yield store
    store.close()


@pytest.fixture
def unreachable_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def _fetch(port: int, path: str) -> Response:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _get(store: FieldReportStore, redis_url: str, *paths: str, shutting_down: bool = False,
         during: AbstractContextManager[None] | None = None) -> dict[str, Response]:
    """Serve Karn's HTTP app on a free port, GET `paths` (inside `during`), stop the server."""

    async def body() -> dict[str, Response]:
        stopping = asyncio.Event()
        if shutting_down:
            stopping.set()
        redis = client_for(BusSettings.from_dsn(redis_url, socket_timeout_s=1.0))
        port = free_port()
        app = create_app("Karn feedback", readiness_checks(store, redis, stopping))
        server = HttpServer(app, "127.0.0.1",
                            port)
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not serving.done(), "uvicorn exited during startup"
                await asyncio.sleep(0.01)
            with during or nullcontext():
                return {path: await asyncio.to_thread(_fetch, port, path) for path in paths}
        finally:
            server.should_exit = True
            await serving
            await redis.aclose()

    return asyncio.run(body())


def test_healthz_is_up_without_any_dependency(sqlite_store, unreachable_redis_url):
    status, body = _get(sqlite_store, unreachable_redis_url, "/healthz")["/healthz"]
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_ready_when_database_and_bus_answer(sqlite_store, oona_redis_url):
    status, body = _get(sqlite_store, oona_redis_url, "/readyz")["/readyz"]
    assert status == 200
    assert json.loads(body) == {"ready": True,
                                "checks": {"database": "ok", "bus": "ok", "service": "ok"}}


def test_not_ready_without_the_bus(sqlite_store, unreachable_redis_url):
    status, body = _get(sqlite_store, unreachable_redis_url, "/readyz")["/readyz"]
    checks = json.loads(body)["checks"]
    assert status == 503
    assert checks["database"] == "ok" and checks["bus"] != "ok"


def test_not_ready_without_the_database(sqlite_store, oona_redis_url, database_outage):
    status, body = _get(sqlite_store, oona_redis_url, "/readyz",
                        during=database_outage(sqlite_store))["/readyz"]
    checks = json.loads(body)["checks"]
    assert status == 503
    assert checks["bus"] == "ok" and "OperationalError" in checks["database"]


def test_not_ready_while_shutting_down(sqlite_store, oona_redis_url):
    status, body = _get(sqlite_store, oona_redis_url, "/readyz", shutting_down=True)["/readyz"]
    assert status == 503
    assert json.loads(body)["checks"]["service"] == "RuntimeError: shutting down"


def test_metrics_exposes_karn_and_bus_metrics(sqlite_store, unreachable_redis_url):
    status, text = _get(sqlite_store, unreachable_redis_url, "/metrics")["/metrics"]
    assert status == 200
    assert 'karn_field_reports_stored_total{outcome="ROLLED_BACK"}' in text
    for name in ("karn_field_report_duplicates_total",
                 "karn_store_seconds_bucket", "karn_store_errors_total", "oona_consumed_total"):
        assert name in text
