"""`python -m tamiyo`: the worker, the gRPC Step API and the HTTP endpoints in one process.

Start order: bus, saved state, then the servers. SIGTERM/SIGINT: readiness fails at once, the
worker stops taking messages and finishes the batch in hand, gRPC drains in-flight calls, HTTP
stops; each step bounded by `shutdown_grace_s`.

Secure by default: it refuses to start without OONA_SIGNING_KEY (reports, epoch events and acks
must be signed with it, and its commands are), TAMIYO_API_TOKEN (every Step call must carry it)
and KARN_API_TOKEN (what it sends to Karn), each also readable from a `*_FILE`, unless
OONA_INSECURE=1 (one warning).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from importlib.metadata import version

import redis
from oona import Bus, BusSettings, ConsumerConfig, open_bus
from oona.flags import RedisFlagProvider
from oona.http import HttpServer, ReadinessCheck, create_app
from oona.service import run_service, serve_until_stopped
from oona.settings import read_secret, require_secrets
from redis.asyncio import Redis

from tamiyo.blueprints import GerminationFlags, KarnAdvisor, parse_allow_list
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.grpc_api import TamiyoServicer, start_grpc_server
from tamiyo.lease import JobLeases
from tamiyo.policy import HeuristicPolicy
from tamiyo.settings import TamiyoSettings
from tamiyo.store import StateStore
from tamiyo.worker import ControllerWorker

log = logging.getLogger("tamiyo")

def readiness_checks(redis: Redis, resumed: asyncio.Event,
                     stopping: asyncio.Event) -> dict[str, ReadinessCheck]:
    """Ready: Redis answers PING, the saved state is loaded (deciding before that could repeat
    decisions), and the service is not shutting down."""

    async def bus() -> None:
        await redis.ping()

    async def state() -> None:
        if not resumed.is_set():
            raise RuntimeError("saved state not loaded yet")

    async def service() -> None:
        if stopping.is_set():
            raise RuntimeError("shutting down")

    return {"bus": bus, "state": state, "service": service}


@dataclass(frozen=True)
class Tokens:
    """Tamiyo's own API token (TAMIYO_API_TOKEN) and the one it sends to Karn (KARN_API_TOKEN),
    each or its *_FILE. Read here until TamiyoSettings has fields for them."""

    api: str | None = field(default=None, repr=False)
    karn: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> Tokens:
        return cls(read_secret("TAMIYO_API_TOKEN"), read_secret("KARN_API_TOKEN"))


def load_settings() -> tuple[TamiyoSettings, Tokens]:
    """TamiyoSettings.from_env and the tokens, refused (MissingSecret, a ValueError) without the
    fleet's secrets."""
    settings, tokens, bus = TamiyoSettings.from_env(), Tokens.from_env(), BusSettings.from_env()
    require_secrets("tamiyo", {"OONA_SIGNING_KEY": bus.signing_key, "TAMIYO_API_TOKEN": tokens.api,
                               "KARN_API_TOKEN": tokens.karn}, insecure=bus.insecure)
    return settings, tokens


async def serve(loaded: tuple[TamiyoSettings, Tokens], bus_settings: BusSettings) -> None:
    async with open_bus(bus_settings) as bus:
        await bus.check_persistence()  # one warning at start when a Redis restart would lose
        await _serve_with(*loaded, bus)


async def _serve_with(settings: TamiyoSettings, tokens: Tokens, bus: Bus) -> None:
    flags = None
    if settings.flags:  # reads them once (bounded connection retries), then a watcher thread
        flags = await asyncio.to_thread(GerminationFlags.open, RedisFlagProvider(bus.settings),
                                        settings.default_strategy)
    advisor = KarnAdvisor(settings.karn_address, settings.karn_timeout_s,
                          default_blueprint=settings.default_blueprint,
                          default_strategy=settings.default_strategy,
                          allowed=parse_allow_list(settings.blueprints),
                          token=tokens.karn, flags=flags)
    policy = HeuristicPolicy(settings.policy(), advisor)
    worker = ControllerWorker(
        bus, StateStore(bus.redis, settings.job_retention_s),
        Controller(policy, settings.delivery()), settings.consumer_name,
        leases=JobLeases(bus.redis, settings.replica_id, settings.lease_ms),
        report_grace_s=settings.report_grace_s, tick_s=settings.tick_s,
        config=ConsumerConfig(max_deliveries=settings.max_deliveries,
                              shutdown_grace_s=settings.shutdown_grace_s),
        limits=settings.limits())
    stopping = asyncio.Event()
    app = create_app("Tamiyo controller", readiness_checks(bus.redis, worker.resumed, stopping))
    http = HttpServer(app, settings.bind_host, settings.http_port)
    # Bound here, not inside uvicorn: a port in use is then an OSError before anything runs
    # (uvicorn would sys.exit from inside its task).
    http_socket = socket.create_server((settings.bind_host, settings.http_port))
    try:
        step = TamiyoServicer(Controller(policy, DeliveryConfig(over_bus=False)),
                              settings.limits())
        grpc_server, grpc_port = start_grpc_server(step, settings.bind_host, settings.grpc_port,
                                                   token=tokens.api)
    except BaseException:
        http_socket.close()
        advisor.close()
        if flags is not None:
            flags.close()
        raise
    log.info("tamiyo %s serving: gRPC %s:%d, HTTP %s:%d, consuming as %s in its groups, "
             "replica %s (leases of %d ms), Karn at %s, bus %s, signing %s, API token %s, "
             "flags %s",
             version("tamiyo-controller"), settings.bind_host, grpc_port, settings.bind_host,
             settings.http_port, settings.consumer_name, settings.replica_id, settings.lease_ms,
             settings.karn_address, bus.settings.redacted_url(),
             "on" if bus.settings.signing_key else "OFF", "on" if tokens.api else "OFF",
             "on" if flags is not None else "off")
    try:
        await serve_until_stopped(worker, http, http_socket, grpc_server, stopping,
                                  settings.shutdown_grace_s)
    finally:
        advisor.close()
        if flags is not None:
            flags.close()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    # A Redis user refused the flag keys (TAMIYO_FLAGS=1): a configuration error, said at start.
    return run_service("tamiyo", __doc__, "read health reports from", load_settings, serve,
                       argv, fatal=(redis.exceptions.NoPermissionError,))
