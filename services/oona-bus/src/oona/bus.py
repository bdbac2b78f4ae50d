"""Opening the bus: one Redis client (and the embedded broker when no URL is configured)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from oona.connection import Client, Persistence, check_persistence, connect
from oona.consumer import Consumer, ConsumerConfig, Handler
from oona.embedded import EmbeddedRedis
from oona.errors import BusUnavailable, IncompatibleServer
from oona.publisher import Publisher
from oona.settings import BusSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bus:
    """A connected bus. Create publishers and consumers from it; they share its client."""

    redis: Client
    settings: BusSettings
    embedded: EmbeddedRedis | None = None

    async def check_persistence(self) -> Persistence:
        """Log (a warning without AOF) and return what the server keeps across a restart; a
        service calls it once at start (see oona.connection.check_persistence)."""
        return await check_persistence(self.redis, self.settings.redacted_url())

    def publisher(self, sender_id: str) -> Publisher:
        return Publisher(self.redis, self.settings, sender_id)

    def consumer(self, stream: str, group: str, name: str, handlers: Mapping[type, Handler],
                 config: ConsumerConfig | None = None) -> Consumer:
        return Consumer(self.redis, self.settings, stream=stream, group=group, name=name,
                        handlers=handlers, config=config)


async def check_bus_persistence(settings: BusSettings) -> Persistence:
    """For a service that holds no bus at start (sync code: `asyncio.run(...)` it): connect,
    `check_persistence`, disconnect. A server it cannot reach is logged and reported unknown,
    never raised: reachability is readiness's business."""
    if settings.url is None:
        raise ValueError("settings.url is None: the embedded broker is configured by oona")
    try:
        redis = await connect(settings)
    except (BusUnavailable, IncompatibleServer) as exc:
        log.warning("cannot check redis persistence: %s", exc)
        return Persistence(aof=None, rdb=None, config_error=f"{type(exc).__name__}: {exc}")
    try:
        return await check_persistence(redis, settings.redacted_url())
    finally:
        await redis.aclose()


@asynccontextmanager
async def open_bus(settings: BusSettings | None = None) -> AsyncIterator[Bus]:
    """Connect to `settings.url` (default: BusSettings.from_env()); with no URL, start an
    embedded redis-server for the lifetime of the context."""
    settings = settings or BusSettings.from_env()
    embedded = None
    if settings.url is None:
        # Starting the server blocks for ~100 ms: keep it off the event loop.
        embedded = await asyncio.to_thread(EmbeddedRedis().start)
        settings = replace(settings, url=embedded.url)
    try:
        redis = await connect(settings)
        try:
            yield Bus(redis, settings, embedded)
        finally:
            await redis.aclose()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.close)
