"""The worker against a real Redis, fed bad input and too much of it: malformed messages are
dead-lettered with a reason and never saved, a poison entry already saved is skipped, and jobs,
layers and saved state stay bounded (max jobs, max layers, eviction after the retention)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from google.protobuf.message import Message
from oona import Bus, BusSettings, ConsumerConfig, open_bus, streams
from oona.contracts import CommandAck, Envelope, EpochEventKind, LifecycleCommand
from oona.dead_letters import DeadLetter, list_dead_letters
from oona.envelope import ENVELOPE_FIELD
from tamiyo import metrics
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.lease import JobLeases, lease_key
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.store import JOBS_KEY, StateStore, job_key
from tamiyo.validation import JobLimits
from tamiyo.worker import ControllerWorker

FAST = ConsumerConfig(block_ms=50, shutdown_grace_s=2.0)
POLICY = PolicyConfig(plateau_epochs=2, min_delta=0.01, cooldown_epochs=2)
RETENTION_S = 60.0
UNSTARTED_S = 10.0
# Ticks are given a clock this far either side of a retention: more than the test's own steps
# take between a job's last message and the clock read that the ticks are offset from.
MARGIN_S = 5.0


@asynccontextmanager
async def _worker(bus: Bus, advisor, limits: JobLimits,
                  name: str = "test") -> AsyncIterator[ControllerWorker]:
    controller = Controller(HeuristicPolicy(POLICY, advisor), DeliveryConfig(ack_timeout_s=60))
    worker = ControllerWorker(bus, StateStore(bus.redis, limits.retention_s), controller,
                              f"tamiyo-{name}",
                              leases=JobLeases(bus.redis, f"replica-{name}", 2000),
                              report_grace_s=30.0, tick_s=0.05, config=FAST, limits=limits)
    running = asyncio.create_task(worker.run())
    await _until(lambda: worker.resumed.is_set() or running.done())
    try:
        yield worker
    finally:
        assert not running.done(), "the worker stopped on its own"
        worker.stop()
        await asyncio.wait_for(running, FAST.shutdown_grace_s + 2)


async def _until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = condition()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _dead(bus: Bus, stream: str) -> list[DeadLetter]:
    return await list_dead_letters(bus.redis, stream, count=1000)


async def _commands(bus: Bus, job: str) -> list[LifecycleCommand]:
    return [LifecycleCommand.FromString(Envelope.FromString(f[ENVELOPE_FIELD]).payload)
            for _, f in await bus.redis.xrange(streams.commands(job))]


def _bus(url: str):
    return open_bus(BusSettings.from_dsn(url))


def test_malformed_messages_are_dead_lettered_never_saved_and_valid_ones_still_decided(
        private_redis_url, advisor, report, epoch_ended):
    huge_id = "j" * 200_000
    short = report(job="job-1")
    del short.chunk_variance[1:]  # the report that took Tamiyo down: 1 variance for 4 seeds
    bad_reports: list[Message] = [
        short,
        report(job="job-1", variance=[1.0, -1.0, 1.0, 1.0]),
        report(job="job-1", dead=[0.0, 1.5, 0.0, 0.0]),
        report(job="job-1", stages=[99, 0, 0, 0]),
        report(job="job-1", layer="layers.{x}"),
        report(job=huge_id),
        report(job="job-1", num_seeds=3),
    ]
    bad_reports[-1].num_seeds = 4_000_000
    bad_event = epoch_ended(1, 0.5)
    bad_event.kind = 17
    late_event = epoch_ended(4_000_000_000, 0.5)
    bad_ack = CommandAck(command_id="c-1", job_id="job-1", stage_after=42)

    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor, JobLimits()) as worker:
            publisher = bus.publisher("kasmina-test")
            await publisher.publish_many(
                [(streams.TELEMETRY_SEED_HEALTH, r) for r in bad_reports]
                + [(streams.EPOCH_EVENTS, e) for e in (bad_event, late_event)]
                + [(streams.CONTROL_ACKS, bad_ack)])
            # Epochs 0..2 of a plateau, valid, after the bad ones: still decided.
            for epoch in range(3):
                await publisher.publish_many(
                    [(streams.TELEMETRY_SEED_HEALTH, report(layer=layer, epoch=epoch))
                     for layer in ("layers.0", "layers.1")]
                    + [(streams.EPOCH_EVENTS, epoch_ended(epoch, 0.6))])

            async def germinated() -> bool:
                return len(await _commands(bus, "job-1")) == 1
            await _until(germinated)
            letters = await _dead(bus, streams.TELEMETRY_SEED_HEALTH)
            assert len(letters) == len(bad_reports)
            assert {letter.reason for letter in letters} == {"rejected"}
            details = [letter.detail for letter in letters]
            for expected in ("chunk_variance has 1 elements, num_seeds is 4",
                             "chunk_variance[1] = -1.0 is outside", "dead_ratio[1] = 1.5",
                             "stage[0] = 99 is not a seed stage", "layer_id 'layers.{x}'",
                             "job_id 'jjjj", "num_seeds 4000000 is not in"):
                assert any(expected in d for d in details), (expected, details)
            assert max(len(d) for d in details) < 1000, "the 200 KB id is not copied"
            (event_letter, late_letter) = await _dead(bus, streams.EPOCH_EVENTS)
            assert "kind 17" in event_letter.detail and "past the last epoch" in late_letter.detail
            (ack_letter,) = await _dead(bus, streams.CONTROL_ACKS)
            assert "stage_after 42" in ack_letter.detail
            # Nothing of them was kept or saved.
            view = worker.views["job-1"]
            assert set(view.reports) == {"layers.0", "layers.1"} and view.epoch == 2
            saved = await bus.redis.hkeys(job_key("job-1"))
            assert sorted(saved) == [b"report:layers.0", b"report:layers.1", b"state"]
            assert await bus.redis.smembers(JOBS_KEY) == {b"job-1"}
            assert list(worker.views) == ["job-1"]

    asyncio.run(body())


def test_a_poison_entry_already_saved_is_skipped_with_a_warning(private_redis_url, advisor,
                                                                report, epoch_ended, caplog):
    short = report(epoch=1)
    del short.stage[2:]  # saved by a Tamiyo without checks: decided, it raised IndexError

    async def body() -> None:
        async with _bus(private_redis_url) as bus:
            async with _worker(bus, advisor, JobLimits()):
                publisher = bus.publisher("kasmina-test")
                await publisher.publish_many([(streams.TELEMETRY_SEED_HEALTH, report(epoch=0)),
                                              (streams.EPOCH_EVENTS, epoch_ended(0, 0.6))])
                await _until(lambda: _decided(bus, 0))
            key = job_key("job-1")
            await bus.redis.hset(key, mapping={
                "report:layers.0": short.SerializeToString(), "report:junk": b"\xff\xfe\x00"})
            await bus.redis.hset(job_key("job-2"), "state", "{not json")
            await bus.redis.sadd(JOBS_KEY, "job-2", "bad{id}")
            async with _worker(bus, advisor, JobLimits()) as worker:
                assert list(worker.views) == ["job-1"], "job-2's state cannot be read"
                assert 0 < await bus.redis.pttl(job_key("job-2")) <= JobLimits.retention_s * 1000
                assert worker.views["job-1"].reports == {}

                async def repaired() -> bool:  # by the lease holder, once it takes the job
                    return sorted(await bus.redis.hkeys(key)) == [b"state"]
                await _until(repaired)
                assert await bus.redis.smembers(JOBS_KEY) == {b"job-1"}
                publisher = bus.publisher("kasmina-test")
                for epoch in (1, 2):
                    await publisher.publish_many(
                        [(streams.TELEMETRY_SEED_HEALTH, report(epoch=epoch)),
                         (streams.EPOCH_EVENTS, epoch_ended(epoch, 0.6))])
                await _until(lambda: _decided(bus, 2))
                (germinate,) = await _commands(bus, "job-1")
                assert germinate.WhichOneof("action") == "germinate"
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("skipping saved report:layers.0" in w and "stage has 2 elements" in w
                   for w in warnings), warnings
        assert any("skipping saved report:junk" in w for w in warnings), warnings
        assert any("job-2: skipping its saved state" in w for w in warnings), warnings

    asyncio.run(body())


async def _decided(bus: Bus, epoch: int, job: str = "job-1") -> bool:
    view = await StateStore(bus.redis).load(job)
    return view is not None and view.last_decided_epoch >= epoch


def test_jobs_past_the_limit_are_refused_and_silent_ones_let_go(private_redis_url, advisor,
                                                                report):
    limits = JobLimits(retention_s=RETENTION_S, max_jobs=20)
    fake = [report(job=f"fake-{i}") for i in range(50)]

    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor, limits) as worker:
            await bus.publisher("kasmina-test").publish_many(
                [(streams.TELEMETRY_SEED_HEALTH, r) for r in fake])

            async def refused() -> bool:
                return len(await _dead(bus, streams.TELEMETRY_SEED_HEALTH)) == 30
            await _until(refused)
            assert len(worker.views) == 20
            letter = (await _dead(bus, streams.TELEMETRY_SEED_HEALTH))[0]
            assert letter.reason == "rejected"
            assert "already following 20 jobs (TAMIYO_MAX_JOBS)" in letter.detail
            assert len(await bus.redis.smembers(JOBS_KEY)) == 20
            for job in worker.views:  # every saved state expires by itself
                assert 0 < await bus.redis.pttl(job_key(job)) <= RETENTION_S * 1000
            evicted = metrics.JOBS_EVICTED._value.get()
            await worker.tick(time.time() + RETENTION_S / 2)
            assert len(worker.views) == 20, "not silent for the retention yet"
            await worker.tick(time.time() + RETENTION_S + 1)
            assert worker.views == {} and metrics.JOBS_EVICTED._value.get() == evicted + 20
            assert await bus.redis.smembers(JOBS_KEY) == set()
            assert not await bus.redis.keys("tamiyo:job:*")
            assert not worker.leases.jobs and not await bus.redis.exists(lease_key("fake-0"))
            # Room again: a new job is followed.
            await bus.publisher("kasmina-test").publish(streams.TELEMETRY_SEED_HEALTH,
                                                        report(job="real-job"))
            await _until(lambda: "real-job" in worker.views)

    asyncio.run(body())


def test_layers_past_the_limit_are_refused_and_a_finished_job_expires(
        private_redis_url, advisor, report, epoch_ended):
    limits = JobLimits(retention_s=RETENTION_S, max_layers_per_job=2)

    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor, limits) as worker:
            publisher = bus.publisher("kasmina-test")
            await publisher.publish_many([(streams.TELEMETRY_SEED_HEALTH, report(layer=layer))
                                          for layer in ("a", "b", "c", "a")])

            async def refused() -> bool:
                return len(await _dead(bus, streams.TELEMETRY_SEED_HEALTH)) == 1
            await _until(refused)
            (letter,) = await _dead(bus, streams.TELEMETRY_SEED_HEALTH)
            assert "already has 2 layers (TAMIYO_MAX_LAYERS_PER_JOB)" in letter.detail
            assert set(worker.views["job-1"].reports) == {"a", "b"}
            finished = epoch_ended(0, None)
            finished.kind = EpochEventKind.EPOCH_EVENT_KIND_JOB_FINISHED
            # The end of a job never seen leaves nothing behind.
            unknown = epoch_ended(0, None, job="never-seen")
            unknown.kind = EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED
            await publisher.publish_many([(streams.EPOCH_EVENTS, unknown),
                                          (streams.EPOCH_EVENTS, finished)])
            await _until(lambda: "job-1" not in worker.views)
            assert 0 < await bus.redis.pttl(job_key("job-1")) <= RETENTION_S * 1000
            assert not await bus.redis.exists(job_key("never-seen"))

    asyncio.run(body())


def test_only_the_lease_holder_repairs_unlists_and_evicts_a_job(private_redis_url, advisor,
                                                                 report, epoch_ended):
    limits = JobLimits(retention_s=RETENTION_S)

    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor, limits, "a") as owner:
            publisher = bus.publisher("kasmina-test")
            await publisher.publish_many([(streams.TELEMETRY_SEED_HEALTH, report(epoch=0)),
                                          (streams.EPOCH_EVENTS, epoch_ended(0, 0.6))])
            await _until(lambda: _decided(bus, 0))
            assert owner.leases.held("job-1")
            key = job_key("job-1")
            await bus.redis.hset(key, "report:junk", b"\xff\xfe\x00")
            # job-2: listed, its state unreadable, its lease held by the owner.
            await bus.redis.hset(job_key("job-2"), "state", "{not json")
            await bus.redis.sadd(JOBS_KEY, "job-2")
            assert await owner.leases.acquire("job-2")
            async with _worker(bus, advisor, limits, "b") as follower:
                assert list(follower.views) == ["job-1"] and not follower.leases.jobs
                assert b"report:junk" in await bus.redis.hkeys(key), "not repaired by a follower"
                assert await bus.redis.pttl(job_key("job-2")) == -1, "nor set to expire"
                assert await bus.redis.smembers(JOBS_KEY) == {b"job-1", b"job-2"}
                later = time.time() + RETENTION_S + 1
                await follower.tick(later)
                assert follower.views == {}, "let go from the follower's memory"
                assert await bus.redis.hexists(key, "state"), "but not from the store"
                assert await bus.redis.sismember(JOBS_KEY, "job-1")
                assert await follower.leases.owner("job-1") == owner.leases.replica_id
                await owner.tick(later)
                assert owner.views == {}
                assert not await bus.redis.exists(key) and not await bus.redis.exists(
                    lease_key("job-1")), "the owner forgot it and released its lease"
                assert await bus.redis.smembers(JOBS_KEY) == {b"job-2"}

    asyncio.run(body())


def test_a_job_that_never_sent_an_epoch_event_is_let_go_sooner(private_redis_url, advisor,
                                                               report, epoch_ended):
    limits = JobLimits(retention_s=RETENTION_S, unstarted_retention_s=UNSTARTED_S, max_jobs=2)
    started = epoch_ended(0, None, job="real-job")
    started.kind = EpochEventKind.EPOCH_EVENT_KIND_JOB_STARTED

    async def body() -> None:
        async with _bus(private_redis_url) as bus, _worker(bus, advisor, limits) as worker:
            publisher = bus.publisher("kasmina-test")
            await publisher.publish_many([(streams.TELEMETRY_SEED_HEALTH, report(job="bogus")),
                                          (streams.TELEMETRY_SEED_HEALTH, report(job="real-job")),
                                          (streams.EPOCH_EVENTS, started)])
            await _until(lambda: "real-job" in worker.views and worker.views["real-job"].started)
            await publisher.publish(streams.TELEMETRY_SEED_HEALTH, report(job="new-job"))

            async def refused() -> bool:
                return len(await _dead(bus, streams.TELEMETRY_SEED_HEALTH)) == 1
            await _until(refused)
            assert not worker.views["bogus"].started
            await _until(lambda: _listed(bus, "bogus"))  # saved by its owner
            now = time.time()
            await worker.tick(now + UNSTARTED_S - MARGIN_S)
            assert sorted(worker.views) == ["bogus", "real-job"]
            await worker.tick(now + UNSTARTED_S + 1)
            assert list(worker.views) == ["real-job"], "only reports: let go after the short one"
            assert not await bus.redis.exists(job_key("bogus"))
            # Room again for a new job, well before the retention.
            await publisher.publish(streams.TELEMETRY_SEED_HEALTH, report(job="new-job"))
            await _until(lambda: "new-job" in worker.views)
            await worker.tick(now + RETENTION_S - MARGIN_S)
            assert "real-job" in worker.views, "a started job keeps the full retention"
            await worker.tick(now + RETENTION_S + 1)
            assert worker.views == {}

    asyncio.run(body())


async def _listed(bus: Bus, job: str) -> bool:
    return bool(await bus.redis.sismember(JOBS_KEY, job))
