"""A job's execution path follows the `kasmina.execution_path` feature flag (oona.flags) on a
real Redis: taken at attach, re-read at every boundary; the kill switch sends a canary job back
to the legacy path at its next boundary, with the legacy path's state bit for bit as it was."""

from __future__ import annotations

import time
import uuid

import kasmina
import oona
import torch
from kasmina import KasminaConfig, SeedStage
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
    store.set(EXECUTION_PATH, "test", rollout_percent=100.0)  # every job on the new path
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


def test_without_flags_the_path_is_the_models_own(oona_redis_url):
    settings = oona.BusSettings.from_dsn(oona_redis_url)
    FlagStore(sync_client(settings)).set(EXECUTION_PATH, "test", rollout_percent=100.0)
    model = legacy_model()
    runtime = kasmina.attach(model, f"job-{uuid.uuid4().hex[:8]}", settings)
    try:
        assert set(runtime.execution_paths.values()) == {"legacy"}
    finally:
        runtime.close()
