"""The stability guard in a real `python -m tamiyo` on a private embedded Redis: a job's
validation accuracy collapses at one epoch (a planted spike) just before its plateau asks for
growth. Tamiyo sends no Germinate while the pause lasts, reports it (its /metrics counter and
its log), and germinates once resume_epochs stable epochs have passed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from oona import BusSettings, open_bus, streams
from oona.contracts import Envelope, EpochEvent, EpochEventKind, LifecycleCommand
from oona.envelope import ENVELOPE_FIELD
from tamiyo.stability import StabilityConfig
from tamiyo.store import job_key

JOB = "job-unstable"
# Improving by 1/64 a epoch (more than TAMIYO_MIN_DELTA) to epoch 4; the spike at epoch 5;
# back at its best after it, so from epoch 6 on the plateau (TAMIYO_PLATEAU_EPOCHS=2) stands.
METRICS = [0.75, 0.765625, 0.78125, 0.796875, 0.8125, 0.25, 0.8125, 0.8125, 0.8125]
SPIKE_EPOCH = 5


@pytest.fixture
def tamiyo(start_tamiyo) -> tuple[subprocess.Popen, int, Path]:  # noqa: ANN001
    return start_tamiyo(TAMIYO_PLATEAU_EPOCHS="2", TAMIYO_ACK_TIMEOUT_S="60",
                        TAMIYO_CONSUMER_NAME="tamiyo-growth-pause")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except OSError:  # not listening yet, or 503
        return 0, ""


def _wait(condition: Callable[[], bool], what: str, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}:\n{log.read_text(errors='replace')}"
        time.sleep(0.05)


def _publish(url: str, messages) -> None:
    async def body() -> None:
        async with open_bus(BusSettings.from_dsn(url)) as bus:
            await bus.publisher("kasmina-test").publish_many(messages)

    asyncio.run(body())


def _decided(client: redis.Redis) -> int:
    state = client.hget(job_key(JOB), "state")
    return -1 if state is None else json.loads(state)["last_decided_epoch"]


def _germinations(client: redis.Redis) -> list[LifecycleCommand]:
    commands = [LifecycleCommand.FromString(Envelope.FromString(f[ENVELOPE_FIELD]).payload)
                for _, f in client.xrange(streams.commands(JOB))]
    return [c for c in commands if c.WhichOneof("action") == "germinate"]


def _paused_epochs(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('tamiyo_growth_paused_epochs_total{signal="metric_spike"}'):
            return float(line.split()[-1])
    raise AssertionError("tamiyo_growth_paused_epochs_total{signal=metric_spike} not exported")


def test_a_planted_spike_pauses_growth_until_it_clears(tamiyo, private_redis_url, report,
                                                       epoch_ended):
    process, http_port, log = tamiyo
    client = redis.Redis.from_url(private_redis_url)
    resume = StabilityConfig().resume_epochs
    assert resume == 3  # the default the expected epochs below are written for
    _publish(private_redis_url, [(streams.EPOCH_EVENTS, EpochEvent(
        job_id=JOB, kind=EpochEventKind.EPOCH_EVENT_KIND_JOB_STARTED, epoch=0))])
    for epoch, metric in enumerate(METRICS):
        _publish(private_redis_url, [
            (streams.TELEMETRY_SEED_HEALTH, report(job=JOB, layer="fc1", epoch=epoch)),
            (streams.EPOCH_EVENTS, epoch_ended(epoch, metric, job=JOB))])
        _wait(lambda e=epoch: _decided(client) >= e, f"epoch {epoch} not decided", log)
        if epoch < SPIKE_EPOCH + resume:
            # Without the guard epoch 6 (the plateau's second epoch) germinates.
            assert _germinations(client) == [], f"germinated at epoch {epoch} while paused"
        if epoch == SPIKE_EPOCH + resume - 2:
            assert _paused_epochs(_get(http_port, "/metrics")[1]) == resume - 1
    # Epochs 6, 7, 8 were stable: epoch 8's decision grows again.
    (germination,) = _germinations(client)
    assert germination.apply_at_epoch == SPIKE_EPOCH + resume + 1
    assert _paused_epochs(_get(http_port, "/metrics")[1]) == resume
    text = log.read_text(errors="replace")
    assert (f"job {JOB} epoch {SPIKE_EPOCH}: growth paused: metric_spike at epoch "
            f"{SPIKE_EPOCH} (validation metric fell to 0.25") in text
    assert "germination withheld (plateau" in text
    assert process.poll() is None
