"""`python -m kasmina serve`: the runtime service. gRPC (KASMINA_GRPC_PORT, default 50051) takes
and runs training jobs; HTTP (KASMINA_HTTP_PORT, default 8081) serves /healthz, /readyz and
/metrics. The bus is OONA_REDIS_URL (required: the runtime joins the fleet's bus). Limits and
the other settings: `ServiceSettings`. At start, the jobs a killed runtime left unfinished in
KASMINA_CHECKPOINT_DIR are resumed (resume_on_restart) or published failed. SIGTERM or SIGINT:
stop taking jobs, cancel running ones at their next epoch boundary, wait for them a bounded
time, then exit. No log line carries a password (`logs.RedactingFilter`).

Secure by default: it refuses to start without OONA_SIGNING_KEY (envelopes are signed and
checked with it) and KASMINA_API_TOKEN (every gRPC call must carry it), each also readable from a
`*_FILE`, unless OONA_INSECURE=1 (one warning). /healthz, /readyz and /metrics stay open."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

import oona
import uvicorn
from oona.connection import client_for
from oona.http import ReadinessCheck, create_app
from oona.settings import require_secrets

from . import logs
from .grpc_api import start_grpc_server
from .jobs import JobManager
from .registry import DirectoryInUse
from .settings import ServiceSettings

log = logging.getLogger("kasmina.service")
SHUTDOWN_GRACE_S = 30.0


class NotReady(Exception):
    """A readiness check's failure, its text already free of secrets."""


def readiness_checks(bus: oona.BusSettings, stopping: threading.Event
                     ) -> dict[str, ReadinessCheck]:
    """Ready: not shutting down, Redis answers PING (through the same client options as the
    bus, so a password, an ACL user and TLS from OONA_REDIS_* count), and every outbox of this
    process can publish (oona.publishing_problems)."""
    client = client_for(bus)

    async def service() -> None:
        if stopping.is_set():
            raise NotReady("shutting down")

    async def bus_ping() -> None:
        try:
            await client.ping()
        except Exception as exc:  # noqa: BLE001 - any failure is "not ready"; the text says why
            raise NotReady(logs.redact(f"{type(exc).__name__}: {exc}")) from None

    async def publishing() -> None:
        problems = oona.publishing_problems()
        if problems:
            raise NotReady(logs.redact("; ".join(f"{sender}: {error}" for sender, error
                                                 in sorted(problems.items()))))

    return {"service": service, "bus": bus_ping, "publishing": publishing}


def serve() -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logs.install()
    try:
        bus = oona.BusSettings.from_env()
        if bus.url is None:
            print("kasmina serve: OONA_REDIS_URL is not set. Start the fleet's bus with\n"
                  "    python -m oona serve-embedded\nand export the URL it prints.",
                  file=sys.stderr)
            return 2
        settings = ServiceSettings.from_env()
        require_secrets("kasmina serve", {"OONA_SIGNING_KEY": bus.signing_key,
                                          "KASMINA_API_TOKEN": settings.api_token},
                        insecure=bus.insecure)
    except ValueError as exc:
        print(f"kasmina serve: {exc}", file=sys.stderr)
        return 2
    asyncio.run(oona.check_bus_persistence(bus))  # one warning at start without AOF
    host, http_port = settings.bind_host, settings.http_port
    try:
        jobs = JobManager(bus, settings.checkpoint_dir, settings.max_jobs,
                          settings.max_finished_jobs)
    except DirectoryInUse as exc:
        print(f"kasmina serve: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()
    try:
        jobs.recover()
        server, grpc_port = start_grpc_server(jobs, host, settings.grpc_port,
                                              settings.grpc_workers, settings.max_watchers,
                                              token=settings.api_token)
    except (OSError, oona.BusUnavailable) as exc:
        log.error("cannot start: %s", exc)
        return 1
    app = create_app("Kasmina runtime", readiness_checks(bus, stopping))
    http = uvicorn.Server(uvicorn.Config(app, host=host, port=http_port, log_level="warning",
                                         lifespan="off"))
    http.install_signal_handlers = lambda: None  # the service owns SIGTERM
    logs.install()  # uvicorn's Config set up its own handlers
    http_thread = threading.Thread(target=http.run, name="http", daemon=True)
    http_thread.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    log.info("kasmina runtime serving: gRPC %s:%d, HTTP %s:%d, bus %s, signing %s, API token %s",
             host, grpc_port, host, http_port, bus.redacted_url(),
             "on" if bus.signing_key else "OFF", "on" if settings.api_token else "OFF")
    stopping.wait()
    log.info("shutting down: no new jobs, cancelling running ones at their next boundary")
    server.stop(grace=5.0)
    jobs.cancel_all("runtime shutting down")
    for job in list(jobs.jobs.values()):
        if job.thread.ident is not None:  # a job recorded failed at start never ran
            job.thread.join(SHUTDOWN_GRACE_S)
    http.should_exit = True
    http_thread.join(5.0)
    jobs.registry.close()
    log.info("stopped")
    return 0
