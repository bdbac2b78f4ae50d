"""A job's flags on a real Redis. The execution path: it follows the `kasmina.execution_path`
feature flag (oona.flags), taken at attach and re-read at every boundary, where the kill switch
sends a canary job back to the legacy path with the legacy path's state bit for bit as it was;
and a `switch_path` lifecycle command moves the job's DualPathLayers at the boundary it is
applied. The telemetry level: `kasmina.telemetry_level` sets every seed layer's telemetry
cadence at the next boundary; unset or invalid, each layer keeps its own."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import kasmina
import oona
import torch
from kasmina import KasminaConfig, SeedStage
from oona import streams
from oona.contracts import LifecycleCommand, SwitchPath
from oona.flags import (
    DEFAULT_FLAGS,
    EXECUTION_PATH,
    TELEMETRY_LEVEL,
    FlagKeys,
    FlagStore,
    sync_client,
)
from openfeature.evaluation_context import EvaluationContext
from torch import nn


def legacy_model() -> nn.Module:
    torch.manual_seed(0)
    return kasmina.wrap(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)),
                        seeds_per_layer=4,
                        config=KasminaConfig(execution_path="legacy", ramp_steps=3))


def epoch(runtime: kasmina.FleetRuntime, model: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.01)
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        runtime.step(loss.detach())
    runtime.end_epoch(0.5)


def test_the_kill_switch_sends_a_canary_job_back_to_legacy_bit_exactly(oona_redis_url):
    settings = oona.BusSettings.from_dsn(oona_redis_url)
    store = FlagStore(sync_client(settings))
    # every job on the new path (the test Redis is shared: a kill left by another test released)
    store.set(EXECUTION_PATH, "test", rollout_percent=100.0, killed=False)
    model, x = legacy_model(), torch.randn(16, 6)
    layer = kasmina.seed_layers(model)[0]
    legacy_before = {k: v.clone() for k, v in layer.legacy.state_dict().items()
                     if not k.startswith("host.") and not k.endswith("_extra_state")}
    runtime = kasmina.attach(model, f"job-{uuid.uuid4().hex[:8]}", settings, flags=True)
    try:
        assert set(runtime.execution_paths.values()) == {"chunked"}  # at once, at attach
        layer.germinate(1)
        layer.transition(1, SeedStage.TRAINING)
        epoch(runtime, model, x)
        assert layer.execution_path == "chunked" and layer.stage_of(1) is SeedStage.TRAINING
        store.kill(EXECUTION_PATH, "test", reason="regression")
        deadline = time.monotonic() + 5
        while runtime._flags.resolve_string_details(
                EXECUTION_PATH, "x", oona.flags.EvaluationContext(runtime.job_id)).value != (
                    "legacy"):
            assert time.monotonic() < deadline, "the kill switch never reached the job"
            time.sleep(0.05)
        epoch(runtime, model, x)  # the boundary reads it: back to legacy, growth rolled back
        assert set(runtime.execution_paths.values()) == {"legacy"}
        assert layer.chunked.stage_of(1) is SeedStage.ROLLED_BACK
        after = layer.legacy.state_dict()
        for key, value in legacy_before.items():
            assert torch.equal(value.nan_to_num(), after[key].nan_to_num()), key
        with torch.no_grad():  # the output: the host's, exactly (no legacy growth yet)
            probe = torch.ones(3, 6)
            assert torch.equal(layer(probe), layer.host(probe))
    finally:
        runtime.close()
        store.set(EXECUTION_PATH, "test", killed=False, rollout_percent=0.0)


def test_without_flags_the_path_is_the_models_own(oona_redis_url):
    settings = oona.BusSettings.from_dsn(oona_redis_url)
    FlagStore(sync_client(settings)).set(EXECUTION_PATH, "test", rollout_percent=100.0,
                                         killed=False)
    model = legacy_model()
    runtime = kasmina.attach(model, f"job-{uuid.uuid4().hex[:8]}", settings)
    try:
        assert set(runtime.execution_paths.values()) == {"legacy"}
    finally:
        runtime.close()


def _switch(job: str, path: str, layer_id: str = "") -> LifecycleCommand:
    return LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id=layer_id,
                            switch_path=SwitchPath(path=path))


def _publish(url: str, job: str, *commands: LifecycleCommand) -> None:
    async def body() -> None:
        async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
            for command in commands:
                await bus.publisher("test").publish(streams.commands(job), command,
                                                    event_id=command.command_id)
    asyncio.run(body())


def test_a_switch_path_command_moves_the_jobs_dual_layers_at_its_boundary(oona_redis_url):
    settings = oona.BusSettings.from_dsn(oona_redis_url)
    model, x = legacy_model(), torch.randn(16, 6)
    job = f"job-{uuid.uuid4().hex[:8]}"
    runtime = kasmina.attach(model, job, settings)
    try:
        good, bad = _switch(job, "chunked"), _switch(job, "fast")
        _publish(oona_redis_url, job, good, bad, _switch(job, "legacy", layer_id="nope"))
        deadline = time.monotonic() + 10
        while len(runtime._commands.received) + len(runtime._waiting) < 3:
            assert time.monotonic() < deadline, "the commands never arrived"
            time.sleep(0.02)
        opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.01)
        model(x).square().mean().backward()
        opt.step()
        runtime.step(0.5)
        acks = {a.command_id: a for a in runtime.end_epoch(0.5)}
        assert acks[good.command_id].success
        assert not acks[bad.command_id].success and "switch_path.path" in acks[
            bad.command_id].message
        assert set(runtime.execution_paths.values()) == {"chunked"}  # at that boundary
    finally:
        runtime.close()


BATCH, STEPS = 16, 20


def _sampled_epoch(runtime: kasmina.FleetRuntime, model: nn.Module, x: torch.Tensor
                   ) -> list[float]:
    """One epoch of STEPS training steps; the rows each seed layer's telemetry accumulated."""
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.01)
    for _ in range(STEPS):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        runtime.step(loss.detach())
    rows = [float(layer.telemetry.rows) for layer in runtime.layers]
    runtime.end_epoch(0.5)
    return rows


