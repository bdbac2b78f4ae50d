"""`python -m karn`: the worker, the gRPC API and the HTTP endpoints in one process
(`python -m karn verdict --help`: the rollout's verdict from the stored reports).

Start order: database (migrated), bus, then the servers. SIGTERM/SIGINT: readiness fails at once,
the worker stops taking reports and finishes the batch in hand, gRPC drains in-flight calls, HTTP
stops, the database closes; each step bounded by `shutdown_grace_s`.

Secure by default: it refuses to start without OONA_SIGNING_KEY (field reports must be signed
with it) and KARN_API_TOKEN (every gRPC call must carry it), each also readable from a `*_FILE`,
unless OONA_INSECURE=1 (one warning).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from importlib.metadata import version

from oona import Bus, BusSettings, ConsumerConfig, open_bus
from oona.flags import FlagStore, sync_client
from oona.http import HttpServer, ReadinessCheck, create_app
from oona.service import run_service, serve_until_stopped
from oona.settings import require_secrets
from redis.asyncio import Redis
from sqlalchemy.exc import OperationalError

from karn import metrics
from karn.grpc_api import KarnServicer, start_grpc_server
from karn.recommender import BlueprintRecommender
from karn.search import BlueprintSearch, BlueprintSearchLoop, SearchConfig, SearchingWorker
from karn.settings import KarnSettings
from karn.store import FieldReportStore
from karn.worker import FieldReportWorker

log = logging.getLogger("karn")

_DB_CONNECT_ATTEMPTS = 5
_DB_CONNECT_BACKOFF_S = 0.5

def open_store(settings: KarnSettings) -> FieldReportStore:
    """Connect and migrate, retrying a database that is not up yet a bounded number of times."""
    delay = _DB_CONNECT_BACKOFF_S
    for attempt in range(1, _DB_CONNECT_ATTEMPTS + 1):
        try:
            return FieldReportStore.open(settings.database_url)
        except OperationalError as exc:
            if attempt == _DB_CONNECT_ATTEMPTS:
                raise
            log.warning("database %s not ready (attempt %d/%d): %s",
                        settings.redacted_database_url(), attempt, _DB_CONNECT_ATTEMPTS, exc.orig)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def readiness_checks(store: FieldReportStore, redis: Redis,
                     stopping: asyncio.Event) -> dict[str, ReadinessCheck]:
    """Ready: the database answers, Redis answers PING, and the service is not shutting down
    (so a load balancer stops routing to it before it stops serving)."""

    async def database() -> None:
        await asyncio.to_thread(store.ping)

    async def bus() -> None:
        await redis.ping()

    async def service() -> None:
        if stopping.is_set():
            raise RuntimeError("shutting down")

    return {"database": database, "bus": bus, "service": service}


async def serve(settings: KarnSettings, bus_settings: BusSettings) -> None:
    store = await asyncio.to_thread(open_store, settings)
    log.info("database %s ready (%d field reports)", settings.redacted_database_url(),
             await asyncio.to_thread(store.report_count))
    try:
        async with open_bus(bus_settings) as bus:
            await bus.check_persistence()  # one warning at start when a restart would lose
            await _serve_with(settings, store, bus)
    finally:
        store.close()
        log.info("database closed")


async def _serve_with(settings: KarnSettings, store: FieldReportStore, bus: Bus) -> None:
    rng = random.Random(settings.random_seed)
    recommender = BlueprintRecommender(store, settings.cost_penalty, rng)
    worker = FieldReportWorker(bus, store, settings.consumer_name, ConsumerConfig(
        max_deliveries=settings.max_deliveries, shutdown_grace_s=settings.shutdown_grace_s,
        reclaim_idle_ms=settings.reclaim_idle_ms,
        reclaim_interval_s=settings.reclaim_interval_s))
    stopping = asyncio.Event()
    app = create_app("Karn feedback", readiness_checks(store, bus.redis, stopping))
    http = HttpServer(app, settings.bind_host, settings.http_port)
    # Bound here, not inside uvicorn: a port in use is then an OSError before anything runs
    # (uvicorn would sys.exit from inside its task).
    http_socket = socket.create_server((settings.bind_host, settings.http_port))
    try:
        grpc_server, grpc_port = start_grpc_server(KarnServicer(store, recommender),
                                                   settings.bind_host, settings.grpc_port,
                                                   token=settings.api_token)
    except BaseException:
        http_socket.close()
        raise
    log.info("karn %s serving: gRPC %s:%d, HTTP %s:%d, consuming %s as %s/%s, bus %s, "
             "signing %s, API token %s", version("karn-feedback"), settings.bind_host, grpc_port,
             settings.bind_host, settings.http_port, worker.consumer.stream,
             worker.consumer.group, worker.consumer.name, bus.settings.redacted_url(),
             "on" if bus.settings.signing_key else "OFF", "on" if settings.api_token else "OFF")
    # The rollout's gauges (karn.metrics.RolloutMetrics): from the database and the flags.
    flags = await asyncio.to_thread(lambda: FlagStore(sync_client(bus.settings)))
    await asyncio.to_thread(metrics.ROLLOUT.start, store, flags)
    serving = worker if not settings.search_interval_s else SearchingWorker(
        worker, BlueprintSearchLoop(bus, BlueprintSearch(store, SearchConfig(
            seed=settings.random_seed, max_hidden=settings.search_max_hidden,
            max_rank=settings.search_max_rank)), settings.search_interval_s,
            settings.consumer_name))
    try:
        await serve_until_stopped(serving, http, http_socket, grpc_server, stopping,
                                  settings.shutdown_grace_s)
    finally:
        metrics.ROLLOUT.stop()
        flags.client.close()
    log.info("stopped")


def load_settings() -> KarnSettings:
    """KarnSettings.from_env, refused (MissingSecret, a ValueError) without the fleet's secrets."""
    settings = KarnSettings.from_env()
    bus = BusSettings.from_env()
    require_secrets("karn", {"OONA_SIGNING_KEY": bus.signing_key,
                             "KARN_API_TOKEN": settings.api_token}, insecure=bus.insecure)
    return settings


def main(argv: list[str] | None = None) -> int:
    return run_service("karn", __doc__, "read field reports from", load_settings, serve, argv,
                       fatal=(OperationalError,))
