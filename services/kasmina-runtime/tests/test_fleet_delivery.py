"""One at-least-once mechanism for commands, on a real Redis: a delivery is acked on the bus
only after the command was applied or refused; a runtime that dies first leaves it pending and
the job's next runtime applies it, once; the answered ids travel with the checkpoint, so a
replay into a resumed run is refused; bad input is refused or dead-lettered, and the job
trains on."""

from __future__ import annotations

import asyncio
import time
import uuid

import kasmina
import oona
import redis
import torch
from kasmina import SeedStage
from oona import streams
from oona.contracts import (
    AckReason,
    Advance,
    CommandAck,
    Cull,
    EmergencyStop,
    Germinate,
    LifecycleCommand,
)
from oona.envelope import ENVELOPE_FIELD, encode
from prometheus_client import REGISTRY
from torch import nn


def model():
    torch.manual_seed(0)
    return kasmina.wrap(nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 3)), seeds_per_layer=4,
                        exclude=("1",))


def germinate(job, seed=1, **fields):
    return LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id="0",
                            seed_index=seed, germinate=Germinate(blueprint_name="residual_mlp"),
                            **fields)


async def _publish(url, job, messages, fresh_event_ids=False):
    async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
        publisher = bus.publisher("test")
        for m in messages:
            await publisher.publish(streams.commands(job), m,
                                    event_id=None if fresh_event_ids else m.command_id)


def publish(url, job, *messages, fresh_event_ids=False):
    asyncio.run(_publish(url, job, messages, fresh_event_ids))


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def pending(client, job):
    return client.xpending(streams.commands(job), f"kasmina-{job}")["pending"]


def arrived(runtime):
    return len(runtime._waiting) + len(runtime._commands.received)


def boundary(runtime, m, metric=0.5):
    m(torch.randn(8, 4)).sum().backward()
    runtime.step(0.5)
    return runtime.end_epoch(metric)


def test_a_delivery_is_acked_only_after_its_command_is_answered(oona_redis_url):
    job, client = f"job-{uuid.uuid4().hex[:8]}", redis.Redis.from_url(oona_redis_url)
    m = model()
    runtime = kasmina.attach(m, job, oona.BusSettings.from_dsn(oona_redis_url), last_epoch=10)
    try:
        now, later = germinate(job, seed=1), germinate(job, seed=2, apply_at_epoch=2)
        publish(oona_redis_url, job, now, later)
        wait_until(lambda: arrived(runtime) == 2)
        assert pending(client, job) == 2  # in memory, not acked on the bus
        acks = boundary(runtime, m)
        assert [a.command_id for a in acks] == [now.command_id] and acks[0].success
        assert runtime._outbox.flush(10)  # its CommandAck is on the bus...
        time.sleep(1.0)  # (longer than the reader's block, so a premature ack would be sent)
        assert pending(client, job) == 2  # ...and its delivery is acked at the next boundary
        assert [a.command_id for a in boundary(runtime, m)] == [later.command_id]
        wait_until(lambda: pending(client, job) == 1)  # `now` acked; `later` answered just now
    finally:
        runtime.close()
    # close publishes, then acks the rest: nothing pending, so the job's stream is deleted
    assert not client.exists(streams.commands(job))


def test_a_command_in_hand_when_the_runtime_dies_is_applied_once_by_the_next(oona_redis_url):
    job, client = f"job-{uuid.uuid4().hex[:8]}", redis.Redis.from_url(oona_redis_url)
    settings = oona.BusSettings.from_dsn(oona_redis_url)
    first = kasmina.attach(model(), job, settings)
    cmd = germinate(job)
    publish(oona_redis_url, job, cmd)
    wait_until(lambda: arrived(first) == 1)
    # The runtime dies before its next boundary: its reader stops, nothing is answered.
    first._commands.close()
    first._outbox.close()
    assert pending(client, job) == 1
    m = model()
    second = kasmina.attach(m, job, settings)
    try:
        acks = boundary(second, m)
        assert [a.command_id for a in acks] == [cmd.command_id] and acks[0].success
        assert kasmina.seed_layers(m)[0].stage_of(1) is SeedStage.GERMINATED
        assert boundary(second, m) == []  # applied once
    finally:
        second.close()
    assert not client.exists(streams.commands(job))  # all acked: deleted with the job


