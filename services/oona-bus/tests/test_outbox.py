"""The outbox: telemetry never blocks and drops oldest; reliable messages are never dropped."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from oona import DeadLetterReason, Outbox, OutboxConfig, OutboxFull, OutboxThread, open_bus, streams
from oona import outbox as outbox_module
from oona.contracts import Envelope, EpochEvent, FieldReport, LayerHealthReport
from oona.dead_letters import list_dead_letters, replay
from oona.envelope import ENVELOPE_FIELD
from prometheus_client import REGISTRY
from redis.exceptions import ResponseError


def _dropped() -> float:
    value = REGISTRY.get_sample_value("oona_dropped_total",
                                      {"stream": streams.TELEMETRY_SEED_HEALTH})
    return value or 0.0


def test_full_telemetry_lane_drops_oldest_and_counts_without_blocking(settings):
    outbox = Outbox(settings, "k", OutboxConfig(telemetry_capacity=10))
    before = _dropped()
    started = time.perf_counter()
    for epoch in range(25):
        outbox.put_telemetry(streams.TELEMETRY_SEED_HEALTH, LayerHealthReport(epoch=epoch))
    assert time.perf_counter() - started < 1.0
    assert (outbox.dropped, outbox.depth) == (15, 10)
    assert _dropped() - before == 15
    assert outbox.abandon() == 10


def test_full_reliable_lane_applies_backpressure_then_raises(settings):
    outbox = Outbox(settings, "k", OutboxConfig(reliable_capacity=2))
    outbox.put(streams.FIELD_REPORTS, FieldReport(report_id="1"))
    outbox.put(streams.FIELD_REPORTS, FieldReport(report_id="2"))
    started = time.perf_counter()
    with pytest.raises(OutboxFull):
        outbox.put(streams.FIELD_REPORTS, FieldReport(report_id="3"), timeout=0.2)
    assert time.perf_counter() - started >= 0.2
    assert outbox.depth == 2


def test_drain_publishes_both_lanes_and_newest_telemetry_survives(settings, stream):
    async def body() -> None:
        outbox = Outbox(settings, "k", OutboxConfig(telemetry_capacity=5, batch_size=3))
        for epoch in range(8):
            outbox.put_telemetry(stream, LayerHealthReport(epoch=epoch))
        outbox.put(stream, FieldReport(report_id="r"))
        outbox.close()
        async with open_bus(settings) as bus:
            await outbox.drain(bus.publisher("k"))
            entries = await bus.redis.xrange(stream)
        assert outbox.depth == 0
        envelopes = [Envelope.FromString(fields[ENVELOPE_FIELD]) for _, fields in entries]
        # Reliable first, then the five newest telemetry reports, in order.
        assert FieldReport.FromString(envelopes[0].payload).report_id == "r"
        assert [LayerHealthReport.FromString(e.payload).epoch for e in envelopes[1:]] == [
            3, 4, 5, 6, 7]

    asyncio.run(body())


def test_outbox_thread_serves_synchronous_code_from_another_thread(settings, stream):
    with OutboxThread(settings, "trainer") as outbox:
        producers = [threading.Thread(target=lambda k=k: [
            outbox.put(stream, EpochEvent(job_id=f"{k}", epoch=i)) for i in range(200)])
            for k in range(3)]
        for t in producers:
            t.start()
        for t in producers:
            t.join()
        assert outbox.flush(timeout=10)

    async def count() -> int:
        async with open_bus(settings) as bus:
            return int(await bus.redis.xlen(stream))

    assert asyncio.run(count()) == 600


def test_an_idle_drain_is_woken_by_a_put_from_another_thread(settings, stream, monkeypatch):
    # Without the wake-up the drain would sleep through the whole test.
    monkeypatch.setattr(outbox_module, "_IDLE_CHECK_S", 60.0)

    async def body() -> None:
        outbox = Outbox(settings, "k")
        async with open_bus(settings) as bus:
            drain = asyncio.create_task(outbox.drain(bus.publisher("k")))
            await asyncio.sleep(0.2)  # the drain is idle by now
            threading.Thread(target=outbox.put, args=(stream, EpochEvent(epoch=1))).start()
            async with asyncio.timeout(10):
                while not await bus.redis.xlen(stream):
                    await asyncio.sleep(0.002)
            outbox.close()
            await asyncio.wait_for(drain, 10)

    asyncio.run(body())


def test_a_stream_refused_for_good_is_dead_lettered_and_holds_no_other_back(settings, stream):
    # The key of one stream holds a string (WRONGTYPE on every XADD): no retry can write it.
    # Retrying it forever kept every other stream of the outbox behind it.
    bad = f"{stream}-bad"
    before = REGISTRY.get_sample_value("oona_dead_lettered_total",
                                       {"stream": "other", "reason": "publish_refused"}) or 0

    async def body() -> None:
        async with open_bus(settings) as bus:
            r = bus.redis
            await r.set(bad, "not a stream")
            try:
                outbox = Outbox(settings, "k", OutboxConfig(batch_size=4))
                for i in range(6):
                    outbox.put(bad, EpochEvent(epoch=i))
                    outbox.put(stream, EpochEvent(epoch=i))
                outbox.close()
                await asyncio.wait_for(outbox.drain(bus.publisher("k")), 30)
                assert outbox.depth == 0 and outbox.healthy
                assert [EpochEvent.FromString(_payload(f)).epoch
                        for _, f in await r.xrange(stream)] == list(range(6))
                letters = await list_dead_letters(r, bad)
                assert [d.reason for d in letters] == [DeadLetterReason.PUBLISH_REFUSED] * 6
                assert "WRONGTYPE" in letters[0].detail and letters[0].consumer == "k"
                # Fixed, the letters replay in order.
                await r.delete(bad)
                await replay(r, bad, [d.entry_id for d in letters], settings)
                assert [EpochEvent.FromString(_payload(f)).epoch
                        for _, f in await r.xrange(bad)] == list(range(6))
            finally:
                await r.delete(bad, streams.dead_letters(bad),
                               *[k async for k in r.scan_iter(match=f"{{{bad}}}:*")])

    asyncio.run(body())
    after = REGISTRY.get_sample_value("oona_dead_lettered_total",
                                      {"stream": "other", "reason": "publish_refused"})
    assert after - before == 6


def test_send_by_stream_writes_every_stream_it_can_and_says_which_failed(settings, stream):
    bad = f"{stream}-bad"

    async def body() -> None:
        async with open_bus(settings) as bus:
            r, publisher = bus.redis, bus.publisher("k")
            await r.set(bad, "not a stream")
            try:
                batch = [publisher.encode(s, EpochEvent(epoch=i))
                         for i, s in enumerate([bad, stream, bad, stream])]
                results = await publisher.send_by_stream(batch)
                assert [(x.stream, x.indices, x.error is None) for x in results] == [
                    (bad, [0, 2], False), (stream, [1, 3], True)]
                assert "WRONGTYPE" in str(results[0].error)
                assert await r.xlen(stream) == 2
                # send() writes the same way and then raises the error.
                with pytest.raises(ResponseError, match="WRONGTYPE"):
                    await publisher.send([publisher.encode(s, EpochEvent(epoch=9))
                                          for s in (bad, stream)])
                assert await r.xlen(stream) == 3
            finally:
                await r.delete(bad)

    asyncio.run(body())


def _payload(fields: dict[bytes, bytes]) -> bytes:
    return Envelope.FromString(fields[ENVELOPE_FIELD]).payload
