"""HTTP endpoints every fleet service serves to operators: liveness, readiness (each named
check must pass) and Prometheus metrics, on uvicorn inside the service's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

# A readiness check returns normally when its dependency is usable and raises otherwise.
ReadinessCheck = Callable[[], Awaitable[None]]

_CHECK_TIMEOUT_S = 2.0


def create_app(title: str, checks: Mapping[str, ReadinessCheck]) -> FastAPI:
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        # Alive means the process serves HTTP; dependencies are /readyz's business.
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        results = dict(zip(checks, await asyncio.gather(*(_run(c) for c in checks.values())),
                           strict=True))
        ready = all(result == "ok" for result in results.values())
        return JSONResponse({"ready": ready, "checks": results}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _run(check: ReadinessCheck) -> str:
    try:
        await asyncio.wait_for(check(), _CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"timed out after {_CHECK_TIMEOUT_S}s"
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready"; the text says why
        return f"{type(exc).__name__}: {exc}"
    return "ok"


class HttpServer(uvicorn.Server):
    """uvicorn inside a service's event loop. Signals belong to the service (it stops its worker
    and gRPC too); uvicorn's own handlers would swallow SIGTERM."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                        lifespan="off", access_log=False))

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
