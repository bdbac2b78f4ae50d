"""Trimming: streams that must not lose are never trimmed past what a consumer group has not read
and acknowledged (the backlog beyond the cap is kept, counted and logged); telemetry is capped
with MAXLEN ~ whatever its readers did; `dlq replay` trims like a publish."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from oona import Delivery, open_bus, streams
from oona.contracts import EpochEvent, FieldReport, LayerHealthReport
from oona.dead_letters import list_dead_letters, record, replay
from prometheus_client import REGISTRY


def _over_cap(family: str = "other") -> float:
    return REGISTRY.get_sample_value("oona_stream_over_cap", {"stream": family}) or 0.0


@pytest.fixture
def telemetry_stream(redis_url: str) -> Iterator[str]:
    name = f"{streams.TELEMETRY_PREFIX}test.{uuid.uuid4().hex[:12]}"
    yield name
    with redis.Redis.from_url(redis_url) as client:
        client.delete(name, name + ".dlq")


def test_stream_kinds() -> None:
    for stream in (streams.CONTROL_ACKS, streams.FIELD_REPORTS, streams.EPOCH_EVENTS,
                   streams.commands("job-1")):
        assert streams.must_not_lose(stream), stream
        assert streams.trim_mode(stream) == "guarded"
    for stream in (streams.TELEMETRY_SEED_HEALTH, streams.dead_letters(streams.FIELD_REPORTS)):
        assert not streams.must_not_lose(stream), stream
        assert streams.trim_mode(stream) == "capped"


def test_a_consumer_behind_by_more_than_the_cap_loses_nothing(settings, stream, pump,
                                                              fast_config, caplog):
    settings = replace(settings, stream_maxlen=100)

    async def body() -> None:
        got: set[str] = set()

        async def on_report(msg: FieldReport, _: Delivery) -> None:
            got.add(msg.report_id)

        async with open_bus(settings) as bus:
            karn = bus.consumer(stream, "karn", "karn-1", {FieldReport: on_report}, fast_config)
            await karn.ensure_group()
            publisher = bus.publisher("kasmina")
            with caplog.at_level(logging.WARNING, logger="oona.publisher"):
                for start in range(0, 3000, 100):
                    await publisher.publish_many([(stream, FieldReport(report_id=str(i)))
                                                  for i in range(start, start + 100)])
                    if start == 1000:  # Karn reads a little and falls behind again
                        await karn.poll(block_ms=1)
            assert await bus.redis.xlen(stream) == 3000 - len(got)
            assert _over_cap() >= 3000 - len(got) - 100
            assert sum("beyond its cap of 100" in r.getMessage() for r in caplog.records) == 1

            await pump(karn, until=lambda: len(got) == 3000)
            assert got == {str(i) for i in range(3000)}  # 0 lost
            # Once Karn is done, publishing trims the stream back to its cap (a trim looks at
            # most scripts.TRIM_SCAN entries, so it may take a second publish).
            for i in range(2):
                await publisher.publish(stream, FieldReport(report_id=f"late-{i}"))
            assert await bus.redis.xlen(stream) == 100

    asyncio.run(body())
    assert _over_cap() == 0


def test_pending_entries_and_every_group_hold_the_trim_back(settings, stream):
    settings = replace(settings, stream_maxlen=10)

    async def body() -> None:
        async with open_bus(settings) as bus:
            r, publisher = bus.redis, bus.publisher("p")
            for group in ("fast", "slow"):
                await r.xgroup_create(stream, group, id="0", mkstream=True)
            ids = await publisher.publish_many([(stream, EpochEvent(epoch=i)) for i in range(20)])
            assert await r.xlen(stream) == 20  # nobody has read anything: all kept
            for group in ("fast", "slow"):
                await r.xreadgroup(group, "c", {stream: ">"}, count=20)
            await r.xack(stream, "fast", *ids)
            await r.xack(stream, "slow", *ids[5:])  # 0..4 stay pending on "slow"
            await publisher.publish(stream, EpochEvent(epoch=20))
            assert await r.xlen(stream) == 21  # the oldest is pending: nothing may go
            await r.xack(stream, "slow", *ids[:5])
            await publisher.publish(stream, EpochEvent(epoch=21))
            # Everything before entry 20 is done in both groups; 20 and 21 are unread.
            remaining = [e for e, _ in await r.xrange(stream)]
            assert len(remaining) == 10 and remaining[0] == ids[12].encode()

    asyncio.run(body())


def test_a_stale_group_holds_nothing_back_and_what_it_missed_is_counted(settings, stream, caplog):
    settings = replace(settings, stream_maxlen=10, stale_group_s=0.2)
    before = REGISTRY.get_sample_value("oona_trimmed_unread_total", {"stream": "other"}) or 0.0

    async def body() -> None:
        async with open_bus(settings) as bus:
            r, publisher = bus.redis, bus.publisher("p")
            for group in ("live", "gone"):
                await r.xgroup_create(stream, group, id="0", mkstream=True)
            await r.execute_command("XGROUP", "CREATECONSUMER", stream, "gone", "old-replica")
            ids = await publisher.publish_many([(stream, EpochEvent(epoch=i)) for i in range(20)])
            time.sleep(0.3)  # old-replica is idle beyond stale_group_s from here on
            await r.xreadgroup("live", "c", {stream: ">"}, count=20)
            await r.xack(stream, "live", *ids)
            with caplog.at_level(logging.WARNING, logger="oona.publisher"):
                await publisher.publish(stream, EpochEvent(epoch=20))
            assert await r.xlen(stream) == 10
            assert any("stale consumer group" in rec.getMessage() for rec in caplog.records)

    asyncio.run(body())
    after = REGISTRY.get_sample_value("oona_trimmed_unread_total", {"stream": "other"}) or 0.0
    assert after - before == 11


def test_without_any_group_a_reliable_stream_is_capped(settings, stream):
    async def body() -> None:
        async with open_bus(replace(settings, stream_maxlen=100)) as bus:
            await bus.publisher("p").publish_many([(stream, EpochEvent(epoch=i))
                                                   for i in range(1000)])
            assert 100 <= await bus.redis.xlen(stream) < 300  # MAXLEN ~: whole nodes go

    asyncio.run(body())


def test_telemetry_stays_capped_even_when_its_reader_lags(settings, telemetry_stream):
    async def body() -> None:
        async with open_bus(replace(settings, stream_maxlen=100)) as bus:
            await bus.redis.xgroup_create(telemetry_stream, "tamiyo", id="0", mkstream=True)
            publisher = bus.publisher("kasmina")
            for start in range(0, 3000, 100):
                await publisher.publish_many(
                    [(telemetry_stream, LayerHealthReport(epoch=i))
                     for i in range(start, start + 100)], dedupe=False)
            assert 100 <= await bus.redis.xlen(telemetry_stream) < 300

    asyncio.run(body())


@pytest.mark.parametrize("group_lags", [False, True])
def test_dlq_replay_trims_like_a_publish(settings, stream, group_lags):
    async def body() -> None:
        async with open_bus(settings) as bus:
            r = bus.redis
            await r.xgroup_create(stream, "g", id="0", mkstream=True)
            ids = await bus.publisher("p").publish_many([(stream, EpochEvent(epoch=i))
                                                         for i in range(10)])
            if not group_lags:
                await r.xreadgroup("g", "c", {stream: ">"}, count=10)
                await r.xack(stream, "g", *ids)
            entries = await r.xrange(stream, count=5)
            for entry_id, fields in entries:
                await r.xadd(streams.dead_letters(stream), record(
                    fields, stream=stream, original_id=entry_id.decode(), reason="rejected",
                    detail="", deliveries=1, group="g", consumer="c"))
            letters = await list_dead_letters(r, stream)
            await replay(r, stream, [d.entry_id for d in letters],
                         replace(settings, stream_maxlen=10))
            assert await r.xlen(streams.dead_letters(stream)) == 0
            # Caught up: back to the cap. Lagging: the replayed letters are kept beyond it.
            assert await r.xlen(stream) == (15 if group_lags else 10)

    asyncio.run(body())