def test_a_command_replayed_into_a_resumed_run_is_refused_as_a_duplicate(oona_redis_url):
    job = f"job-{uuid.uuid4().hex[:8]}"
    settings = oona.BusSettings.from_dsn(oona_redis_url)
    m = model()
    runtime = kasmina.attach(m, job, settings)
    cmd = germinate(job)
    publish(oona_redis_url, job, cmd)
    wait_until(lambda: arrived(runtime) == 1)
    (first,) = boundary(runtime, m)
    assert first.success
    checkpoint = {"model": m.state_dict(), "fleet": runtime.state_dict()}
    runtime.close()
    resumed_model = model()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = kasmina.attach(resumed_model, job, settings)
    resumed.load_state_dict(checkpoint["fleet"])
    try:
        layer = kasmina.seed_layers(resumed_model)[0]
        layer.transition(1, SeedStage.TRAINING, force=True)
        publish(oona_redis_url, job, cmd, fresh_event_ids=True)  # the replay: a new entry
        wait_until(lambda: arrived(resumed) == 1)
        state = layer.state.clone()
        acks = boundary(resumed, resumed_model)
        assert [a.command_id for a in acks] == [cmd.command_id]
        # Not applied again; answered with the outcome the checkpointed run gave it.
        assert acks[0].reason == AckReason.ACK_REASON_DUPLICATE and "duplicate" in acks[0].message
        assert (acks[0].original_reason, acks[0].success, acks[0].stage_after,
                acks[0].applied_epoch) == (first.reason, True, first.stage_after,
                                           first.applied_epoch)
        assert torch.equal(layer.state[:, 0], state[:, 0])  # no stage changed
    finally:
        resumed.close()


def test_a_checkpoint_without_outcomes_still_refuses_its_commands_as_duplicates(
        oona_redis_url):
    """Checkpoints written before outcomes were kept carry ids only: still never applied
    twice, answered as duplicates of an unknown outcome."""
    job = f"job-{uuid.uuid4().hex[:8]}"
    m = model()
    runtime = kasmina.attach(m, job, oona.BusSettings.from_dsn(oona_redis_url))
    cmd = germinate(job)
    runtime.load_state_dict({"command_ids": [cmd.command_id]})
    try:
        publish(oona_redis_url, job, cmd)
        wait_until(lambda: arrived(runtime) == 1)
        (ack,) = boundary(runtime, m)
        assert (ack.reason, ack.original_reason, ack.success) == (
            AckReason.ACK_REASON_DUPLICATE, AckReason.ACK_REASON_UNSPECIFIED, False)
        assert kasmina.seed_layers(m)[0].stage_of(1) is SeedStage.DORMANT
    finally:
        runtime.close()


def test_an_emergency_stop_holds_across_a_resume(oona_redis_url):
    job = f"job-{uuid.uuid4().hex[:8]}"
    settings = oona.BusSettings.from_dsn(oona_redis_url)
    m = model()
    runtime = kasmina.attach(m, job, settings)
    stop = LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job,
                            emergency_stop=EmergencyStop())
    publish(oona_redis_url, job, stop)
    wait_until(lambda: arrived(runtime) == 1)
    assert boundary(runtime, m)[0].success
    checkpoint = {"model": m.state_dict(), "fleet": runtime.state_dict()}
    runtime.close()
    resumed_model = model()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = kasmina.attach(resumed_model, job, settings)
    resumed.load_state_dict(checkpoint["fleet"])
    try:
        publish(oona_redis_url, job, germinate(job))  # growth stays refused after the resume
        wait_until(lambda: arrived(resumed) == 1)
        (ack,) = boundary(resumed, resumed_model)
        assert not ack.success and kasmina.seed_layers(resumed_model)[0].stage_of(1) is (
            SeedStage.DORMANT)
    finally:
        resumed.close()


