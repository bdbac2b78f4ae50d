"""The worker against a real Redis (oona's embedded broker, or OONA_REDIS_URL) and a real
database: field reports published on the bus end up stored once each."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
from karn.store import FieldReportStore
from karn.worker import CONSUMER_GROUP, FieldReportWorker
from oona import BusSettings, ConsumerConfig, open_bus, streams
from prometheus_client import REGISTRY

FAST = ConsumerConfig(block_ms=50, retry_delay_s=0.01, reclaim_idle_ms=500,
                      reclaim_interval_s=0.1, max_deliveries=5, shutdown_grace_s=2.0)


@pytest.fixture
def bus_settings(oona_redis_url: str) -> BusSettings:
    return BusSettings.from_dsn(oona_redis_url, connect_attempts=2)


@pytest.fixture
def stream() -> str:
    # Its own stream per test, so tests that share one Redis never see each other's reports.
    return f"test.field_reports.{uuid.uuid4().hex[:12]}"


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _until(worker: FieldReportWorker, condition: Callable[[], bool],
                 timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s}s")
        await worker.consumer.poll(block_ms=20)


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_published_reports_are_stored_and_acknowledged(bus_settings, stream, store,
                                                       field_report):
    reports = [field_report(1, "FOSSILIZED", contribution=0.1) for _ in range(5)]
    reports += [field_report(3, "CULLED", contribution=-0.1, execution_path="legacy")
                for _ in range(3)]
    stored_before = _metric("karn_field_reports_stored_total", outcome="CULLED")
    by_path = {path: _metric("karn_field_reports_by_path_total", execution_path=path,
                             outcome=outcome)
               for path, outcome in (("legacy", "CULLED"), ("chunked", "FOSSILIZED"))}

    async def body() -> None:
        async with open_bus(bus_settings) as bus:
            worker = FieldReportWorker(bus, store, "karn-test", FAST, stream=stream)
            await worker.consumer.ensure_group()
            await bus.publisher("kasmina-test").publish_many([(stream, r) for r in reports])
            await _until(worker, lambda: store.report_count() == 8)
            assert (await bus.redis.xpending(stream, CONSUMER_GROUP))["pending"] == 0

    _run(body)
    by_id = {s.blueprint_id: s for s in store.statistics()}
    assert (by_id[1].fossilized, by_id[3].culled) == (5, 3)
    assert _metric("karn_field_reports_stored_total", outcome="CULLED") == stored_before + 3
    assert _metric("karn_field_reports_by_path_total", execution_path="legacy",
                   outcome="CULLED") == by_path["legacy"] + 3
    assert _metric("karn_field_reports_by_path_total", execution_path="chunked",  # no path: old
                   outcome="FOSSILIZED") == by_path["chunked"] + 5


def test_a_report_published_twice_is_stored_once(bus_settings, stream, store, field_report):
    report = field_report(2, "FOSSILIZED", contribution=0.2)
    duplicates_before = _metric("karn_field_report_duplicates_total")

    async def body() -> None:
        async with open_bus(bus_settings) as bus:
            worker = FieldReportWorker(bus, store, "karn-test", FAST, stream=stream)
            await worker.consumer.ensure_group()
            publisher = bus.publisher("kasmina-test")
            # Two publishes with different event_ids: the bus cannot dedupe, Karn must.
            await publisher.publish(stream, report)
            await publisher.publish(stream, report)
            await _until(worker, lambda: _metric("karn_field_report_duplicates_total")
                         == duplicates_before + 1)
            assert (await bus.redis.xpending(stream, CONSUMER_GROUP))["pending"] == 0

    _run(body)
    assert store.report_count() == 1


def test_a_report_without_report_id_is_keyed_by_its_event_id(bus_settings, stream, store,
                                                             field_report):
    report = field_report()
    report.report_id = ""

    async def body() -> None:
        async with open_bus(bus_settings) as bus:
            worker = FieldReportWorker(bus, store, "karn-test", FAST, stream=stream)
            await worker.consumer.ensure_group()
            await bus.publisher("kasmina-test").publish(stream, report, event_id="evt-1")
            await _until(worker, lambda: store.report_count() == 1)

    _run(body)
    assert store.record(field_report(report_id="evt-1")) is False


def test_undecodable_entries_are_dead_lettered_and_the_rest_stored(bus_settings, stream, store,
                                                                   field_report):
    async def body() -> None:
        async with open_bus(bus_settings) as bus:
            worker = FieldReportWorker(bus, store, "karn-test", FAST, stream=stream)
            await worker.consumer.ensure_group()
            await bus.redis.xadd(stream, {b"envelope": b"\xff not protobuf"})
            await bus.publisher("kasmina-test").publish(stream, field_report())
            await _until(worker, lambda: store.report_count() == 1)
            letters = await bus.redis.xrange(streams.dead_letters(stream))
            assert len(letters) == 1
            assert (await bus.redis.xpending(stream, CONSUMER_GROUP))["pending"] == 0

    _run(body)


def test_a_report_the_database_refuses_is_dead_lettered_at_once(bus_settings, stream, store,
                                                               database_url, field_report):
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite does not enforce VARCHAR lengths; PostgreSQL refuses the report")

    async def body() -> None:
        async with open_bus(bus_settings) as bus:
            worker = FieldReportWorker(bus, store, "karn-test", FAST, stream=stream)
            await worker.consumer.ensure_group()
            publisher = bus.publisher("kasmina-test")
            await publisher.publish(stream, field_report(report_id="x" * 300))  # > VARCHAR(256)
            await publisher.publish(stream, field_report())
            await _until(worker, lambda: store.report_count() == 1)
            (letter,) = await bus.redis.xrange(streams.dead_letters(stream))
            assert letter[1][b"dlq.reason"] == b"rejected"
            assert letter[1][b"dlq.deliveries"] == b"1", "not retried: no retry can store it"
            assert (await bus.redis.xpending(stream, CONSUMER_GROUP))["pending"] == 0

    _run(body)


def test_reports_wait_out_a_database_outage_and_are_stored_once_it_is_back(
        bus_settings, stream, sqlite_url, field_report, database_outage):
    store = FieldReportStore.open(sqlite_url)
    errors_before = _metric("karn_store_errors_total")

    async def body() -> None:
        async with open_bus(bus_settings) as bus:
            worker = FieldReportWorker(bus, store, "karn-test", FAST, stream=stream)
            await worker.consumer.ensure_group()
            with database_outage(store):
                await bus.publisher("kasmina-test").publish(stream, field_report())
                await _until(worker, lambda: _metric("karn_store_errors_total")
                             >= errors_before + 1)
                # Not acknowledged while it is not stored.
                assert (await bus.redis.xpending(stream, CONSUMER_GROUP))["pending"] == 1
            # The retry delay doubles per delivery from 0.5 s: the second attempt succeeds.
            await _until(worker, lambda: store.report_count() == 1)
            assert (await bus.redis.xpending(stream, CONSUMER_GROUP))["pending"] == 0
            assert await bus.redis.xlen(streams.dead_letters(stream)) == 0

    _run(body)
    store.close()


def test_stop_ends_a_running_worker(bus_settings, stream, store, field_report):
    async def body() -> None:
        async with open_bus(bus_settings) as bus:
            worker = FieldReportWorker(bus, store, "karn-test", FAST, stream=stream)
            running = asyncio.create_task(worker.run())
            await bus.publisher("kasmina-test").publish(stream, field_report())
            deadline = time.monotonic() + 10
            while store.report_count() == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            worker.stop()
            await asyncio.wait_for(running, FAST.shutdown_grace_s + 1)

    _run(body)
    assert store.report_count() == 1
