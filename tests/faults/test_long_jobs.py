"""Long jobs leave a bounded bus, on a real Redis (the corpus's broker: the embedded 6.2, or the
server OONA_FAULTS_REDIS_URL names): a job's command stream is deleted when the job ends and
every dedupe key expires, counted key by key; a job id used again inherits none of the old job's
commands; a command group lost to NOGROUP is made again after the last entry read, so nothing
is read twice and nothing written meanwhile is missed. The runtime is `kasmina.attach` in this
process (its command inbox is the code under test); the commands are published as Tamiyo
publishes them (event id = command id, deduplicated)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import kasmina
import oona
import pytest
import redis
import torch
from kasmina import SeedStage
from oona import streams
from oona.contracts import AckReason, Cull, Germinate, LifecycleCommand
from oona.scripts import dedupe_prefix
from torch import nn

pytestmark = pytest.mark.integration
N_COMMANDS = 40


def _model() -> nn.Module:
    torch.manual_seed(0)
    return kasmina.wrap(nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 3)), seeds_per_layer=4,
                        exclude=("1",))


def _command(job: str, seed: int, **action: object) -> LifecycleCommand:
    action = action or {"germinate": Germinate(blueprint_name="residual_mlp")}
    return LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id="0",
                            seed_index=seed, **action)


def _publish(settings: oona.BusSettings, job: str, commands: list[LifecycleCommand],
             resend: bool = False) -> None:
    async def body() -> None:
        async with oona.open_bus(settings) as bus:
            publisher = bus.publisher("tamiyo-test")
            for command in commands:  # a resend has a new event id, as Tamiyo's retries do
                event_id = f"{command.command_id}#2" if resend else command.command_id
                await publisher.publish(streams.commands(job), command, event_id=event_id)

    asyncio.run(body())


def _wait(condition, timeout: float = 15.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _arrived(runtime) -> int:  # noqa: ANN001
    return len(runtime._waiting) + len(runtime._commands.received)


def _boundary(runtime, model: nn.Module) -> list:  # noqa: ANN001
    model(torch.randn(8, 4)).sum().backward()
    runtime.step(0.5)
    return runtime.end_epoch(0.5)


def _job_keys(client: redis.Redis, job: str) -> list[bytes]:
    """Every key of the job's command stream: the stream, its DLQ, its dedupe keys."""
    return sorted(client.scan_iter(match=streams.commands(job) + "*",
                                   count=1000))


def test_a_job_leaves_no_key_behind_but_dedupe_keys_that_expire(fault_broker) -> None:
    job = f"long-{uuid.uuid4().hex[:8]}"
    # A short dedupe window, so the test sees the keys go; the default is a day.
    settings = dataclasses.replace(oona.BusSettings.from_dsn(fault_broker.url), dedupe_ttl_s=2)
    client = redis.Redis.from_url(fault_broker.url)
    model = _model()
    runtime = kasmina.attach(model, job, settings)
    # A long job in miniature: a cull of a dormant seed is refused, so the commands can go on
    # forever; each is answered at its boundary, one command per boundary.
    commands = [_command(job, i % 4, cull=Cull()) for i in range(N_COMMANDS)]
    try:
        for command in commands:
            _publish(settings, job, [command])
            _wait(lambda: _arrived(runtime) == 1)
            (ack,) = _boundary(runtime, model)
            assert ack.command_id == command.command_id
        stream = streams.commands(job)
        dedupe = [k for k in _job_keys(client, job) if k.startswith(
            dedupe_prefix(stream).encode())]
        # One dedupe key per command published, each with an expiry within the window.
        assert len(dedupe) == N_COMMANDS
        assert all(0 < client.ttl(k) <= settings.dedupe_ttl_s for k in dedupe)
        assert client.xlen(stream) == N_COMMANDS
    finally:
        runtime.close()
    # The job ended with everything answered: its stream (and group) are gone at once...
    assert not client.exists(streams.commands(job))
    assert len(_job_keys(client, job)) == N_COMMANDS  # ...the dedupe keys only are left
    time.sleep(settings.dedupe_ttl_s + 1.0)
    assert _job_keys(client, job) == []  # and they expire: nothing of the job remains


def test_a_job_id_used_again_inherits_none_of_the_old_jobs_commands(fault_broker) -> None:
    """Commands written to a job as it ends (a controller's resend, a late decision) were meant
    for that job: the next job of the same id must not apply them. Before, the group outlived
    the job and its next runtime read them."""
    job = f"again-{uuid.uuid4().hex[:8]}"
    settings = oona.BusSettings.from_dsn(fault_broker.url)
    model = _model()
    first = kasmina.attach(model, job, settings)
    old = _command(job, 1)
    try:
        _publish(settings, job, [old])
        _wait(lambda: _arrived(first) == 1)
        assert [a.command_id for a in _boundary(first, model)] == [old.command_id]
        first._commands.stop_reading()  # the job is ending: its last read is done
        late = _command(job, 2)
        _publish(settings, job, [old], resend=True)
        _publish(settings, job, [late])
        assert client_len(fault_broker.url, job) == 3
    finally:
        first.close()
    model = _model()
    again = kasmina.attach(model, job, settings)
    try:
        time.sleep(1.0)  # longer than the reader's block: an inherited entry would be here
        assert _arrived(again) == 0
        new = _command(job, 3)
        _publish(settings, job, [new])
        _wait(lambda: _arrived(again) == 1)
        assert [a.command_id for a in _boundary(again, model)] == [new.command_id]
        layer = kasmina.seed_layers(model)[0]
        assert [layer.stage_of(i) for i in (1, 2, 3)] == [
            SeedStage.DORMANT, SeedStage.DORMANT, SeedStage.GERMINATED]
    finally:
        again.close()


def client_len(url: str, job: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.xlen(streams.commands(job)))


def test_a_lost_command_group_is_made_again_after_the_last_command_read(fault_broker) -> None:
    """XGROUP DESTROY under a running job (an operator, or a server that lost the group): the
    inbox gets NOGROUP and makes the group again after what it had read, not from "0": the
    answered command is not delivered again (no duplicate ack), the one written meanwhile is."""
    job = f"nogroup-{uuid.uuid4().hex[:8]}"
    settings = oona.BusSettings.from_dsn(fault_broker.url)
    client = redis.Redis.from_url(fault_broker.url)
    model = _model()
    runtime = kasmina.attach(model, job, settings)
    try:
        first = _command(job, 1)
        _publish(settings, job, [first])
        _wait(lambda: _arrived(runtime) == 1)
        assert [a.command_id for a in _boundary(runtime, model)] == [first.command_id]
        _wait(lambda: client.xpending(streams.commands(job), f"kasmina-{job}")["pending"] == 1)
        # Its delivery is acked at a later boundary, once its answer is on the bus (one
        # boundary was once not enough on a loaded machine): a few, with the usual bound.
        deadline = time.monotonic() + 15.0
        while client.xpending(streams.commands(job), f"kasmina-{job}")["pending"]:
            assert time.monotonic() < deadline, "the answered command's delivery was never acked"
            assert _boundary(runtime, model) == [], "a command answered twice"
            time.sleep(0.05)
        assert client.xgroup_destroy(streams.commands(job), f"kasmina-{job}") == 1
        second = _command(job, 2)
        _publish(settings, job, [second])
        _wait(lambda: _arrived(runtime) >= 1)
        time.sleep(1.0)  # a replay from "0" would bring `first` back meanwhile
        acks = _boundary(runtime, model)
        assert [a.command_id for a in acks] == [second.command_id]
        assert acks[0].reason == AckReason.ACK_REASON_OK
    finally:
        runtime.close()
