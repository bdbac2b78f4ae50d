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
from oona.publisher import over_cap
from oona.scripts import TRIM_BATCH
from prometheus_client import REGISTRY


def _unread() -> float:
    return REGISTRY.get_sample_value("oona_trimmed_unread_total", {"stream": "other"}) or 0.0


async def _ids(r, stream: str) -> list[bytes]:
    return [entry_id for entry_id, _ in await r.xrange(stream)]


# MINID ~ trims whole stream nodes (stream-node-max-entries, 100 by default): a trim leaves the
# stream at most this many entries above the point it was allowed to cut to.
NODE = 100


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
            with caplog.at_level(logging.INFO, logger="oona.publisher"):
                for start in range(0, 3000, 100):
                    await publisher.publish_many([(stream, FieldReport(report_id=str(i)))
                                                  for i in range(start, start + 100)])
                    if start == 1000:  # Karn reads a little and falls behind again
                        await karn.poll(block_ms=1)
                left = await bus.redis.xlen(stream)
                # Nothing Karn has not acknowledged went; of what it has, whole nodes did.
                assert 3000 - len(got) <= left <= 3000 - len(got) + NODE
                assert over_cap(stream) == 3000 - len(got) - 100
                warnings = [r.getMessage() for r in caplog.records
                            if "beyond its cap of 100" in r.getMessage()]
                assert len(warnings) == 1 and "consumer group karn " in warnings[0]

                await pump(karn, until=lambda: len(got) == 3000)
                assert got == {str(i) for i in range(3000)}  # 0 lost
                # Once Karn is done, publishing trims the stream back to its cap (a trim looks
                # at most at scripts.TRIM_SCAN entries, so it takes a second publish).
                for i in range(2):
                    await publisher.publish(stream, FieldReport(report_id=f"late-{i}"))
                assert 100 <= await bus.redis.xlen(stream) <= 100 + NODE
                assert over_cap(stream) == 0
                assert any("back within its cap" in r.getMessage() for r in caplog.records)

    asyncio.run(body())


def test_pending_entries_and_every_group_hold_the_trim_back(settings, stream):
    settings = replace(settings, stream_maxlen=10)

    async def body() -> None:
        async with open_bus(settings) as bus:
            r, publisher = bus.redis, bus.publisher("p")
            for group in ("fast", "slow"):
                await r.xgroup_create(stream, group, id="0", mkstream=True)
            ids = await publisher.publish_many([(stream, EpochEvent(epoch=i))
                                                for i in range(300)])
            # Nobody has read anything (and the groups have no consumer yet, but the entries
            # are fresh): all kept.
            assert await r.xlen(stream) == 300
            for group in ("fast", "slow"):
                await r.xreadgroup(group, "c", {stream: ">"}, count=300)
            await r.xack(stream, "fast", *ids)
            await r.xack(stream, "slow", *ids[5:])  # 0..4 stay pending on "slow"
            await publisher.publish(stream, EpochEvent(epoch=300))
            assert await r.xlen(stream) == 301  # the oldest is pending: nothing may go
            await r.xack(stream, "slow", *ids[:5])
            await publisher.publish(stream, EpochEvent(epoch=301))
            # Everything but the two newest is done in both groups: cut down to the cap.
            left = await _ids(r, stream)
            assert 10 <= len(left) <= 10 + NODE
            assert left[-10:] == [i.encode() for i in ids[292:]] + left[-2:]

    asyncio.run(body())


