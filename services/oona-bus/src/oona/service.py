"""`python -m <service>` for the fleet's bus-connected services: one start-up path (usage,
logging, bus and settings from the environment, exit codes) so each service only supplies
its settings and its `serve` coroutine.

Exit codes: 0 stopped cleanly, 1 could not start (bus down, port in use, ...), 2 usage or
configuration error (including no OONA_REDIS_URL: a service joins the fleet's bus rather than
starting a private one nobody would publish to)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from oona.errors import BusUnavailable, IncompatibleServer
from oona.settings import BusSettings

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
    bus_settings = BusSettings.from_env()
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
