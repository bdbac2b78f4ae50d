"""Fault tests of the Oona bus with real processes and a real Redis.

This file is also the consumer worker the tests start (`python test_oona_faults.py worker ...`):
its handler records each message's effect in Redis (a set, so effects are idempotent) and how
often it ran, so a test can tell "lost" from "handled twice".
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from oona import BusSettings, ConsumerConfig, Delivery, EmbeddedRedis, OutboxThread, open_bus
from oona.contracts import EpochEvent

pytestmark = pytest.mark.integration


async def _worker(url: str, stream: str, run: str, name: str, reclaim_idle_ms: int,
                  handler_sleep_s: float) -> None:
    async with open_bus(BusSettings.from_dsn(url, connect_attempts=20)) as bus:
        async def record(msg: EpochEvent, delivery: Delivery) -> None:
            await asyncio.sleep(handler_sleep_s)
            async with bus.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(f"{run}:effects", msg.epoch)
                pipe.hincrby(f"{run}:calls", str(msg.epoch), 1)
                pipe.hset(f"{run}:deliveries", str(msg.epoch), delivery.delivery_count)
                await pipe.execute()

        config = ConsumerConfig(batch_size=50, block_ms=100, max_deliveries=20,
                                reclaim_idle_ms=reclaim_idle_ms, reclaim_interval_s=0.1,
                                retry_delay_s=0.05, reconnect_backoff_max_s=0.5)
        consumer = bus.consumer(stream, "workers", name, {EpochEvent: record}, config)
        await consumer.ensure_group()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, consumer.stop)
        print("ready", flush=True)
        await consumer.run()


def _start_worker(url: str, stream: str, run: str, name: str, log_dir: Path, *,
                  reclaim_idle_ms: int = 60_000, handler_sleep_s: float = 0.0
                  ) -> subprocess.Popen[str]:
    log = (log_dir / f"{name}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, __file__, "worker", url, stream, run, name, str(reclaim_idle_ms),
         str(handler_sleep_s)], stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready", (log_dir / f"{name}.log").read_text()
    process.stdout.close()
    return process


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _publish(url: str, stream: str, count: int) -> None:
    async def body() -> None:
        async with open_bus(BusSettings.from_dsn(url)) as bus:
            await bus.publisher("test").publish_many(
                [(stream, EpochEvent(job_id="j", epoch=i)) for i in range(count)])

    asyncio.run(body())


@pytest.fixture
def run_id(oona_redis_url: str) -> Iterator[str]:
    """Prefix of every key a test makes; they are deleted afterwards (a shared server stays
    clean)."""
    run = f"faults-{uuid.uuid4().hex[:10]}"
    yield run
    with redis.Redis.from_url(oona_redis_url) as r:
        for pattern in (f"{run}*", f"{{{run}*"):
            for key in r.scan_iter(match=pattern):
                r.delete(key)


def test_consumer_killed_with_messages_in_flight_loses_none(oona_redis_url, run_id, tmp_path):
    stream, total = f"{run_id}.stream", 600
    _publish(oona_redis_url, stream, total)
    with redis.Redis.from_url(oona_redis_url) as r:
        first = _start_worker(oona_redis_url, stream, run_id, "first", tmp_path,
                              handler_sleep_s=0.005)
        # Killed while a batch is in hand: between a batch's acks and the next read nothing is
        # pending (the kill once landed there: in_flight 0, nothing left to reclaim).
        _wait_for(lambda: r.scard(f"{run_id}:effects") >= 100
                  and r.xpending(stream, "workers")["pending"] > 0, 30, "first worker progress")
        first.send_signal(signal.SIGKILL)
        first.wait()
        in_flight = r.xpending(stream, "workers")["pending"]
        assert in_flight > 0, "the kill should leave delivered, unacknowledged messages"

        second = _start_worker(oona_redis_url, stream, run_id, "second", tmp_path,
                               reclaim_idle_ms=300)
        try:
            _wait_for(lambda: r.scard(f"{run_id}:effects") == total
                      and r.xpending(stream, "workers")["pending"] == 0, 60, "all handled")
        finally:
            second.terminate()
            assert second.wait(15) == 0
        calls = {int(k): int(v) for k, v in r.hgetall(f"{run_id}:calls").items()}
        deliveries = {int(k): int(v) for k, v in r.hgetall(f"{run_id}:deliveries").items()}
        assert set(calls) == set(range(total))
        # Only messages in flight at the kill may have run twice; they came back reclaimed.
        twice = [epoch for epoch, n in calls.items() if n > 1]
        assert len(twice) <= in_flight
        assert any(count >= 2 for count in deliveries.values())
        assert r.xlen(f"{stream}.dlq") == 0


def test_redis_restart_mid_stream_loses_nothing_acknowledged(
        oona_restartable_broker: EmbeddedRedis, run_id, tmp_path, caplog):
    broker = oona_restartable_broker
    url, stream, total = broker.url, f"{run_id}.stream", 1500
    worker = _start_worker(url, stream, run_id, "worker", tmp_path, reclaim_idle_ms=1000)

    def outage() -> None:
        # Longer than redis-py's own command retries, so the bus's reconnect paths must act.
        broker.stop()
        time.sleep(1.5)
        broker.start()

    try:
        with OutboxThread(BusSettings.from_dsn(url), "trainer") as outbox:
            restarter = threading.Thread(target=outage)
            for epoch in range(total):
                outbox.put(stream, EpochEvent(job_id="j", epoch=epoch))
                if epoch == total // 3:
                    restarter.start()
                time.sleep(0.001)
            restarter.join()
            assert outbox.flush(timeout=60)
        with redis.Redis.from_url(url) as r:
            _wait_for(lambda: r.scard(f"{run_id}:effects") == total
                      and r.xpending(stream, "workers")["pending"] == 0, 60, "all handled")
            assert r.xlen(f"{stream}.dlq") == 0
        assert worker.poll() is None, "the consumer must survive the restart"
    finally:
        worker.terminate()
        assert worker.wait(15) == 0
    # Both sides really saw the outage (and recovered from it, as checked above).
    assert "Connect call failed" in (tmp_path / "worker.log").read_text()
    assert "outbox: publishing" in caplog.text


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    url_, stream_, run_, name_, idle_, sleep_ = sys.argv[2:8]
    asyncio.run(_worker(url_, stream_, run_, name_, int(idle_), float(sleep_)))
