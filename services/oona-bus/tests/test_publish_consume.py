"""Publish and consume against a real Redis: delivery, acks, dedupe, retries, dead letters."""

from __future__ import annotations

import asyncio

from oona import ConsumerConfig, Delivery, Reject, Retry, open_bus
from oona.contracts import CommandAck, EpochEvent, LayerHealthReport
from oona.settings import BusSettings
from prometheus_client import REGISTRY


def _report(i: int) -> LayerHealthReport:
    return LayerHealthReport(job_id="job", layer_id=f"l{i}", epoch=i, num_seeds=2,
                             alpha=[0.5, float(i)])


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"stream": "other", **labels}) or 0.0


def test_published_messages_reach_the_handler_in_order_and_are_acked(settings, stream, pump,
                                                                     fast_config):
    names = ("oona_published_total", "oona_consumed_total", "oona_acked_total",
             "oona_handler_seconds_count")
    before = {name: _metric(name) for name in names}

    async def body() -> None:
        got: list[tuple[int, int]] = []

        async def on_report(msg: LayerHealthReport, delivery: Delivery) -> None:
            got.append((msg.epoch, delivery.delivery_count))
            assert delivery.envelope.sender_id == "kasmina-test"
            assert delivery.envelope.topic == stream

        async with open_bus(settings) as bus:
            consumer = bus.consumer(stream, "g", "c1", {LayerHealthReport: on_report},
                                    fast_config)
            await consumer.ensure_group()
            ids = await bus.publisher("kasmina-test").publish_many(
                [(stream, _report(i)) for i in range(250)])
            assert len(ids) == 250
            await pump(consumer, until=lambda: len(got) == 250)
            assert got == [(i, 1) for i in range(250)]
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0

    asyncio.run(body())
    assert {name: _metric(name) - before[name] for name in names} == dict.fromkeys(names, 250)


def test_group_creation_is_idempotent_and_new_groups_see_history(settings, stream, pump,
                                                                 fast_config):
    async def body() -> None:
        async with open_bus(settings) as bus:
            await bus.publisher("p").publish(stream, _report(1))
            got: list[str] = []

            async def on_report(msg: LayerHealthReport, _: Delivery) -> None:
                got.append(msg.layer_id)

            for name in ("a", "b"):
                consumer = bus.consumer(stream, "late-group", name, {LayerHealthReport: on_report},
                                        fast_config)
                await consumer.ensure_group()
                await consumer.ensure_group()
            await pump(consumer, until=lambda: got == ["l1"])

    asyncio.run(body())


def test_an_event_id_is_written_once_so_it_is_handled_once(settings, stream, pump,
                                                           fast_config):
    async def body() -> None:
        handled: list[str] = []

        async def on_ack(msg: CommandAck, _: Delivery) -> None:
            handled.append(msg.command_id)

        async with open_bus(settings) as bus:
            consumer = bus.consumer(stream, "g", "c", {CommandAck: on_ack}, fast_config)
            await consumer.ensure_group()
            publisher = bus.publisher("p")
            ack = CommandAck(command_id="cmd-1", success=True)
            # A publisher retrying after a lost reply: in one batch, and later on its own.
            first, again = await publisher.publish_many([(stream, ack), (stream, ack)])
            assert first is not None and again is not None  # fresh event ids: both written
            assert await publisher.publish(stream, ack, event_id="cmd-1") is not None
            assert await publisher.publish(stream, ack, event_id="cmd-1") is None
            await pump(consumer, until=lambda: len(handled) == 3)
            assert await publisher.publish(stream, ack, event_id="cmd-1") is None
            await publisher.publish(stream, CommandAck(command_id="cmd-2"), event_id="cmd-2")
            await pump(consumer, until=lambda: len(handled) == 4)
            assert handled == ["cmd-1", "cmd-1", "cmd-1", "cmd-2"]
            assert await bus.redis.xlen(stream) == 4
            # Telemetry is not deduplicated: no key per message.
            await publisher.publish(stream, ack, event_id="t-1", dedupe=False)
            await publisher.publish(stream, ack, event_id="t-1", dedupe=False)
            assert await bus.redis.xlen(stream) == 6

    asyncio.run(body())


