"""Opening the bus: one Redis client (and the embedded broker when no URL is configured)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from oona.connection import Client, connect
from oona.consumer import Consumer, ConsumerConfig, Handler
from oona.embedded import EmbeddedRedis
from oona.publisher import Publisher
from oona.settings import BusSettings


@dataclass(frozen=True)
class Bus:
    """A connected bus. Create publishers and consumers from it; they share its client."""

    redis: Client
    settings: BusSettings
    embedded: EmbeddedRedis | None = None

    def publisher(self, sender_id: str) -> Publisher:
        return Publisher(self.redis, self.settings, sender_id)

    def consumer(self, stream: str, group: str, name: str, handlers: Mapping[type, Handler],
                 config: ConsumerConfig | None = None) -> Consumer:
        return Consumer(self.redis, self.settings, stream=stream, group=group, name=name,
                        handlers=handlers, config=config)


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
