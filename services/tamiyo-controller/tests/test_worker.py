"""The worker against a real Redis (a private embedded server per test): real health reports and
epoch events in, real commands out, acks, retries, and a restart that resumes from Redis."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from oona import Bus, BusSettings, ConsumerConfig, open_bus, streams
from oona.contracts import AckReason, CommandAck, Envelope, EpochEventKind, LifecycleCommand
from oona.contracts import SeedStage as Stage
from oona.envelope import ENVELOPE_FIELD
from tamiyo import metrics
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.lease import JobLeases
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.store import StateStore
from tamiyo.worker import ControllerWorker

FAST = ConsumerConfig(block_ms=50, shutdown_grace_s=2.0)
POLICY = PolicyConfig(plateau_epochs=2, min_delta=0.01, cooldown_epochs=2)
LAYERS = ("layers.0", "layers.1")
LEASE_MS = 2000


@asynccontextmanager
async def _worker(bus: Bus, advisor, *, ack_timeout_s: float = 60.0,
                  report_grace_s: float = 30.0,
                  name: str = "test") -> AsyncIterator[ControllerWorker]:
    controller = Controller(HeuristicPolicy(POLICY, advisor),
                            DeliveryConfig(ack_timeout_s=ack_timeout_s))
    worker = ControllerWorker(bus, StateStore(bus.redis), controller, f"tamiyo-{name}",
                              leases=JobLeases(bus.redis, f"replica-{name}", LEASE_MS),
                              report_grace_s=report_grace_s, tick_s=0.05, config=FAST)
    running = asyncio.create_task(worker.run())
    await _until(lambda: worker.resumed.is_set() or running.done())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(running, FAST.shutdown_grace_s + 2)


async def _until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = condition()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _sent(bus: Bus, job: str = "job-1", *,
                senders: bool = False) -> list[tuple[str, LifecycleCommand]]:
    """(envelope event id, or sender id, command) of every command published for the job, in
    order."""
    sent = []
    for _id, fields in await bus.redis.xrange(streams.commands(job)):
        envelope = Envelope.FromString(fields[ENVELOPE_FIELD])
        sent.append((envelope.sender_id if senders else envelope.event_id,
                     LifecycleCommand.FromString(envelope.payload)))
    return sent


async def _decided(bus: Bus, epoch: int, job: str = "job-1") -> bool:
    view = await StateStore(bus.redis).load(job)
    return view is not None and view.last_decided_epoch >= epoch


async def _epoch(bus: Bus, report, epoch_ended, epoch: int, metric: float, *,
                 layers=LAYERS, event: bool = True, **columns) -> None:
    """The runtime's end of an epoch: one report per layer, then the epoch event."""
    publisher = bus.publisher("kasmina-test")
    await publisher.publish_many([(streams.TELEMETRY_SEED_HEALTH,
                                   report(layer=layer, epoch=epoch, **columns))
                                  for layer in layers])
    if event:
        await publisher.publish(streams.EPOCH_EVENTS, epoch_ended(epoch, metric))


def _bus(url: str):
    return open_bus(BusSettings.from_dsn(url))


def test_a_plateau_germinates_once_per_epoch_under_redelivery(private_redis_url, advisor, report,
                                                              epoch_ended):
    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor):
            for epoch in range(3):
                await _epoch(bus, report, epoch_ended, epoch, 0.6)
            await _until(lambda: _decided(bus, 2))
            ((event_id, germinate),) = await _sent(bus)
            assert germinate.germinate.blueprint_name == "low_rank"
            assert germinate.apply_at_epoch == 3 and event_id == germinate.command_id
            # Epoch 2 published again (new event ids, as a runtime retrying its outbox would).
            await _epoch(bus, report, epoch_ended, 2, 0.6)
            await _epoch(bus, report, epoch_ended, 3, 0.6)
            await _until(lambda: _decided(bus, 3))
            assert len(await _sent(bus)) == 1, "epoch 3 is in cooldown; epoch 2 decided once"

    asyncio.run(body())


def test_an_epoch_waits_for_every_known_layer_then_for_the_grace(private_redis_url, advisor,
                                                                 report, epoch_ended):
    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor):
            await _epoch(bus, report, epoch_ended, 0, 0.5)
            await _until(lambda: _decided(bus, 0))
            await _epoch(bus, report, epoch_ended, 1, 0.5, layers=LAYERS[:1])
            await asyncio.sleep(0.5)
            assert not await _decided(bus, 1), "layers.1 has not reported epoch 1 yet"
            await _epoch(bus, report, epoch_ended, 1, 0.5, layers=LAYERS[1:])
            await _until(lambda: _decided(bus, 1))
        async with _bus(private_redis_url) as bus, _worker(bus, advisor, report_grace_s=0.3):
            await _epoch(bus, report, epoch_ended, 2, 0.5, layers=())
            started = time.monotonic()
            await _until(lambda: _decided(bus, 2))
            assert time.monotonic() - started >= 0.25

    asyncio.run(body())


