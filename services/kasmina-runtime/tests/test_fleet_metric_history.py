"""A field report carries the job's metric before its seed germinated (FieldReport.
metric_history: Karn extrapolates the job's trajectory from it, karn.store.trend_gain), and a
checkpoint keeps that history for a resumed job."""

from __future__ import annotations

import asyncio
import uuid

import kasmina
import oona
import pytest
import torch
from kasmina import SeedStage
from kasmina.fleet.runtime import METRIC_HISTORY
from oona import streams
from oona.contracts import Advance, Cull, FieldReport, Germinate, LifecycleCommand, stage_to_wire
from torch import nn


def _command(job, **action):
    return LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id="0",
                            seed_index=1, **action)


async def _publish(url, stream, messages):
    async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
        publisher = bus.publisher("test")
        for m in messages:
            await publisher.publish(stream, m, event_id=m.command_id)




def _runtime(url, job):
    torch.manual_seed(0)
    model = kasmina.wrap(nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 3)), seeds_per_layer=4,
                         exclude=("1",))
    return kasmina.attach(model, job, oona.BusSettings.from_dsn(url), mode="min")


def _wait_for(runtime, n):
    import time
    deadline = time.monotonic() + 10
    while len(runtime._waiting) + len(runtime._commands.received) < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_field_report_carries_the_jobs_metric_up_to_the_germination(oona_redis_url,
                                                                        drain_stream):
    job = f"job-{uuid.uuid4().hex[:8]}"
    runtime = _runtime(oona_redis_url, job)
    try:
        runtime.end_epoch(0.9)  # epochs 1-3, the 2nd a boundary with no metric
        with pytest.warns(RuntimeWarning, match="no validation metric"):
            runtime.end_epoch(None)
        runtime.end_epoch(0.7)
        germinate = _command(job, germinate=Germinate(blueprint_name="residual_mlp"))
        promote = _command(job, advance=Advance(target_stage=stage_to_wire(SeedStage.TRAINING)))
        asyncio.run(_publish(oona_redis_url, streams.commands(job), [germinate, promote]))
        _wait_for(runtime, 2)
        runtime.end_epoch(0.65)  # applied at the 4th boundary: germinated at epoch 3
        asyncio.run(_publish(oona_redis_url, streams.commands(job),
                             [_command(job, cull=Cull())]))
        _wait_for(runtime, 1)
        runtime.end_epoch(0.6)
        assert runtime.metric_history(3)[0] == 0.9 and runtime.metric_history(3)[2] == 0.7
        state = runtime.state_dict()
    finally:
        runtime.close()
    (report,) = [r for r in asyncio.run(drain_stream(
        oona_redis_url, streams.FIELD_REPORTS, FieldReport)) if r.job_id == job]
    history = list(report.metric_history)
    assert history[0] == pytest.approx(0.9) and history[1] != history[1]  # NaN kept in place
    assert history[2] == pytest.approx(0.7) == pytest.approx(report.metric_before)
    assert report.history[0].entered_epoch == 3
    resumed = _runtime(oona_redis_url, f"{job}-r")
    try:
        resumed.load_state_dict(state)
        assert resumed.metric_history(5)[-2:] == pytest.approx([0.65, 0.6])
        assert len(resumed.metric_history(10 * METRIC_HISTORY)) == 0  # none that far on
    finally:
        resumed.close()