def test_retry_redelivers_after_the_delay_with_a_higher_delivery_count(settings, stream, pump,
                                                                      fast_config):
    async def body() -> None:
        counts: list[int] = []

        async def flaky(msg: EpochEvent, delivery: Delivery) -> None:
            counts.append(delivery.delivery_count)
            if delivery.delivery_count < 3:
                raise Retry(delay_s=0.05)

        async with open_bus(settings) as bus:
            consumer = bus.consumer(stream, "g", "c", {EpochEvent: flaky},
                                    ConsumerConfig(block_ms=50, max_deliveries=3))
            await consumer.ensure_group()
            await bus.publisher("p").publish(stream, EpochEvent(job_id="j"))
            await pump(consumer, until=lambda: len(counts) == 3)
            assert counts == [1, 2, 3]
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0
            assert await bus.redis.xlen(stream + ".dlq") == 0

    asyncio.run(body())


def test_a_rejected_message_is_dead_lettered_at_once_with_the_reason(settings, stream, pump,
                                                                      fast_config):
    async def body() -> None:
        seen: list[int] = []

        async def handler(msg: EpochEvent, delivery: Delivery) -> None:
            seen.append(delivery.delivery_count)
            if msg.epoch == 13:
                raise Reject("epoch 13 is not allowed here")

        async with open_bus(settings) as bus:
            consumer = bus.consumer(stream, "g", "c", {EpochEvent: handler}, fast_config)
            await consumer.ensure_group()
            ids = await bus.publisher("p").publish_many(
                [(stream, EpochEvent(job_id="j", epoch=i)) for i in (12, 13, 14)])

            async def dead_lettered() -> bool:
                return bool(await bus.redis.xlen(stream + ".dlq"))

            await pump(consumer, until=dead_lettered)
            await pump(consumer, until=lambda: len(seen) == 3)
            assert seen == [1, 1, 1], "rejected on its first delivery, not redelivered"
            (letter,) = await bus.redis.xrange(stream + ".dlq")
            fields = letter[1]
            assert fields[b"dlq.reason"] == b"rejected"
            assert fields[b"dlq.original_id"] == ids[1].encode()
            assert fields[b"dlq.detail"] == b"epoch 13 is not allowed here"
            assert fields[b"dlq.deliveries"] == b"1"
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0

    asyncio.run(body())


def test_poison_message_is_dead_lettered_and_the_stream_keeps_flowing(settings, stream, pump,
                                                                      fast_config):
    async def body() -> None:
        good: list[int] = []

        async def handler(msg: EpochEvent, _: Delivery) -> None:
            if msg.epoch == 13:
                raise ValueError("poison")
            good.append(msg.epoch)

        async with open_bus(settings) as bus:
            consumer = bus.consumer(stream, "g", "c", {EpochEvent: handler}, fast_config)
            await consumer.ensure_group()
            ids = await bus.publisher("p").publish_many(
                [(stream, EpochEvent(job_id="j", epoch=i)) for i in range(10, 20)])

            async def dead_lettered() -> bool:
                return bool(await bus.redis.xlen(stream + ".dlq"))

            await pump(consumer, until=dead_lettered)
            assert len(good) == 9
            letters = await bus.redis.xrange(stream + ".dlq")
            assert len(letters) == 1
            fields = letters[0][1]
            assert fields[b"dlq.reason"] == b"max_deliveries"
            assert fields[b"dlq.original_id"] == ids[3].encode()
            assert fields[b"dlq.deliveries"] == str(fast_config.max_deliveries).encode()
            assert b"poison" in fields[b"dlq.detail"]
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0
            # Later messages still flow.
            await bus.publisher("p").publish(stream, EpochEvent(job_id="j", epoch=99))
            await pump(consumer, until=lambda: good[-1] == 99)

    asyncio.run(body())


def test_entries_of_a_dead_consumer_are_reclaimed_and_handled(settings, stream, pump,
                                                              fast_config):
    async def body() -> None:
        handled: dict[int, int] = {}

        async def handler(msg: EpochEvent, delivery: Delivery) -> None:
            handled[msg.epoch] = delivery.delivery_count

        async with open_bus(settings) as bus:
            survivor = bus.consumer(stream, "g", "survivor", {EpochEvent: handler}, fast_config)
            await survivor.ensure_group()
            await bus.publisher("p").publish_many(
                [(stream, EpochEvent(job_id="j", epoch=i)) for i in range(5)])
            # A consumer that read the batch and died before acknowledging it.
            await bus.redis.xreadgroup("g", "dead", {stream: ">"}, count=10)
            await pump(survivor, until=lambda: len(handled) == 5)
            assert handled == {i: 2 for i in range(5)}
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0

    asyncio.run(body())