def test_a_group_moved_back_holds_what_it_will_read_again(settings, stream):
    # XGROUP SETID back: entries after the new last-delivered-id are delivered again, even
    # those acknowledged before, so they are not done although they are older than the oldest
    # pending entry.
    settings = replace(settings, stream_maxlen=10)

    async def body() -> None:
        async with open_bus(settings) as bus:
            r, publisher = bus.redis, bus.publisher("p")
            await r.xgroup_create(stream, "g", id="0", mkstream=True)
            ids = await publisher.publish_many([(stream, EpochEvent(epoch=i))
                                                for i in range(300)])
            await r.xreadgroup("g", "c", {stream: ">"}, count=300)
            await r.xack(stream, "g", *ids[:250])  # 250.. stay pending
            await r.xgroup_setid(stream, "g", ids[99])
            await publisher.publish(stream, EpochEvent(epoch=300))
            left = await _ids(r, stream)
            assert len(left) < 301  # what is before the new position went (in whole nodes)
            assert {i.encode() for i in ids[100:]} <= set(left)
            assert over_cap(stream) == 301 - 10 - 100

    asyncio.run(body())


def test_a_stale_group_holds_nothing_back_and_what_it_missed_is_counted(settings, stream, caplog):
    settings = replace(settings, stream_maxlen=10, stale_group_s=1.0)
    before = _unread()

    async def body() -> None:
        async with open_bus(settings) as bus:
            r, publisher = bus.redis, bus.publisher("p")
            for group in ("live", "gone"):
                await r.xgroup_create(stream, group, id="0", mkstream=True)
            await r.execute_command("XGROUP", "CREATECONSUMER", stream, "gone", "old-replica")
            ids = await publisher.publish_many([(stream, EpochEvent(epoch=i))
                                                for i in range(300)])
            time.sleep(1.5)  # old-replica is idle beyond stale_group_s from here on
            # "live" reads (so is fresh) and acknowledges only half: it still holds the rest.
            await r.xreadgroup("live", "c", {stream: ">"}, count=150)
            await r.xack(stream, "live", *ids[:150])
            with caplog.at_level(logging.WARNING, logger="oona.publisher"):
                await publisher.publish(stream, EpochEvent(epoch=300))
            left = await _ids(r, stream)
            assert {i.encode() for i in ids[150:]} <= set(left)
            assert len(left) < 301
            assert any("stale consumer group" in rec.getMessage() for rec in caplog.records)
            assert over_cap(stream) == 301 - 10 - 150  # what "live" holds
            assert _unread() - before == 301 - len(left)  # "gone" read none of them
            # Once "live" is done, the stream goes back to its cap; every entry that went is
            # counted once.
            await r.xreadgroup("live", "c", {stream: ">"}, count=200)
            await r.xack(stream, "live", *ids[150:])
            await publisher.publish(stream, EpochEvent(epoch=301))
            left = await _ids(r, stream)
            assert 10 <= len(left) <= 10 + NODE
            assert _unread() - before == 302 - len(left)

    asyncio.run(body())


def test_what_a_stale_group_read_but_never_acknowledged_is_not_counted_unread(settings, stream):
    settings = replace(settings, stream_maxlen=10, stale_group_s=1.0)
    before = _unread()

    async def body() -> None:
        async with open_bus(settings) as bus:
            r, publisher = bus.redis, bus.publisher("p")
            for group in ("live", "gone"):
                await r.xgroup_create(stream, group, id="0", mkstream=True)
            ids = await publisher.publish_many([(stream, EpochEvent(epoch=i))
                                                for i in range(300)])
            await r.xreadgroup("gone", "old-replica", {stream: ">"}, count=300)  # never acked
            time.sleep(1.5)
            await r.xreadgroup("live", "c", {stream: ">"}, count=300)
            await r.xack(stream, "live", *ids)
            await publisher.publish(stream, EpochEvent(epoch=300))
            assert 10 <= await r.xlen(stream) <= 10 + NODE
            assert _unread() == before  # all of them were delivered to "gone"

    asyncio.run(body())


