"""The runtime joined to a real Redis (embedded, or OONA_REDIS_URL): commands in, acks, health
reports, field reports and epoch events out."""

from __future__ import annotations

import asyncio
import uuid

import kasmina
import oona
import pytest
import torch
from kasmina import SeedStage
from kasmina.fleet import CommandTarget, health_to_proto
from oona import streams
from oona.contracts import (
    AckReason,
    Advance,
    CommandAck,
    Cull,
    EpochEvent,
    EpochEventKind,
    FieldReport,
    Germinate,
    LayerHealthReport,
    LifecycleCommand,
    PauseAdaptation,
    stage_from_wire,
    stage_to_wire,
)
from torch import nn

S = SeedStage


def command(job, layer="0", seed=1, **action):
    return LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id=layer,
                            seed_index=seed, **action)


def advance(job, stage, seed=1, force=False):
    return command(job, seed=seed, advance=Advance(target_stage=stage_to_wire(stage), force=force))


def model():
    torch.manual_seed(0)
    return kasmina.wrap(nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 3)), seeds_per_layer=4,
                        exclude=("1",))


def test_commands_map_to_acks_with_reasons_and_refusals_change_nothing():
    m = model()
    target = CommandTarget("j", kasmina.seed_layers(m))
    layer = kasmina.seed_layers(m)[0]
    ok = target.apply(command("j", germinate=Germinate(blueprint_name="residual_mlp")), 0, 0)
    assert ok.success and ok.reason == AckReason.ACK_REASON_OK
    assert stage_from_wire(ok.stage_after) == S.GERMINATED
    state = layer.state.clone()
    cases = [
        (command("other", germinate=Germinate()), AckReason.ACK_REASON_UNKNOWN_JOB),
        (command("j", layer="9", cull=Cull()), AckReason.ACK_REASON_UNKNOWN_LAYER),
        (command("j", seed=4, cull=Cull()), AckReason.ACK_REASON_UNKNOWN_SEED),
        (LifecycleCommand(command_id="x", job_id="j", layer_id="0", seed_index=1),
         AckReason.ACK_REASON_INVALID),
        (advance("j", S.FOSSILIZED), AckReason.ACK_REASON_REFUSED_TRANSITION),
        (command("j", seed=2, germinate=Germinate(blueprint_name="nope")),
         AckReason.ACK_REASON_UNKNOWN_BLUEPRINT),
        (command("j", seed=2, germinate=Germinate(blueprint_name="low_rank")),
         AckReason.ACK_REASON_BLUEPRINT_DOES_NOT_FIT),
    ]
    for cmd, reason in cases:
        ack = target.apply(cmd, 0, 0)
        assert not ack.success and ack.reason == reason, (cmd, ack)
        assert torch.equal(layer.state, state)
    assert target.apply(advance("j", S.TRAINING), 0, 0).success
    gate = target.apply(advance("j", S.GRAFTING), 0, 0)
    assert gate.reason == AckReason.ACK_REASON_GATE_NOT_PASSED and "TRAINING" in gate.message
    assert target.apply(command("j", layer="", seed=0, pause_adaptation=PauseAdaptation()),
                        0, 0).success
    paused = target.apply(command("j", seed=3, germinate=Germinate()), 0, 0)
    assert paused.reason == AckReason.ACK_REASON_ADAPTATION_PAUSED
    assert target.apply(command("j", cull=Cull()), 0, 0).success  # culls still allowed


def test_health_report_to_the_wire():
    m = model()
    layer = kasmina.seed_layers(m)[0]
    layer.germinate(2, "linear")
    m.train()
    m(torch.randn(5, 4))
    wire = health_to_proto(layer.end_epoch(0.5), "j")
    assert wire.num_seeds == 4 and wire.features == 12 and len(wire.chunk_variance) == 4
    assert [stage_from_wire(s) for s in wire.stage] == [0, 0, S.GERMINATED, 0]
    assert list(wire.blueprint_id) == [-1, -1, 3, -1] and wire.epoch == 1
    assert not wire.output_grad_sq  # not measured: nothing on the wire
    layer.config = layer.config.replace(track_output_gradient=True)
    m(torch.randn(5, 4)).square().sum().backward()
    report = layer.end_epoch(0.5)
    wire = health_to_proto(report, "j")
    assert list(wire.output_grad_sq) == pytest.approx(report.output_grad_sq.tolist())
    assert len(wire.output_grad_sq) == 4 and min(wire.output_grad_sq) > 0




async def _publish(url, stream, messages, fresh_event_ids=False):
    async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
        publisher = bus.publisher("test")
        for m in messages:
            await publisher.publish(stream, m,
                                    event_id=None if fresh_event_ids else m.command_id)


