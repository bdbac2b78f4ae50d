"""A job's execution path on a real Redis: it follows the `kasmina.execution_path` feature flag
(oona.flags), taken at attach and re-read at every boundary, where the kill switch sends a canary
job back to the legacy path with the legacy path's state bit for bit as it was; and a
`switch_path` lifecycle command moves the job's DualPathLayers at the boundary it is applied."""

from __future__ import annotations

import asyncio
import time
import uuid

import kasmina
import oona
import torch
from kasmina import KasminaConfig, SeedStage
from oona import streams
from oona.contracts import LifecycleCommand, SwitchPath
from oona.flags import EXECUTION_PATH, FlagStore, sync_client
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
