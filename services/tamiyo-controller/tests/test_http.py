"""HTTP endpoints: a real uvicorn on a free port, with the service's real readiness checks on a
real Redis."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from oona import BusSettings
from oona.connection import client_for
from oona.embedded import free_port
from oona.http import HttpServer, create_app
from tamiyo.service import readiness_checks

Response = tuple[int, str]


def _fetch(port: int, path: str) -> Response:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _get(redis_url: str, path: str, *, resumed: bool = True,
         shutting_down: bool = False) -> Response:
    """Serve Tamiyo's HTTP app on a free port, GET `path`, stop the server."""

    async def body() -> Response:
        loaded, stopping = asyncio.Event(), asyncio.Event()
        if resumed:
            loaded.set()
        if shutting_down:
            stopping.set()
        redis = client_for(BusSettings.from_dsn(redis_url, socket_timeout_s=1.0))
        port = free_port()
        app = create_app("Tamiyo controller", readiness_checks(redis, loaded, stopping))
        server = HttpServer(app, "127.0.0.1",
                            port)
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not serving.done(), "uvicorn exited during startup"
                await asyncio.sleep(0.01)
            return await asyncio.to_thread(_fetch, port, path)
        finally:
            server.should_exit = True
            await serving
            await redis.aclose()

    return asyncio.run(body())


def _unreachable() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_healthz_is_up_without_any_dependency():
    status, body = _get(_unreachable(), "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_ready_when_the_bus_answers_and_state_is_loaded(oona_redis_url):
    status, body = _get(oona_redis_url, "/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True, "checks": {
        "bus": "ok", "state": "ok", "service": "ok"}})


def test_not_ready_before_the_saved_state_is_loaded(oona_redis_url):
    status, body = _get(oona_redis_url, "/readyz", resumed=False)
    assert status == 503 and "not loaded" in json.loads(body)["checks"]["state"]


def test_not_ready_without_the_bus_or_while_shutting_down(oona_redis_url):
    status, body = _get(_unreachable(), "/readyz")
    assert status == 503 and json.loads(body)["checks"]["bus"] != "ok"
    status, body = _get(oona_redis_url, "/readyz", shutting_down=True)
    assert status == 503 and json.loads(body)["checks"]["service"] == "RuntimeError: shutting down"


def test_metrics_exposes_decisions_latency_acks_and_fallbacks():
    status, text = _get(_unreachable(), "/metrics")
    assert status == 200
    for series in ('tamiyo_decisions_total{kind="germinate"}', "tamiyo_decision_seconds_bucket",
                   'tamiyo_acks_total{reason="REFUSED_TRANSITION"}',
                   "tamiyo_karn_fallbacks_total", "tamiyo_command_retries_total",
                   "tamiyo_commands_abandoned_total", "tamiyo_jobs", "tamiyo_leased_jobs"):
        assert series in text, series