def test_acks_resolve_commands_and_refusals_are_not_resent(private_redis_url, advisor, report,
                                                           epoch_ended):
    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor, ack_timeout_s=0.2):
            stages = [Stage.SEED_STAGE_GERMINATED, Stage.SEED_STAGE_GERMINATED,
                      Stage.SEED_STAGE_DORMANT, Stage.SEED_STAGE_DORMANT]
            await _epoch(bus, report, epoch_ended, 0, 0.5, layers=LAYERS[:1], stages=stages)
            await _until(lambda: _decided(bus, 0))
            promote_0, promote_1 = (command for _, command in await _sent(bus))
            refusals = metrics.ACKS.labels("GATE_NOT_PASSED")._value.get()
            acks = [CommandAck(command_id=promote_0.command_id, job_id="job-1", success=True,
                               reason=AckReason.ACK_REASON_OK),
                    CommandAck(command_id=promote_1.command_id, job_id="job-1", success=False,
                               reason=AckReason.ACK_REASON_GATE_NOT_PASSED)]
            await bus.publisher("kasmina-test").publish_many(
                [(streams.CONTROL_ACKS, ack) for ack in acks])
            store = StateStore(bus.redis)

            async def resolved() -> bool:
                view = await store.load("job-1")
                return view is not None and not view.pending
            await _until(resolved)
            assert metrics.ACKS.labels("GATE_NOT_PASSED")._value.get() == refusals + 1
            # Past the apply epoch and the ack timeout: nothing is re-sent.
            await _epoch(bus, report, epoch_ended, 1, 0.5, layers=LAYERS[:1])
            await asyncio.sleep(0.5)
            assert len(await _sent(bus)) == 2

    asyncio.run(body())


def test_unacked_commands_are_resent_with_the_same_command_id(private_redis_url, advisor, report,
                                                              epoch_ended):
    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor, ack_timeout_s=0.3):
            stages = [Stage.SEED_STAGE_GERMINATED, *[Stage.SEED_STAGE_DORMANT] * 3]
            await _epoch(bus, report, epoch_ended, 0, 0.5, stages=stages, layers=LAYERS[:1])
            await _until(lambda: _decided(bus, 0))
            await asyncio.sleep(0.5)
            assert len(await _sent(bus)) == 1, "not overdue before its apply epoch has ended"
            await _epoch(bus, report, epoch_ended, 1, 0.6, stages=stages, layers=LAYERS[:1])

            async def resent() -> bool:
                return len(await _sent(bus)) >= 2
            await _until(resent)
            (first_id, first), (retry_id, retry) = (await _sent(bus))[:2]
            assert retry == first and retry_id == f"{first.command_id}#2" != first_id

    asyncio.run(body())


def test_a_restarted_worker_resumes_from_redis(private_redis_url, advisor, report, epoch_ended):
    async def body() -> None:
        async with _bus(private_redis_url) as bus:
            async with _worker(bus, advisor):
                for epoch in range(3):
                    await _epoch(bus, report, epoch_ended, epoch, 0.6)
                await _until(lambda: _decided(bus, 2))
            ((_, germinate),) = await _sent(bus)
            async with _worker(bus, advisor) as worker:
                view = worker.views["job-1"]
                assert view.last_decided_epoch == 2 and germinate.command_id in view.pending
                assert set(view.reports) == set(LAYERS)
                # The runtime applies the germination at epoch 3's boundary and acks it.
                await bus.publisher("kasmina-test").publish(streams.CONTROL_ACKS, CommandAck(
                    command_id=germinate.command_id, job_id="job-1", success=True,
                    reason=AckReason.ACK_REASON_OK, stage_before=Stage.SEED_STAGE_DORMANT,
                    stage_after=Stage.SEED_STAGE_GERMINATED, applied_epoch=3))
                stages = [Stage.SEED_STAGE_DORMANT] * 4
                stages[germinate.seed_index] = Stage.SEED_STAGE_GERMINATED
                await _epoch(bus, report, epoch_ended, 2, 0.6)  # a late redelivery
                (other_layer,) = set(LAYERS) - {germinate.layer_id}
                await _epoch(bus, report, epoch_ended, 3, 0.6, layers=(other_layer,), event=False)
                await _epoch(bus, report, epoch_ended, 3, 0.6, layers=(germinate.layer_id,),
                             stages=stages)
                await _until(lambda: _decided(bus, 3))
            sent = [command for _, command in await _sent(bus)]
            assert [c.WhichOneof("action") for c in sent] == ["germinate", "advance"]
            assert (sent[1].layer_id, sent[1].seed_index) == (germinate.layer_id,
                                                             germinate.seed_index)

    asyncio.run(body())


