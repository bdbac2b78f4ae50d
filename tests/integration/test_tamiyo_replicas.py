"""Two Tamiyo replicas as real processes (`python -m tamiyo`) on one private embedded Redis: one
job's epochs are decided by the replica holding the job's lease only; SIGKILL that replica
mid-job and the other takes the job over within the lease time, and carries on from the saved
decisions: the next epoch is decided (once), nothing decided before is decided again, and an
ack it read while following resolves the command it answers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from google.protobuf.message import Message
from oona import BusSettings, EmbeddedRedis, open_bus, streams
from oona.contracts import (
    AckReason,
    CommandAck,
    Envelope,
    EpochEvent,
    EpochEventKind,
    LayerHealthReport,
    LifecycleCommand,
)
from oona.contracts import SeedStage as Stage
from oona.embedded import free_port
from oona.envelope import ENVELOPE_FIELD
from tamiyo.lease import lease_key
from tamiyo.store import job_key
from tamiyo.view import JobView

pytestmark = pytest.mark.integration

JOB = "job-replicated"
LAYERS = ("fc1", "fc2")
SEEDS = 4
LEASE_S = 2.0
# Takeover: the lease runs out at most LEASE_S after the kill, then the survivor's next tick
# (0.1 s) takes it and decides; the rest is process scheduling on a loaded CI machine.
_TAKEOVER_MARGIN_S = 3.0
_START_TIMEOUT_S = 60.0


@dataclass
class Replica:
    name: str
    replica_id: str
    process: subprocess.Popen[bytes]
    http_port: int
    log: Path

    def logs(self) -> str:
        return self.log.read_text()

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics",
                                        timeout=5) as reply:
                return reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.read().decode()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz",
                                        timeout=5) as reply:
                return reply.status == 200
        except (OSError, urllib.error.HTTPError):
            return False


@pytest.fixture
def replicas(oona_restartable_broker: EmbeddedRedis, tmp_path: Path) -> Iterator[list[Replica]]:
    """Tamiyo replicas "a" and "b", ready; whichever still runs is killed at the end."""
    started: list[Replica] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAMIYO_", "KARN_"))}
    env.update(OONA_REDIS_URL=oona_restartable_broker.url,
               TAMIYO_KARN_ADDRESS=f"127.0.0.1:{free_port()}",  # Karn down: the fallback
               TAMIYO_PLATEAU_EPOCHS="2", TAMIYO_COOLDOWN_EPOCHS="1",
               TAMIYO_REPORT_GRACE_S="1", TAMIYO_ACK_TIMEOUT_S="60", TAMIYO_TICK_S="0.1",
               TAMIYO_LEASE_MS=str(int(LEASE_S * 1000)), TAMIYO_SHUTDOWN_GRACE_S="5")
    try:
        for name in ("a", "b"):
            http_port = free_port()
            log = tmp_path / f"tamiyo-{name}.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    [sys.executable, "-m", "tamiyo"], stdout=sink, stderr=subprocess.STDOUT,
                    env={**env, "TAMIYO_CONSUMER_NAME": f"tamiyo-{name}",
                         "TAMIYO_REPLICA_ID": f"replica-{name}",
                         "TAMIYO_HTTP_PORT": str(http_port),
                         "TAMIYO_GRPC_PORT": str(free_port())})
            started.append(Replica(f"tamiyo-{name}", f"replica-{name}", process, http_port, log))
        deadline = time.monotonic() + _START_TIMEOUT_S
        for replica in started:
            while not replica.ready():
                assert replica.process.poll() is None, f"exited at start:\n{replica.logs()}"
                assert time.monotonic() < deadline, f"not ready:\n{replica.logs()}"
                time.sleep(0.1)
        yield started
    finally:
        for replica in started:
            if replica.process.poll() is None:
                replica.process.kill()
                replica.process.wait()


def _publish(url: str, messages: list[tuple[str, Message]]) -> None:
    async def body() -> None:
        async with open_bus(BusSettings.from_dsn(url)) as bus:
            await bus.publisher("kasmina-test").publish_many(messages)

    asyncio.run(body())


def _health(epoch: int, layer: str, stages: dict[int, int] | None = None,
            ready_for: dict[int, int] | None = None) -> LayerHealthReport:
    stage = [Stage.SEED_STAGE_DORMANT] * SEEDS
    ready = [Stage.SEED_STAGE_UNSPECIFIED] * SEEDS
    for index, value in (stages or {}).items():
        stage[index] = value
    for index, value in (ready_for or {}).items():
        ready[index] = value
    # Seed 1 of fc2 is the least healthy chunk: low variance, a third of it dead.
    variance = [1.0, 0.2 if layer == "fc2" else 1.0, 1.0, 1.0]
    dead = [0.0, 0.3 if layer == "fc2" else 0.0, 0.0, 0.0]
    nan = float("nan")
    return LayerHealthReport(
        job_id=JOB, layer_id=layer, epoch=epoch, step=epoch * 50, num_seeds=SEEDS, stage=stage,
        blueprint_id=[-1] * SEEDS, epochs_in_stage=[0] * SEEDS, strategy_id=[-1] * SEEDS,
        alpha=[0.0] * SEEDS, chunk_variance=variance, dead_ratio=dead,
        mean_abs_correlation=[0.1] * SEEDS, reconstruction_ratio=[nan] * SEEDS,
        grad_norm=[nan] * SEEDS, drift=[nan] * SEEDS, contribution=[nan] * SEEDS,
        ready_for=ready)


def _end_of_epoch(epoch: int, reports: dict[str, LayerHealthReport] | None = None
                  ) -> list[tuple[str, Message]]:
    """What the runtime publishes at an epoch boundary (on a plateau at 0.71)."""
    reports = reports or {}
    messages: list[tuple[str, Message]] = [
        (streams.TELEMETRY_SEED_HEALTH, reports.get(layer) or _health(epoch, layer))
        for layer in LAYERS]
    messages.append((streams.EPOCH_EVENTS, EpochEvent(
        job_id=JOB, kind=EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED, epoch=epoch,
        step=epoch * 50, val_metric=0.71, val_metric_name="val_accuracy",
        higher_is_better=True)))
    return messages


def _ack(command: LifecycleCommand, before: int, after: int, epoch: int) -> tuple[str, Message]:
    return streams.CONTROL_ACKS, CommandAck(
        command_id=command.command_id, job_id=JOB, success=True, reason=AckReason.ACK_REASON_OK,
        stage_before=before, stage_after=after, applied_epoch=epoch)


def _commands(url: str) -> list[tuple[str, LifecycleCommand]]:
    """(sender_id, command) of every command published for the job, in order."""
    with redis.Redis.from_url(url) as client:
        entries = client.xrange(streams.commands(JOB))
    sent = []
    for _id, fields in entries:
        envelope = Envelope.FromString(fields[ENVELOPE_FIELD])
        sent.append((envelope.sender_id, LifecycleCommand.FromString(envelope.payload)))
    return sent


def _wait(condition, what: str, replicas: list[Replica], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, (
            f"{what}:\n" + "\n".join(f"--- {r.name}\n{r.logs()}" for r in replicas))
        time.sleep(0.05)


def _decided(url: str, epoch: int) -> bool:
    with redis.Redis.from_url(url) as client:
        state = client.hget(job_key(JOB), "state")
    return state is not None and JobView.from_json(state).last_decided_epoch >= epoch


def _owner(url: str) -> str | None:
    with redis.Redis.from_url(url) as client:
        owner = client.get(lease_key(JOB))
    return owner.decode() if owner is not None else None


def _metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not exported")


def _decisions(replica: Replica) -> float:
    text = replica.metrics()
    return sum(_metric(text, f'tamiyo_decisions_total{{kind="{kind}"}}')
               for kind in ("germinate", "advance", "cull", "rollback", "cancel"))


def test_one_replica_decides_a_job_and_the_other_takes_over_after_kill_9(
        replicas: list[Replica], oona_restartable_broker: EmbeddedRedis) -> None:
    url = oona_restartable_broker.url
    _publish(url, [m for epoch in range(3) for m in _end_of_epoch(epoch)])
    _wait(lambda: len(_commands(url)) >= 1, "no germination", replicas)
    by_id = {r.replica_id: r for r in replicas}
    owner = by_id[_owner(url) or ""]
    (follower,) = [r for r in replicas if r is not owner]
    ((sender, germinate),) = _commands(url)
    assert sender == owner.name and germinate.WhichOneof("action") == "germinate"
    assert (germinate.layer_id, germinate.seed_index) == ("fc2", 1)

    # The runtime applies it at epoch 3's boundary, acks, and reports the seed GERMINATED.
    _publish(url, [_ack(germinate, Stage.SEED_STAGE_DORMANT, Stage.SEED_STAGE_GERMINATED, 3),
                   *_end_of_epoch(3, {"fc2": _health(3, "fc2",
                                                     stages={1: Stage.SEED_STAGE_GERMINATED})})])
    _wait(lambda: len(_commands(url)) >= 2, "no promotion", replicas)
    _wait(lambda: _decided(url, 3), "epoch 3's decision never saved", replicas)
    sender, promote = _commands(url)[1]
    assert sender == owner.name and promote.advance.target_stage == Stage.SEED_STAGE_TRAINING
    # The follower has read the same messages and decided nothing.
    assert _decisions(owner) == 2 and _decisions(follower) == 0
    assert _metric(owner.metrics(), "tamiyo_leased_jobs") == 1
    assert _metric(follower.metrics(), "tamiyo_leased_jobs") == 0
    assert _metric(follower.metrics(), "tamiyo_jobs") == 1, "the follower keeps the job's view"

    owner.process.send_signal(signal.SIGKILL)
    owner.process.wait()
    killed_at = time.monotonic()
    # While nobody owns the job, the runtime acks the promotion.
    _publish(url, [_ack(promote, Stage.SEED_STAGE_GERMINATED, Stage.SEED_STAGE_TRAINING, 4)])
    _wait(lambda: _owner(url) == follower.replica_id, "the job was not taken over", [follower],
          timeout_s=LEASE_S + _TAKEOVER_MARGIN_S + 10)
    took_s = time.monotonic() - killed_at
    assert took_s <= LEASE_S + _TAKEOVER_MARGIN_S, f"took the job over after {took_s:.1f} s"
    # Taken over with epoch 3 decided: a new owner that had not loaded the saved decisions
    # would decide epoch 3 again now (promote again, and grow again, ignoring the cooldown).
    time.sleep(1.5)  # past the report grace
    assert len(_commands(url)) == 2
    training = {"fc2": _health(4, "fc2", stages={1: Stage.SEED_STAGE_TRAINING},
                               ready_for={1: Stage.SEED_STAGE_GRAFTING})}
    _publish(url, _end_of_epoch(4, training))
    _wait(lambda: len(_commands(url)) >= 4, "epoch 4 not decided after the takeover",
          [follower])

    time.sleep(1.5)  # past the report grace: anything else it would send is out by now
    sent = _commands(url)
    assert len(sent) == 4, [c.WhichOneof("action") for _, c in sent]
    (_, graft), (_, regrow) = sent[2:]
    assert {s for s, _ in sent[2:]} == {follower.name}
    assert graft.advance.target_stage == Stage.SEED_STAGE_GRAFTING and graft.apply_at_epoch == 5
    # On the plateau the dead owner saw (five epochs) and out of its cooldown: it grows again,
    # elsewhere than the seed already grown, so it knew what the dead owner had decided.
    assert regrow.WhichOneof("action") == "germinate"
    assert (regrow.layer_id, regrow.seed_index) == ("fc1", 0)
    ids = [c.command_id for _, c in sent]
    assert len(set(ids)) == 4, "no command sent twice, none with another's id"
    # The survivor decided epoch 4 only; epochs 2 and 3 were not decided again.
    text = follower.metrics()
    assert _metric(text, 'tamiyo_decisions_total{kind="advance"}') == 1
    assert _metric(text, 'tamiyo_decisions_total{kind="germinate"}') == 1
    # The promotion's ack, read while following, resolved it at the takeover.
    assert _metric(text, 'tamiyo_acks_total{reason="OK"}') == 1
    with redis.Redis.from_url(url) as client:
        view = JobView.from_json(client.hget(job_key(JOB), "state"))
    assert view.last_decided_epoch == 4 and promote.command_id not in view.pending
    assert set(view.pending) == {graft.command_id, regrow.command_id}
    assert _metric(text, "tamiyo_leased_jobs") == 1

    follower.process.send_signal(signal.SIGTERM)
    assert follower.process.wait(30) == 0
    assert _owner(url) is None, "released at a graceful shutdown"
    logs = follower.logs()
    assert f"job {JOB}: lease taken by replica {follower.replica_id}" in logs
    assert "Traceback" not in logs