def test_a_stream_is_trimmed_once_a_batch_is_beyond_its_cap(settings, stream):
    # Redis frees a stream's memory in whole nodes: trimming each entry beyond the cap as it
    # comes costs the group lookups on every publish and frees nothing.
    settings = replace(settings, stream_maxlen=10)

    async def body() -> None:
        async with open_bus(settings) as bus:
            r, publisher = bus.redis, bus.publisher("p")
            await r.xgroup_create(stream, "g", id="0", mkstream=True)
            for epoch in range(10 + TRIM_BATCH):
                await publisher.publish(stream, EpochEvent(epoch=epoch))
                await r.xreadgroup("g", "c", {stream: ">"}, count=1)
                await r.xack(stream, "g", *(await _ids(r, stream))[-1:])
                if epoch < 10 + TRIM_BATCH - 1:
                    assert await r.xlen(stream) == epoch + 1  # below a batch: left alone
            assert await r.xlen(stream) < 10 + TRIM_BATCH  # the batch'th trims

    asyncio.run(body())


def test_a_group_without_consumers_goes_stale_once_an_entry_waited_too_long(settings, stream,
                                                                            caplog):
    settings = replace(settings, stream_maxlen=10, stale_group_s=1.0)
    before = _unread()

    async def body() -> None:
        async with open_bus(settings) as bus:
            r, publisher = bus.redis, bus.publisher("p")
            await r.xgroup_create(stream, "never-read", id="0", mkstream=True)
            with caplog.at_level(logging.WARNING, logger="oona.publisher"):
                await publisher.publish_many([(stream, EpochEvent(epoch=i))
                                              for i in range(300)])
            assert await r.xlen(stream) == 300  # its entries are fresh: held
            assert over_cap(stream) == 290
            assert any("consumer group never-read has not read" in rec.getMessage()
                       for rec in caplog.records)
            time.sleep(1.5)
            with caplog.at_level(logging.WARNING, logger="oona.publisher"):
                await publisher.publish(stream, EpochEvent(epoch=300))
            left = await r.xlen(stream)
            assert 10 <= left <= 10 + NODE
            assert _unread() - before == 301 - left
            assert over_cap(stream) == 0

    asyncio.run(body())


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
                                                         for i in range(200)])
            if not group_lags:
                await r.xreadgroup("g", "c", {stream: ">"}, count=200)
                await r.xack(stream, "g", *ids)
            await _dead_letter_oldest(r, stream, 5)
            await replay(r, stream, [d.entry_id for d in await list_dead_letters(r, stream)],
                         replace(settings, stream_maxlen=10))
            assert await r.xlen(streams.dead_letters(stream)) == 0
            # Caught up: back to the cap. Lagging: the replayed letters are kept beyond it.
            if group_lags:
                assert await r.xlen(stream) == 205
                assert over_cap(stream) == 195
            else:
                assert 10 <= await r.xlen(stream) <= 10 + NODE
                assert over_cap(stream) == 0

    asyncio.run(body())


def test_dlq_replay_counts_what_a_stale_group_never_read(settings, stream, caplog):
    settings = replace(settings, stream_maxlen=10, stale_group_s=1.0)
    before = _unread()

    async def body() -> None:
        async with open_bus(settings) as bus:
            r = bus.redis
            await r.xgroup_create(stream, "gone", id="0", mkstream=True)
            await bus.publisher("p").publish_many([(stream, EpochEvent(epoch=i))
                                                   for i in range(200)])
            await _dead_letter_oldest(r, stream, 5)
            time.sleep(1.5)
            with caplog.at_level(logging.WARNING, logger="oona.publisher"):
                await replay(r, stream, [d.entry_id for d in await list_dead_letters(r, stream)],
                             settings)
            left = await r.xlen(stream)
            assert 10 <= left <= 10 + NODE
            assert _unread() - before == 205 - left
            assert any("stale consumer group" in rec.getMessage() for rec in caplog.records)

    asyncio.run(body())


async def _dead_letter_oldest(r, stream: str, count: int) -> None:
    for entry_id, fields in await r.xrange(stream, count=count):
        await r.xadd(streams.dead_letters(stream), record(
            fields, stream=stream, original_id=entry_id.decode(), reason="rejected",
            detail="", deliveries=1, group="g", consumer="c"))
