"""The embedded broker, connecting, and the `python -m oona` admin tools."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import pytest
from oona import BusSettings, BusUnavailable, Delivery, EmbeddedRedis, connect, open_bus
from oona.cli import main as cli
from oona.contracts import Envelope, EpochEvent
from oona.embedded import free_port
from oona.envelope import ENVELOPE_FIELD


def test_open_bus_without_url_starts_and_stops_a_private_server():
    async def body() -> EmbeddedRedis:
        async with open_bus(BusSettings()) as bus:
            assert bus.embedded is not None and bus.embedded.running
            assert await bus.redis.ping()
            return bus.embedded

    broker = asyncio.run(body())
    assert not broker.running
    assert broker.directory is not None and not broker.directory.exists()


def test_restart_keeps_the_streams(tmp_path):
    async def count(url: str) -> int:
        redis = await connect(BusSettings.from_dsn(url))
        try:
            return int(await redis.xlen("kept"))
        finally:
            await redis.aclose()

    async def add(url: str) -> None:
        redis = await connect(BusSettings.from_dsn(url))
        await redis.xadd("kept", {"a": "1"})
        await redis.aclose()

    with EmbeddedRedis(tmp_path) as broker:
        asyncio.run(add(broker.url))
        broker.restart()
        assert asyncio.run(count(broker.url)) == 1


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    # The kernel may give the same ephemeral port to two binds in a row: draw again.
    import oona.embedded as embedded

    drawn = iter([40001, 40001, 40002])

    class FakeSocket:
        def __enter__(self): return self
        def __exit__(self, *exc): return None
        def bind(self, address): self.port = next(drawn)
        def getsockname(self): return ("127.0.0.1", self.port)

    monkeypatch.setattr(embedded, "_handed_out", set())
    monkeypatch.setattr(embedded.socket, "socket", FakeSocket)
    assert [free_port(), free_port()] == [40001, 40002]


def test_connect_gives_up_after_bounded_attempts_and_logs_the_version(redis_url, caplog):
    caplog.set_level(logging.INFO, logger="oona.connection")
    unreachable = BusSettings.from_dsn(f"redis://127.0.0.1:{free_port()}/0",
                                       connect_attempts=2, connect_backoff_s=0.01)
    with pytest.raises(BusUnavailable):
        asyncio.run(connect(unreachable))
    assert "attempt 2/2" in caplog.text

    async def ok() -> None:
        redis = await connect(BusSettings.from_dsn(redis_url))
        await redis.aclose()

    asyncio.run(ok())
    assert "connected to redis" in caplog.text


def test_serve_embedded_prints_a_usable_url():
    process = subprocess.Popen([sys.executable, "-m", "oona", "serve-embedded"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("OONA_REDIS_URL=redis://127.0.0.1:")

        async def ping() -> bool:
            redis = await connect(BusSettings.from_dsn(line.split("=", 1)[1]))
            try:
                return bool(await redis.ping())
            finally:
                await redis.aclose()

        assert asyncio.run(ping())
    finally:
        process.terminate()
        assert process.wait(10) == 0
        process.stdout.close()


def test_admin_commands_show_lag_pending_and_replay_dead_letters(redis_url, stream, pump,
                                                                 fast_config, capsys):
    async def setup() -> None:
        async def handler(msg: EpochEvent, _: Delivery) -> None:
            if msg.epoch == 1:
                raise ValueError("bad epoch")

        async with open_bus(BusSettings.from_dsn(redis_url)) as bus:
            consumer = bus.consumer(stream, "ops", "c1", {EpochEvent: handler}, fast_config)
            await consumer.ensure_group()
            await bus.publisher("p").publish_many([(stream, EpochEvent(epoch=i))
                                                   for i in range(2)])
            async def dead() -> bool:
                return bool(await bus.redis.xlen(stream + ".dlq"))

            await pump(consumer, until=dead)
            await bus.publisher("p").publish_many([(stream, EpochEvent(epoch=i))
                                                   for i in range(5, 8)])
            await bus.redis.xreadgroup("ops", "c2", {stream: ">"}, count=1)

    asyncio.run(setup())
    url = ["--url", redis_url]
    assert cli([*url, "streams", "--pattern", stream + "*"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    # 5 entries; group ops: 2 consumers, 1 pending, 2 not yet delivered.
    assert rows[stream][1:] == ["5", "ops", "2", "1", "2"]
    assert rows[stream + ".dlq"][1] == "1"

    assert cli([*url, "pending", stream, "ops"]) == 0
    assert "c2" in capsys.readouterr().out

    assert cli([*url, "dlq", "list", stream]) == 0
    letter_id = capsys.readouterr().out.split()[0]
    assert cli([*url, "dlq", "inspect", stream, letter_id]) == 0
    shown = capsys.readouterr().out
    assert "reason: max_deliveries" in shown and "epoch: 1" in shown

    assert cli([*url, "dlq", "replay", stream, letter_id]) == 0
    assert "replayed as" in capsys.readouterr().out
    assert cli([*url, "trim", stream, "--maxlen", "2", "--exact"]) == 0
    assert "removed 4 entries" in capsys.readouterr().out

    async def after() -> tuple[int, list]:
        async with open_bus(BusSettings.from_dsn(redis_url)) as bus:
            tail = await bus.redis.xrange(stream)
            return int(await bus.redis.xlen(stream + ".dlq")), tail

    dlq_len, kept = asyncio.run(after())
    assert dlq_len == 0
    # The replayed letter is the newest entry, verbatim: same envelope, epoch 1.
    replayed = Envelope.FromString(kept[-1][1][ENVELOPE_FIELD])
    assert EpochEvent.FromString(replayed.payload).epoch == 1


@pytest.mark.skipif(os.environ.get("OONA_REDIS_URL") is None, reason="no external server")
def test_external_server_is_used_when_configured(redis_url):
    async def body() -> None:
        async with open_bus(BusSettings.from_env()) as bus:
            assert bus.embedded is None

    asyncio.run(body())
