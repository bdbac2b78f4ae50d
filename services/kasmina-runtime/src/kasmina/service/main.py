"""`python -m kasmina serve`: the runtime service. gRPC (KASMINA_GRPC_PORT, default 50051) takes
and runs training jobs; HTTP (KASMINA_HTTP_PORT, default 8081) serves /healthz, /readyz and
/metrics. The bus is OONA_REDIS_URL (required: the runtime joins the fleet's bus). Limits and
the other settings: `ServiceSettings`. At start, the jobs a killed runtime left unfinished in
KASMINA_CHECKPOINT_DIR are resumed (resume_on_restart) or published failed. SIGTERM or SIGINT:
stop taking jobs, cancel running ones at their next epoch boundary, wait for them a bounded
time, then exit. No log line carries a password (`logs.RedactingFilter`)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import oona
import redis
import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import logs
from .grpc_api import start_grpc_server
from .jobs import JobManager
from .settings import ServiceSettings

log = logging.getLogger("kasmina.service")
SHUTDOWN_GRACE_S = 30.0


def create_app(bus_url: str, stopping: threading.Event) -> FastAPI:
    app = FastAPI(title="Kasmina runtime", docs_url=None, redoc_url=None, openapi_url=None)
    client = redis.Redis.from_url(bus_url, socket_timeout=2)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = {"service": "shutting down" if stopping.is_set() else "ok"}
        try:
            client.ping()
            checks["bus"] = "ok"
        except redis.RedisError as exc:
            checks["bus"] = logs.redact(f"{type(exc).__name__}: {exc}")
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve() -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logs.install()
    bus = oona.BusSettings.from_env()
    if bus.url is None:
        print("kasmina serve: OONA_REDIS_URL is not set. Start the fleet's bus with\n"
              "    python -m oona serve-embedded\nand export the URL it prints.", file=sys.stderr)
        return 2
    try:
        settings = ServiceSettings.from_env()
    except ValueError as exc:
        print(f"kasmina serve: {exc}", file=sys.stderr)
        return 2
    host, http_port = settings.bind_host, settings.http_port
    jobs = JobManager(bus, settings.checkpoint_dir, settings.max_jobs,
                      settings.max_finished_jobs)
    stopping = threading.Event()
    try:
        jobs.recover()
        server, grpc_port = start_grpc_server(jobs, host, settings.grpc_port,
                                              settings.grpc_workers, settings.max_watchers)
    except (OSError, oona.BusUnavailable) as exc:
        log.error("cannot start: %s", exc)
        return 1
    http = uvicorn.Server(uvicorn.Config(create_app(bus.url, stopping), host=host,
                                         port=http_port, log_level="warning", lifespan="off"))
    http.install_signal_handlers = lambda: None  # the service owns SIGTERM
    logs.install()  # uvicorn's Config set up its own handlers
    http_thread = threading.Thread(target=http.run, name="http", daemon=True)
    http_thread.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    log.info("kasmina runtime serving: gRPC %s:%d, HTTP %s:%d, bus %s", host, grpc_port, host,
             http_port, bus.redacted_url())
    stopping.wait()
    log.info("shutting down: no new jobs, cancelling running ones at their next boundary")
    server.stop(grace=5.0)
    jobs.cancel_all("runtime shutting down")
    for job in list(jobs.jobs.values()):
        if job.thread.ident is not None:  # a job recorded failed at start never ran
            job.thread.join(SHUTDOWN_GRACE_S)
    http.should_exit = True
    http_thread.join(5.0)
    log.info("stopped")
    return 0
