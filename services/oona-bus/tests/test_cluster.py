"""The bus on a real Redis Cluster: three masters started here from the `redis-server` binary.

Per-job command streams carry the job as their hash tag, so each job's stream, its DLQ and its
dedupe keys share a slot (and spread over the shards job by job); global streams are one key
each. Skipped, with the reason, where `redis-server` or `redis-cli` is not installed.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from oona import admin, open_bus, streams
from oona.connection import atomic_across
from oona.contracts import EpochEvent
from oona.dead_letters import list_dead_letters, replay
from oona.errors import DeadLetterReason
from oona.settings import BusSettings
from redis.asyncio import RedisCluster

_SERVER, _CLI = shutil.which("redis-server"), shutil.which("redis-cli")
pytestmark = pytest.mark.skipif(
    _SERVER is None or _CLI is None,
    reason="a Redis Cluster test needs the redis-server and redis-cli binaries on PATH")
_MASTERS = 3
_START_TIMEOUT_S = 15.0


def _cluster_port(taken: set[int]) -> int:
    """A port P with P and its cluster bus port P + 10000 free (so P <= 55535, which Redis
    requires)."""
    for _ in range(200):
        port = random.randrange(20000, 45000)
        if port in taken or port + 10000 in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


def _cli(port: int, *args: str) -> str:
    assert _CLI is not None
    return subprocess.run([_CLI, "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            if condition():
                return
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster: {what} not within {_START_TIMEOUT_S}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`redis+cluster://` URL of a fresh 3-master cluster on 127.0.0.1; only the processes
    started here are stopped afterwards, by their PIDs."""
    assert _SERVER is not None and _CLI is not None
    directory: Path = tmp_path_factory.mktemp("cluster")
    ports: list[int] = []
    for _ in range(_MASTERS):
        ports.append(_cluster_port({p + d for p in ports for d in (0, 10000)}))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            processes.append(subprocess.Popen(
                [_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--save", "", "--appendonly",
                 "no", "--dir", str(directory), "--daemonize", "no",
                 "--logfile", str(directory / f"redis-{port}.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            _wait(lambda port=port: _cli(port, "ping").strip() == "PONG", f"{port} up")
        subprocess.run([_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"], capture_output=True,
                       timeout=30, check=True)
        for port in ports:
            _wait(lambda port=port: "cluster_state:ok" in _cli(port, "cluster", "info"),
                  f"cluster_state:ok on {port}")
        yield f"redis+cluster://127.0.0.1:{ports[0]}/0"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def settings(cluster_url: str) -> BusSettings:
    return BusSettings.from_dsn(cluster_url, connect_attempts=3)


def _job() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


def test_cluster_url_selects_the_cluster_client(settings: BusSettings):
    assert settings.cluster and not settings.tls_enabled
    assert settings.client_url() == settings.url.replace("redis+cluster://", "redis://")

    async def main() -> None:
        async with open_bus(settings) as bus:
            assert isinstance(bus.redis, RedisCluster)
            assert len(bus.redis.get_primaries()) == _MASTERS

    asyncio.run(main())


def test_per_job_streams_spread_over_shards_and_keep_their_dlq_in_their_slot(
        settings: BusSettings):
    async def main() -> None:
        async with open_bus(settings) as bus:
            redis = bus.redis
            assert isinstance(redis, RedisCluster)
            nodes, slots = set(), set()
            for i in range(24):
                stream = streams.commands(f"job-{i}")
                slot = await redis.cluster_keyslot(stream)
                assert await redis.cluster_keyslot(streams.dead_letters(stream)) == slot
                assert await redis.cluster_keyslot(f"{{job-{i}}}") == slot
                assert atomic_across(redis, stream, streams.dead_letters(stream))
                slots.add(slot)
                nodes.add(redis.get_node_from_key(stream).name)
            assert len(slots) > 1 and len(nodes) == _MASTERS
            # A global stream is one key; its DLQ is another and here on another slot.
            health = streams.TELEMETRY_SEED_HEALTH
            assert (await redis.cluster_keyslot(health)
                    != await redis.cluster_keyslot(streams.dead_letters(health)))
            assert not atomic_across(redis, health, streams.dead_letters(health))

    asyncio.run(main())


def _round_trip(settings: BusSettings, stream: str, pump, fast_config) -> None:
    async def main() -> None:
        seen: list[int] = []

        async def on_event(event: EpochEvent, _delivery) -> None:
            seen.append(event.epoch)

        async with open_bus(settings) as bus:
            try:
                publisher = bus.publisher("p")
                ids = await publisher.publish_many([(stream, EpochEvent(job_id="j", epoch=i))
                                                    for i in range(5)])
                assert all(ids)
                # Published once per event id: the dedupe key lives in the stream's slot.
                assert await publisher.publish(stream, EpochEvent(job_id="j", epoch=9),
                                               event_id="e-1")
                assert await publisher.publish(stream, EpochEvent(job_id="j", epoch=9),
                                               event_id="e-1") is None
                consumer = bus.consumer(stream, "g", "c1", {EpochEvent: on_event}, fast_config)
                await consumer.ensure_group()
                await pump(consumer, until=lambda: len(seen) == 6)
                assert sorted(seen) == [0, 1, 2, 3, 4, 9]
                assert (await bus.redis.xpending(stream, "g"))["pending"] == 0
                (info,) = await admin.list_streams(bus.redis, pattern=stream)
                assert (info.name, info.length, info.groups[0].pending) == (stream, 6, 0)
            finally:
                await bus.redis.delete(stream)

    asyncio.run(main())


def test_round_trip_on_a_per_job_stream(settings: BusSettings, pump, fast_config):
    _round_trip(settings, streams.commands(_job()), pump, fast_config)


def test_round_trip_on_a_global_stream(settings: BusSettings, pump, fast_config):
    _round_trip(settings, f"test.global.{uuid.uuid4().hex[:8]}", pump, fast_config)


def test_claim_checked_payload_through_the_cluster(settings: BusSettings, pump,
                                                   fast_config):
    stream = streams.commands(_job())
    small = BusSettings.from_dsn(settings.url or "", claim_check_bytes=64)

    async def main() -> None:
        seen: list[str] = []

        async def on_event(event: EpochEvent, _delivery) -> None:
            seen.append(event.job_id)

        async with open_bus(small) as bus:
            big = "x" * 5000
            await bus.publisher("p").publish_many(
                [(stream, EpochEvent(job_id=big + str(i))) for i in range(4)])
            consumer = bus.consumer(stream, "g", "c1", {EpochEvent: on_event}, fast_config)
            await consumer.ensure_group()
            await pump(consumer, until=lambda: len(seen) == 4)
            assert sorted(seen) == [big + str(i) for i in range(4)]
            # Claim-checked: the blobs are keys of their own (SCAN covers every primary).
            assert len([k async for k in bus.redis.scan_iter(match="oona:blob:*")]) >= 4

    asyncio.run(main())


def test_malformed_entries_go_to_the_dlq_of_their_stream(settings: BusSettings, pump,
                                                         fast_config):
    async def main() -> None:
        async with open_bus(settings) as bus:
            for stream in (streams.commands(_job()), f"test.global.{uuid.uuid4().hex[:8]}"):
                consumer = bus.consumer(stream, "g", "c1", {EpochEvent: _never}, fast_config)
                await consumer.ensure_group()
                bad_id = (await bus.redis.xadd(stream, {"envelope": b"\xff not protobuf"})
                          ).decode()

                async def dead(stream: str = stream) -> bool:
                    return len(await list_dead_letters(bus.redis, stream)) == 1

                await pump(consumer, until=dead)
                (letter,) = await list_dead_letters(bus.redis, stream)
                assert (letter.original_id, letter.reason, letter.stream) == (
                    bad_id, DeadLetterReason.UNDECODABLE.value, stream)
                assert (await bus.redis.xpending(stream, "g"))["pending"] == 0
                # Replay puts it back on its stream and takes it off the DLQ.
                (new_id,) = await replay(bus.redis, stream, [letter.entry_id])
                assert await bus.redis.xrange(stream, min=new_id, max=new_id)
                assert await list_dead_letters(bus.redis, stream) == []
                await bus.redis.delete(stream, streams.dead_letters(stream))

    asyncio.run(main())


async def _never(_message, _delivery) -> None:
    raise AssertionError("a malformed entry reached the handler")


def test_pending_message_of_a_dead_consumer_is_reclaimed(settings: BusSettings, pump,
                                                         fast_config):
    stream = streams.commands(_job())

    async def main() -> None:
        seen: list[tuple[int, int]] = []

        async def on_event(event: EpochEvent, delivery) -> None:
            seen.append((event.epoch, delivery.delivery_count))

        async with open_bus(settings) as bus:
            await bus.publisher("p").publish(stream, EpochEvent(job_id="j", epoch=7))
            await bus.redis.xgroup_create(stream, "g", id="0", mkstream=True)
            # A consumer that read the entry and died before handling it.
            assert await bus.redis.xreadgroup("g", "dead", {stream: ">"}, count=10)
            consumer = bus.consumer(stream, "g", "alive", {EpochEvent: on_event}, fast_config)
            await pump(consumer, until=lambda: bool(seen))
            assert seen == [(7, 2)]
            assert (await bus.redis.xpending(stream, "g"))["pending"] == 0

    asyncio.run(main())
