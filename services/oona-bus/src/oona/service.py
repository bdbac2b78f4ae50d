"""`python -m <service>` for the fleet's bus-connected services: one start-up path (usage,
logging, bus and settings from the environment, exit codes) so each service only supplies
its settings and its `serve` coroutine.

Exit codes: 0 stopped cleanly, 1 could not start (bus down, port in use, ...), 2 usage or
configuration error (including no OONA_REDIS_URL: a service joins the fleet's bus rather than
starting a private one nobody would publish to)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc

from oona.errors import BusUnavailable, IncompatibleServer
from oona.settings import BusSettings

if TYPE_CHECKING:
    from oona.http import HttpServer

S = TypeVar("S")

NO_BUS = """\
{name}: OONA_REDIS_URL is not set, so there is no bus to {purpose}.
Start the embedded broker in another terminal and export the URL it prints:

    python -m oona serve-embedded          # prints OONA_REDIS_URL=redis://127.0.0.1:PORT/0
    export OONA_REDIS_URL=redis://127.0.0.1:PORT/0

or point OONA_REDIS_URL at any Redis >= 6.2."""


def run_service(name: str, doc: str, purpose: str, load_settings: Callable[[], S],
                serve: Callable[[S, BusSettings], Coroutine[Any, Any, None]],
                argv: list[str] | None = None,
                fatal: tuple[type[BaseException], ...] = ()) -> int:
    """`purpose`: what the bus is for, e.g. "read field reports from". `fatal`: the service's
    own start-up errors, reported like a bus that cannot be reached."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(doc + "\nConfigured by environment variables only; see the README.",
              file=sys.stderr)
        return 0 if args[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        bus_settings = BusSettings.from_env()
    except ValueError as exc:  # a bad OONA_* value or *_FILE: one line, like the service's own
        print(f"{name}: bad configuration: {exc}", file=sys.stderr)
        return 2
    if bus_settings.url is None:
        print(NO_BUS.format(name=name, purpose=purpose), file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except ValueError as exc:
        print(f"{name}: bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings, bus_settings))
    except (BusUnavailable, IncompatibleServer, OSError, *fatal) as exc:
        logging.getLogger(name).error("cannot start: %s", exc)
        return 1
    return 0


def start_grpc_server(add_servicer: Callable[[Any, grpc.Server], None], servicer: object,
                      host: str, port: int, *, name: str, max_workers: int = 8
                      ) -> tuple[grpc.Server, int]:
    """Start a service's gRPC server (`add_servicer`: the generated add_*Servicer_to_server);
    returns it and the port it bound (useful when `port` is 0)."""
    # No SO_REUSEPORT (grpcio's default on Linux): a second instance on the same port must fail
    # to start rather than silently share the port.
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix=f"{name}-grpc"),
                         options=[("grpc.so_reuseport", 0)])
    add_servicer(servicer, server)
    try:
        bound: int = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpcio's way to say the bind failed
        raise OSError(f"gRPC could not bind {host}:{port} (in use?)") from exc
    if bound == 0:  # older grpcio reports a failed bind this way
        raise OSError(f"gRPC could not bind {host}:{port} (in use?)")
    server.start()
    return server, bound


class _Worker(Protocol):
    async def run(self) -> None: ...

    def stop(self) -> None: ...


async def serve_until_stopped(worker: _Worker, http: HttpServer, http_socket: socket.socket,
                              grpc_server: grpc.Server, stopping: asyncio.Event,
                              shutdown_grace_s: float) -> None:
    """Run a bus worker and the HTTP endpoints until SIGTERM/SIGINT (or the worker ends: a
    worker that dies, not a transient Redis error it rides out, is fatal), then drain: the
    worker first, then in-flight gRPC calls within `shutdown_grace_s`, then HTTP."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        async with asyncio.TaskGroup() as tasks:
            worker_task = tasks.create_task(worker.run())
            tasks.create_task(http.serve(sockets=[http_socket]))
            await asyncio.wait({worker_task, tasks.create_task(stopping.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            stopping.set()
            logging.getLogger(__name__).info(
                "shutting down: draining the worker and in-flight calls")
            worker.stop()
            await worker_task
            await asyncio.to_thread(grpc_server.stop(shutdown_grace_s).wait)
            http.should_exit = True
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        grpc_server.stop(None)