def _wait_for_inbox(runtime, n, timeout=10.0):
    """Until `n` commands have arrived at the runtime and not been answered yet."""
    import time

    def held():
        return len(runtime._waiting) + len(runtime._commands.received)

    deadline = time.monotonic() + timeout
    while held() < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held() >= n


def test_runtime_applies_commands_once_and_publishes_what_happened(oona_redis_url, drain_stream):
    job = f"job-{uuid.uuid4().hex[:8]}"
    m = model()
    runtime = kasmina.attach(m, job, oona.BusSettings.from_dsn(oona_redis_url),
                             mode="max")
    try:
        germ = command(job, germinate=Germinate(blueprint_name="residual_mlp"))
        promote = advance(job, S.TRAINING)
        later = command(job, seed=1, cull=Cull())
        later.apply_at_epoch = 2
        asyncio.run(_publish(oona_redis_url, streams.commands(job), [germ, promote, later]))
        _wait_for_inbox(runtime, 3)
        lags = runtime.take_command_lags()  # publication to arrival, one per command
        assert len(lags) == 3 and all(0 <= lag < 30 for lag in lags), lags
        assert runtime.take_command_lags() == []
        x = torch.randn(8, 4)
        for _ in range(3):
            m(x).sum().backward()
            runtime.step(0.5)
        acks = runtime_acks = runtime.end_epoch(0.4)  # boundary 1: germinate + promote
        assert [a.command_id for a in acks] == [germ.command_id, promote.command_id]
        assert all(a.success for a in acks)  # (the cull waits)
        # A resend under a new event id passes the bus's dedupe; the runtime's catches it.
        asyncio.run(_publish(oona_redis_url, streams.commands(job), [promote], True))
        _wait_for_inbox(runtime, 2)
        acks = runtime.end_epoch(0.45)  # boundary 2: the cull; the resend is not applied
        assert [a.command_id for a in acks] == [later.command_id, promote.command_id]
        first, duplicate = runtime_acks[1], acks[1]
        assert acks[0].success and duplicate.reason == AckReason.ACK_REASON_DUPLICATE
        # The duplicate's ack carries the first answer's outcome, so a controller whose first
        # ack was late or lost learns what really happened.
        assert duplicate.original_reason == first.reason == AckReason.ACK_REASON_OK
        assert (duplicate.success, duplicate.stage_before, duplicate.stage_after,
                duplicate.applied_epoch, duplicate.applied_step) == (
                    first.success, first.stage_before, first.stage_after, first.applied_epoch,
                    first.applied_step)
        assert "duplicate" in duplicate.message and "ACK_REASON_OK" in duplicate.message
    finally:
        runtime.close()
    wire_acks = asyncio.run(drain_stream(oona_redis_url, streams.CONTROL_ACKS, CommandAck))
    mine = [a for a in wire_acks if a.job_id == job]
    assert [a.command_id for a in mine] == [germ.command_id, promote.command_id,
                                            later.command_id, promote.command_id]
    reports = [r for r in asyncio.run(drain_stream(oona_redis_url, streams.TELEMETRY_SEED_HEALTH,
                                               LayerHealthReport)) if r.job_id == job]
    assert [(r.layer_id, r.epoch) for r in reports] == [("0", 1), ("0", 2)]
    assert stage_from_wire(reports[0].stage[1]) == S.TRAINING
    fields = [f for f in asyncio.run(drain_stream(oona_redis_url, streams.FIELD_REPORTS,
                                              FieldReport)) if f.job_id == job]
    assert len(fields) == 1 and stage_from_wire(fields[0].final_stage) == S.CULLED
    assert fields[0].blueprint_name == "residual_mlp" and fields[0].chunk_size == 3
    events = [e for e in asyncio.run(drain_stream(oona_redis_url, streams.EPOCH_EVENTS, EpochEvent))
              if e.job_id == job]
    assert [e.kind for e in events] == [
        EpochEventKind.EPOCH_EVENT_KIND_JOB_STARTED, EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED,
        EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED, EpochEventKind.EPOCH_EVENT_KIND_JOB_FINISHED]
    assert events[1].val_metric == pytest.approx(0.4) and events[1].higher_is_better


@pytest.mark.parametrize("printed,chosen", [("v=7.2.4", True), ("v=6.2.14", False),
                                            ("no version here", False)])
def test_the_fleet_runs_a_redis_7_found_on_path_else_the_embedded_one(tmp_path, monkeypatch,
                                                                      printed, chosen):
    from kasmina.fleet_run import default_redis_server
    server = tmp_path / "redis-server"
    server.write_text(f"#!/bin/sh\necho 'Redis server {printed} sha=0'\n")
    server.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert default_redis_server() == (str(server) if chosen else None)
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert default_redis_server() is None