def test_trimmed_pending_entries_are_acknowledged_not_handled(settings, stream, pump,
                                                              fast_config):
    async def body() -> None:
        handled: list[int] = []

        async def handler(msg: EpochEvent, _: Delivery) -> None:
            handled.append(msg.epoch)

        async with open_bus(settings) as bus:
            consumer = bus.consumer(stream, "g", "c", {EpochEvent: handler}, fast_config)
            await consumer.ensure_group()
            ids = await bus.publisher("p").publish_many(
                [(stream, EpochEvent(job_id="j", epoch=i)) for i in range(3)])
            await bus.redis.xreadgroup("g", "dead", {stream: ">"}, count=10)
            await bus.redis.xdel(stream, ids[1])
            await pump(consumer, until=lambda: len(handled) == 2)
            assert sorted(handled) == [0, 2]
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0

    asyncio.run(body())


def test_run_stops_gracefully(settings: BusSettings, stream, fast_config):
    async def body() -> None:
        seen: list[int] = []

        async with open_bus(settings) as bus:
            async def handler(msg: EpochEvent, _: Delivery) -> None:
                seen.append(msg.epoch)
                if len(seen) == 3:
                    consumer.stop()

            consumer = bus.consumer(stream, "g", "c", {EpochEvent: handler}, fast_config)
            await bus.publisher("p").publish_many(
                [(stream, EpochEvent(epoch=i)) for i in range(3)])
            await asyncio.wait_for(consumer.run(), timeout=10)
            assert seen == [0, 1, 2]
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0

    asyncio.run(body())


def test_a_message_that_keeps_killing_its_consumers_is_dead_lettered(settings, stream, pump,
                                                                     fast_config):
    async def body() -> None:
        handled: list[int] = []

        async def handler(msg: EpochEvent, _: Delivery) -> None:
            handled.append(msg.epoch)

        async with open_bus(settings) as bus:
            consumer = bus.consumer(stream, "g", "c", {EpochEvent: handler}, fast_config)
            await consumer.ensure_group()
            (crasher,) = await bus.publisher("p").publish_many([(stream, EpochEvent(epoch=1))])
            # Consumers that took it and died, max_deliveries times over.
            await bus.redis.xreadgroup("g", "dead-0", {stream: ">"})
            for i in range(1, fast_config.max_deliveries):
                await bus.redis.xclaim(stream, "g", f"dead-{i}", 0, [crasher])
            await bus.publisher("p").publish(stream, EpochEvent(epoch=2))

            async def dead_lettered() -> bool:
                return bool(await bus.redis.xlen(stream + ".dlq"))

            await pump(consumer, until=dead_lettered)
            (_, letter), = await bus.redis.xrange(stream + ".dlq")
            assert letter[b"dlq.reason"] == b"max_deliveries"
            assert letter[b"dlq.deliveries"] == str(fast_config.max_deliveries + 1).encode()
            assert handled == [2]
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0

    asyncio.run(body())


def test_a_group_lost_to_nogroup_is_made_again_after_the_last_entry_read(settings, stream,
                                                                         fast_config):
    """The group destroyed while its consumer runs (an operator's XGROUP DESTROY, a server that
    lost it): made again after the last entry read, not at start_id "0", so the three handled
    before are not handled again and the one written meanwhile is handled."""
    async def body() -> None:
        got: list[int] = []

        async def on_event(msg: EpochEvent, _: Delivery) -> None:
            got.append(msg.epoch)

        async with open_bus(settings) as bus:
            publisher = bus.publisher("p")
            for epoch in (1, 2, 3):
                await publisher.publish(stream, EpochEvent(job_id="j", epoch=epoch))
            consumer = bus.consumer(stream, "g", "c", {EpochEvent: on_event}, fast_config)
            task = asyncio.create_task(consumer.run())
            while len(got) < 3:
                await asyncio.sleep(0.01)
            await bus.redis.xgroup_destroy(stream, "g")
            await publisher.publish(stream, EpochEvent(job_id="j", epoch=4))
            deadline = asyncio.get_running_loop().time() + 10
            while len(got) < 4 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # a replay from "0" would arrive meanwhile
            consumer.stop()
            await task
            assert got == [1, 2, 3, 4]
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0

    asyncio.run(body())
