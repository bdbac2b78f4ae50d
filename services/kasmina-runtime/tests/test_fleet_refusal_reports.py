"""A Germinate carrying a spec that the runtime refuses for a blueprint reason (no bank with room
for it, or no fit for the chunk) gets a field report, so Karn counts the refusal against the spec
(its search retires a proposal the runtimes keep refusing); other answers get none."""

from __future__ import annotations

import asyncio
import time
import uuid

import kasmina
import oona
import torch
from kasmina.fleet import CommandTarget
from kasmina.fleet.wire import refusal_to_field_report
from oona import contracts as wire
from oona import streams
from oona.contracts import AckReason, FieldReport, Germinate, LifecycleCommand, SeedStage
from torch import nn

K = wire.BlueprintKind
BUILT_IN = ("residual_mlp", "low_rank", "linear")  # not specs other tests registered


def model():
    torch.manual_seed(0)  # one seed layer "0": 4 chunks of 3 features, banks of the catalog's size
    return kasmina.wrap(nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 3)), seeds_per_layer=4,
                        exclude=("1",), config=kasmina.KasminaConfig(blueprints=BUILT_IN))


def germinate(job, seed, spec=None, **blueprint):
    g = Germinate(blueprint_spec=spec, strategy_name="fixed_ramp") if spec else Germinate(
        **blueprint)
    return LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id="0",
                            seed_index=seed, germinate=g)


def too_wide(blueprint_id):  # wider than the residual_mlp bank (hidden 16)
    return wire.BlueprintSpec(name=f"residual_mlp.t{blueprint_id}", blueprint_id=blueprint_id,
                              kind=K.BLUEPRINT_KIND_RESIDUAL_MLP, hidden=17)


def test_blueprint_refusals_of_a_spec_are_reported_and_nothing_else_is():
    layers = kasmina.seed_layers(model())
    target = CommandTarget("j", layers)

    def answer(cmd):
        ack = target.apply(cmd, 4, 40)
        return ack, refusal_to_field_report(cmd, ack, target.layers.get(cmd.layer_id), False,
                                            "val_loss")

    wide = germinate("j", 1, too_wide(1_000_301))
    ack, report = answer(wide)
    assert ack.reason == AckReason.ACK_REASON_UNKNOWN_BLUEPRINT
    assert report.report_id == f"j/0/1/refused:{wide.command_id}"
    assert (report.job_id, report.layer_id, report.seed_index) == ("j", "0", 1)
    assert (report.blueprint_id, report.blueprint_name) == (1_000_301, "residual_mlp.t1000301")
    assert report.final_stage == SeedStage.SEED_STAGE_DORMANT and not report.history
    assert report.end_reason.startswith("refused: ACK_REASON_UNKNOWN_BLUEPRINT: ")
    assert "bank_hidden" in report.end_reason
    assert report.chunk_size == 3 and report.execution_path == "chunked"
    assert report.strategy_name == "" and not report.higher_is_better
    assert report.metric_before != report.metric_before  # NaN: no metric to judge it on
    # Does not fit the chunk (low_rank needs chunks of 5 features or more).
    narrow = wire.BlueprintSpec(name="low_rank.t1", blueprint_id=1_000_302,
                                kind=K.BLUEPRINT_KIND_LOW_RANK, rank=2, min_chunk_size=5)
    ack, report = answer(germinate("j", 2, narrow))
    assert ack.reason == AckReason.ACK_REASON_BLUEPRINT_DOES_NOT_FIT
    assert report.blueprint_id == 1_000_302
    # By name (no spec: nothing Karn proposed), a success, and refusals that say nothing of the
    # blueprint: no report.
    ack, report = answer(germinate("j", 2, blueprint_name="nope"))
    assert ack.reason == AckReason.ACK_REASON_UNKNOWN_BLUEPRINT and report is None
    fits = wire.BlueprintSpec(name="residual_mlp.t2", blueprint_id=1_000_303,
                              kind=K.BLUEPRINT_KIND_RESIDUAL_MLP, hidden=8)
    ack, report = answer(germinate("j", 3, fits))
    assert ack.success and report is None
    ack, report = answer(germinate("j", 3, fits))  # seed 3 is GERMINATED now
    assert ack.reason == AckReason.ACK_REASON_REFUSED_TRANSITION and report is None
    ack, report = answer(germinate("j", 9, too_wide(1_000_304)))
    assert ack.reason == AckReason.ACK_REASON_UNKNOWN_SEED and report is None


async def _publish(url, stream, command, event_id):
    async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
        await bus.publisher("test").publish(stream, command, event_id=event_id)




def _wait_for_command(runtime, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not (runtime._waiting or runtime._commands.received):
        assert time.monotonic() < deadline, "the command never arrived"
        time.sleep(0.02)


def test_the_runtime_publishes_one_report_per_refused_command(oona_redis_url, drain_stream):
    job = f"job-{uuid.uuid4().hex[:8]}"
    m = model()
    runtime = kasmina.attach(m, job, oona.BusSettings.from_dsn(oona_redis_url), mode="min")
    try:
        wide = germinate(job, 1, too_wide(1_000_311))
        asyncio.run(_publish(oona_redis_url, streams.commands(job), wide, wide.command_id))
        _wait_for_command(runtime)
        (ack,) = runtime.end_epoch(0.9)
        assert ack.reason == AckReason.ACK_REASON_UNKNOWN_BLUEPRINT
        # A resend (a controller that missed the ack) is answered as a duplicate: no report.
        asyncio.run(_publish(oona_redis_url, streams.commands(job), wide, None))
        _wait_for_command(runtime)
        (again,) = runtime.end_epoch(0.9)
        assert again.reason == AckReason.ACK_REASON_DUPLICATE
    finally:
        runtime.close()
    reports = [r for r in asyncio.run(drain_stream(oona_redis_url, streams.FIELD_REPORTS,
                                                   FieldReport)) if r.job_id == job]
    assert [(r.report_id, r.blueprint_id, r.metric_name) for r in reports] == [
        (f"{job}/0/1/refused:{wide.command_id}", 1_000_311, "val_metric")]