def test_a_finished_job_is_forgotten_and_stays_finished(private_redis_url, advisor, report,
                                                        epoch_ended):
    async def body() -> None:
        async with _bus(private_redis_url) as bus:
            async with _worker(bus, advisor) as worker:
                await _epoch(bus, report, epoch_ended, 0, 0.5)
                await _until(lambda: _decided(bus, 0))
                finished = epoch_ended(0, None)
                finished.kind = EpochEventKind.EPOCH_EVENT_KIND_JOB_FINISHED
                await bus.publisher("kasmina-test").publish(streams.EPOCH_EVENTS, finished)
                await _until(lambda: "job-1" not in worker.views)
            assert await bus.redis.smembers("tamiyo:jobs") == set()
            assert await bus.redis.ttl("tamiyo:job:{job-1}") > 0
            async with _worker(bus, advisor) as worker:
                assert worker.views == {}
                await _epoch(bus, report, epoch_ended, 1, 0.5)
                await asyncio.sleep(0.3)
                assert worker.views == {} and not await _decided(bus, 1)

    asyncio.run(body())


def test_a_job_restarted_from_a_checkpoint_gets_its_replayed_epochs_decided(
        private_redis_url, advisor, report, epoch_ended):
    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor):
            publisher = bus.publisher("kasmina-test")
            started = epoch_ended(0, None)
            started.kind = EpochEventKind.EPOCH_EVENT_KIND_JOB_STARTED
            await publisher.publish(streams.EPOCH_EVENTS, started)
            for epoch in range(3):
                await _epoch(bus, report, epoch_ended, epoch, 0.6)
            await _until(lambda: _decided(bus, 2))
            # The runtime restarts from its epoch-1 checkpoint: a new JOB_STARTED.
            started.epoch = 1
            await publisher.publish(streams.EPOCH_EVENTS, started)
            store = StateStore(bus.redis)

            async def rewound() -> bool:
                view = await store.load("job-1")
                return view is not None and view.epoch == 1 and view.reports == {}
            await _until(rewound)
            await _epoch(bus, report, epoch_ended, 2, 0.6)
            await _until(lambda: _decided(bus, 2))
            first, again = (command for _, command in await _sent(bus))
            assert first.WhichOneof("action") == again.WhichOneof("action") == "germinate"
            assert first.command_id != again.command_id

    asyncio.run(body())


def test_two_replicas_decide_each_epoch_once_and_hand_over_at_shutdown(
        private_redis_url, advisor, report, epoch_ended):
    async def body() -> None:
        async with _bus(private_redis_url) as bus:
            async with _worker(bus, advisor, name="a") as a, _worker(bus, advisor, name="b") as b:
                for epoch in range(3):
                    await _epoch(bus, report, epoch_ended, epoch, 0.6)
                await _until(lambda: _decided(bus, 2))
                owner, follower = (a, b) if a.leases.held("job-1") else (b, a)
                assert not follower.leases.held("job-1")
                assert await owner.leases.owner("job-1") == owner.leases.replica_id
                ((sender, germinate),) = await _sent(bus, senders=True)
                assert sender == f"tamiyo-{owner.leases.replica_id.removeprefix('replica-')}"
                # The follower read every message too, but decided and saved nothing.
                assert follower.views["job-1"].epoch == 2
                assert follower.views["job-1"].last_decided_epoch == -1
                # The runtime applies it and acks, as the owner shuts down.
                await bus.publisher("kasmina-test").publish(streams.CONTROL_ACKS, CommandAck(
                    command_id=germinate.command_id, job_id="job-1", success=True,
                    reason=AckReason.ACK_REASON_OK, stage_before=Stage.SEED_STAGE_DORMANT,
                    stage_after=Stage.SEED_STAGE_GERMINATED, applied_epoch=3))
                await _until(lambda: germinate.command_id in follower.views["job-1"].early_acks)
                owner.stop()
                stopped = time.monotonic()
                await _until(lambda: follower.leases.held("job-1"))
                assert time.monotonic() - stopped < LEASE_MS / 1000, "released, not expired"
                view = follower.views["job-1"]
                assert view.last_decided_epoch == 2 and not view.pending, "the ack was applied"
                stages = [Stage.SEED_STAGE_DORMANT] * 4
                stages[germinate.seed_index] = Stage.SEED_STAGE_GERMINATED
                (other_layer,) = set(LAYERS) - {germinate.layer_id}
                await _epoch(bus, report, epoch_ended, 3, 0.6, layers=(other_layer,))
                await _epoch(bus, report, epoch_ended, 3, 0.6, layers=(germinate.layer_id,),
                             stages=stages, event=False)
                await _until(lambda: _decided(bus, 3))
                sent = await _sent(bus, senders=True)
                assert [c.WhichOneof("action") for _, c in sent] == ["germinate", "advance"]
                assert sent[1][0] != sender, "decided by the new owner"

    asyncio.run(body())