def _tracked_rows(first_step: int, every: int) -> float:
    """The rows accumulated over an epoch whose steps start at `first_step`, every k-th one
    (a cadence set at the boundary holds from the epoch's first forward on)."""
    return BATCH * sum((first_step + i) % every == 0 for i in range(STEPS))


def test_the_telemetry_level_sets_the_layers_cadence_at_the_next_boundary(oona_redis_url,
                                                                          caplog):
    caplog.set_level(logging.WARNING, logger="kasmina.fleet.runtime")
    settings = oona.BusSettings.from_dsn(oona_redis_url)
    store = FlagStore(sync_client(settings))
    store.client.hdel(FlagKeys().definitions, TELEMETRY_LEVEL)  # unset (the Redis is shared)
    torch.manual_seed(0)
    model = kasmina.wrap(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)),
                         seeds_per_layer=4, config=KasminaConfig(telemetry_every=3))
    x = torch.randn(BATCH, 6)
    runtime = kasmina.attach(model, f"job-{uuid.uuid4().hex[:8]}", settings, flags=True)
    levels = dict(DEFAULT_FLAGS[TELEMETRY_LEVEL].variants)

    def change(**fields: object) -> None:
        """Set the flag (or kill it) and wait until the job's provider serves that version."""
        version = (store.kill(TELEMETRY_LEVEL, "test") if fields.pop("kill", False)
                   else store.set(TELEMETRY_LEVEL, "test", **fields)).version
        deadline = time.monotonic() + 5
        while (runtime._flags.resolve_object_details(
                TELEMETRY_LEVEL, None, EvaluationContext(runtime.job_id)).flag_metadata
               .get("version")) != version:
            assert time.monotonic() < deadline, "the change never reached the job"
            time.sleep(0.05)

    try:
        assert len(runtime.layers) == 2
        # Unset: each layer's own cadence, every 3rd step.
        assert set(runtime.telemetry_every.values()) == {3}
        assert _sampled_epoch(runtime, model, x) == [_tracked_rows(0, 3)] * 2
        change(rollout_variant="sampled", rollout_percent=100.0)
        # Changed mid-epoch: this epoch keeps its cadence, the boundary takes the new one.
        assert _sampled_epoch(runtime, model, x) == [_tracked_rows(STEPS, 3)] * 2
        assert set(runtime.telemetry_every.values()) == {10}
        # Steps 40 and 50 of 40..59: the new cadence from the epoch's first forward.
        assert _sampled_epoch(runtime, model, x) == [_tracked_rows(2 * STEPS, 10)] * 2
        assert _tracked_rows(2 * STEPS, 10) == 2 * BATCH
        change(variants=levels | {"every2": "2"}, rollout_variant="every2")  # an integer
        _sampled_epoch(runtime, model, x)
        assert set(runtime.telemetry_every.values()) == {2}
        assert caplog.records == []
        change(variants=levels | {"often": "often"}, rollout_variant="often")
        for _ in range(2):  # not a level: each layer's own cadence again, logged once
            _sampled_epoch(runtime, model, x)
            assert set(runtime.telemetry_every.values()) == {3}
        (line,) = [r.getMessage() for r in caplog.records]
        assert f"flag {TELEMETRY_LEVEL}: value 'often' ignored" in line, line
        change(kill=True)  # the default variant, "full": every step
        _sampled_epoch(runtime, model, x)
        assert set(runtime.telemetry_every.values()) == {1}
        expected = _tracked_rows(runtime.step_count, 1)
        assert _sampled_epoch(runtime, model, x) == [expected] * 2
    finally:
        runtime.close()
        store.client.hdel(FlagKeys().definitions, TELEMETRY_LEVEL)
        store.client.close()