def test_bad_commands_are_refused_on_arrival_and_the_job_trains_on(oona_redis_url):
    job, client = f"job-{uuid.uuid4().hex[:8]}", redis.Redis.from_url(oona_redis_url)
    m = model()
    runtime = kasmina.attach(m, job, oona.BusSettings.from_dsn(oona_redis_url), last_epoch=20)
    try:
        bad_stage = LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id="0",
                                     seed_index=1, advance=Advance(target_stage=99))
        far = LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id="0",
                               seed_index=1, cull=Cull(), apply_at_epoch=4_000_000_000)
        good = germinate(job, seed=3, apply_at_epoch=3)
        publish(oona_redis_url, job, bad_stage, far, good)
        labels = {"stream": "control.kasmina.commands", "reason": "undecodable"}
        before = REGISTRY.get_sample_value("oona_dead_lettered_total", labels) or 0
        client.xadd(streams.commands(job), {b"envelope": b"\x00not a protobuf"})  # poison
        wait_until(lambda: client.xlen(streams.dead_letters(streams.commands(job))) == 1)
        # counted just after the letter is written (the reader thread): waited for, not raced
        wait_until(lambda: REGISTRY.get_sample_value("oona_dead_lettered_total", labels)
                   == before + 1)
        wait_until(lambda: arrived(runtime) == 3)
        acks = boundary(runtime, m)  # both refused at the first boundary; `good` waits
        assert [(a.command_id, a.reason) for a in acks] == [
            (bad_stage.command_id, AckReason.ACK_REASON_INVALID),
            (far.command_id, AckReason.ACK_REASON_INVALID)]
        assert "99" in acks[0].message and "4000000000" in acks[1].message
        assert boundary(runtime, m) == []
        assert [a.command_id for a in boundary(runtime, m)] == [good.command_id]
        # Due after the job's end: answered at close, so no controller waits on it.
        last = germinate(job, seed=2, apply_at_epoch=20)
        publish(oona_redis_url, job, last)
        wait_until(lambda: arrived(runtime) == 1)
        boundary(runtime, m)
    finally:
        runtime.close()
    assert not client.exists(streams.commands(job))  # all acked: deleted with the job
    acks = [CommandAck.FromString(_payload(f)) for _, f in
            client.xrange(streams.CONTROL_ACKS)]
    mine = {a.command_id: a for a in acks if a.job_id == job}
    assert mine[last.command_id].reason == AckReason.ACK_REASON_EXPIRED


def _payload(fields):
    from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope
    return Envelope.FromString(fields[b"envelope"]).payload


def test_a_command_copied_from_another_jobs_stream_is_dead_lettered_as_wrong_topic(
        oona_redis_url):
    """Signed for job B's stream and written to job A's: the signature holds (the topic is
    signed and unchanged), the topic check stops it before the training thread sees it."""
    job, other = f"job-{uuid.uuid4().hex[:8]}", f"job-{uuid.uuid4().hex[:8]}"
    settings = oona.BusSettings.from_dsn(oona_redis_url, signing_key=b"k" * 32)
    client = redis.Redis.from_url(oona_redis_url)
    m = model()
    runtime = kasmina.attach(m, job, settings)
    try:
        copied = encode(streams.commands(other), germinate(job, seed=2), settings,
                        sender_id="tamiyo")  # job A's command, but signed for B's stream
        client.xadd(streams.commands(job), {ENVELOPE_FIELD: copied.data})
        genuine = encode(streams.commands(job), germinate(job, seed=3), settings,
                         sender_id="tamiyo")
        client.xadd(streams.commands(job), {ENVELOPE_FIELD: genuine.data})
        dlq = streams.dead_letters(streams.commands(job))
        wait_until(lambda: client.xlen(dlq) == 1 and arrived(runtime) == 1)
        (_, letter), = client.xrange(dlq)
        assert letter[b"dlq.reason"] == b"wrong_topic"
        acks = boundary(runtime, m)
        assert len(acks) == 1 and acks[0].success
        assert kasmina.seed_layers(m)[0].stage_of(2) is SeedStage.DORMANT
        assert kasmina.seed_layers(m)[0].stage_of(3) is SeedStage.GERMINATED
    finally:
        runtime.close()
