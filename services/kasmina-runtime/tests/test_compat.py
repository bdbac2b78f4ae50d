"""The compatibility matrix of the migration (DESIGN §9, docs/migration.md): each row is a way a
migrating team uses the single-seed layer, kept working beside its chunked replacement.

| single-seed mode        | test_single_seed_mode_is_a_legacy_layer_and_wrap_builds_it   |
| the legacy API          | test_the_legacy_api_drives_the_same_layer_as_the_new_one     |
| in-process telemetry    | test_in_process_telemetry_needs_no_bus                       |
|   beside the bus        | test_a_legacy_model_on_the_bus_reports_and_takes_commands    |
| synchronous control     | test_library_commands_apply_at_once                          |
|   beside async commands | test_a_legacy_model_on_the_bus_reports_and_takes_commands    |
| a hybrid model          | test_a_hybrid_model_grows_both_paths_under_one_controller    |
"""

from __future__ import annotations

import asyncio
import uuid
import warnings

import kasmina
import oona
import pytest
import torch
from kasmina import (
    ControllerConfig,
    DualPathLayer,
    KasminaConfig,
    KasminaLayer,
    LocalController,
    SeedStage,
)
from kasmina.legacy import MorphogeneticLayer
from oona import streams
from oona.contracts import Advance, Germinate, LifecycleCommand, stage_from_wire, stage_to_wire
from oona.contracts import LayerHealthReport as WireHealthReport
from torch import nn

S = SeedStage
LEGACY = KasminaConfig(execution_path="legacy", ramp_steps=3)


def fit(model: nn.Module, x: torch.Tensor, steps: int, after_step) -> None:  # noqa: ANN001
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.01)
    for _ in range(steps):
        loss = (model(x) - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step(loss.detach())


def legacy_model() -> nn.Sequential:
    torch.manual_seed(0)
    return kasmina.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6)),
                        seeds_per_layer=4, config=LEGACY)


def test_single_seed_mode_is_a_legacy_layer_and_wrap_builds_it():
    layer = KasminaLayer(nn.Linear(4, 8), 1, LEGACY)
    assert layer.num_seeds == 1 and layer.chunks == [(0, 8)]
    assert layer.execution_path == "legacy" and layer.promotion_stage is S.GRAFTING
    layers = kasmina.seed_layers(legacy_model())
    assert [type(x) for x in layers] == [DualPathLayer, DualPathLayer]
    assert [(x.execution_path, x.num_seeds, x.chunks) for x in layers] == [
        ("legacy", 1, [(0, 8)]), ("legacy", 1, [(0, 6)])]


def test_the_legacy_api_drives_the_same_layer_as_the_new_one():
    torch.manual_seed(0)
    host, x = nn.Linear(4, 8), torch.randn(10, 4)
    new = KasminaLayer(nn.Linear(4, 8), 1, LEGACY)
    new.load_state_dict(KasminaLayer(host, 1, LEGACY).state_dict())
    with pytest.warns(DeprecationWarning):
        old = MorphogeneticLayer(host, "residual_mlp", LEGACY)
    old.load_state_dict(new.state_dict())
    with pytest.warns(DeprecationWarning, match="germinate_seed"):
        old.germinate_seed()
    with pytest.warns(DeprecationWarning, match="graft"):
        old.graft()
    new.germinate(0, "residual_mlp")
    new.transition(0, S.GRAFTING)
    grafted = []
    for layer in (old, new):
        fit(layer, x, 3, layer.step)
        layer.end_epoch(None)
        grafted.append(layer(x).detach())
    with pytest.warns(DeprecationWarning, match="fossilize"):
        old.fossilize()
    new.transition(0, S.FOSSILIZED)
    assert old.stage_of(0) is new.stage_of(0) is S.FOSSILIZED
    assert torch.equal(grafted[0], grafted[1]) and torch.equal(old(x), new(x))
    assert not torch.equal(old(x), old.host(x))


def test_in_process_telemetry_needs_no_bus():
    model, x = legacy_model(), torch.randn(12, 4)
    layer = kasmina.seed_layers(model)[0]
    fit(model, x, 2, layer.step)
    report = layer.end_epoch(0.5)
    assert isinstance(report, kasmina.LayerHealthReport) and report.epoch == 1
    assert report.num_seeds == 1 and report.chunk_variance[0] > 0
    assert layer.health_report() is report
    with pytest.warns(DeprecationWarning):
        old = MorphogeneticLayer(nn.Linear(4, 8))
    old(x)
    with pytest.warns(DeprecationWarning, match="get_telemetry"):
        assert old.get_telemetry()["chunk_variance"] > 0  # mid-epoch, in-process


def test_library_commands_apply_at_once():
    model, x = legacy_model(), torch.randn(12, 4)
    layer = kasmina.seed_layers(model)[0]
    before = model(x)
    layer.germinate(0)
    assert layer.stage_of(0) is S.GERMINATED  # no boundary needed
    layer.transition(0, S.GRAFTING)
    assert layer.stage_of(0) is S.GRAFTING
    layer.step()
    assert not torch.equal(model(x), before)  # the next forward blends the seed in


def command(job: str, layer: str, **action) -> LifecycleCommand:
    return LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id=layer,
                            seed_index=0, **action)


async def _publish(url: str, stream: str, messages: list[LifecycleCommand]) -> None:
    async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
        publisher = bus.publisher("test")
        for m in messages:
            await publisher.publish(stream, m, event_id=m.command_id)


async def _reports(url: str, job: str) -> list[WireHealthReport]:
    got = []

    async def on(message, _delivery):  # noqa: ANN001
        got.append(message)

    async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
        consumer = bus.consumer(streams.TELEMETRY_SEED_HEALTH, group=f"test-{uuid.uuid4()}",
                                name="t", handlers={WireHealthReport: on})
        await consumer.ensure_group()
        while await consumer.poll(block_ms=200):
            pass
    return [r for r in got if r.job_id == job]


def _wait(runtime, n: int, timeout: float = 10.0) -> None:  # noqa: ANN001
    import time
    deadline = time.monotonic() + timeout
    while len(runtime._waiting) + len(runtime._commands.received) < n:
        assert time.monotonic() < deadline, "the commands did not arrive"
        time.sleep(0.02)


def test_a_legacy_model_on_the_bus_reports_and_takes_commands(oona_redis_url):
    """Async commands (the bus, applied at the boundary) beside synchronous ones (the library,
    at once), and the health reports both in-process and on the bus."""
    job = f"compat-{uuid.uuid4().hex[:8]}"
    model, x = legacy_model(), torch.randn(12, 4)
    first, second = kasmina.seed_layers(model)
    runtime = kasmina.attach(model, job, oona.BusSettings.from_dsn(oona_redis_url), mode="max")
    try:
        assert [first.layer_id, second.layer_id] == ["0", "2"]
        asyncio.run(_publish(oona_redis_url, streams.commands(job), [
            command(job, "2", germinate=Germinate(blueprint_name="residual_mlp")),
            command(job, "2", advance=Advance(target_stage=stage_to_wire(S.GRAFTING)))]))
        _wait(runtime, 2)
        first.germinate(0)  # synchronous, beside the bus
        first.transition(0, S.GRAFTING)
        assert first.stage_of(0) is S.GRAFTING and second.stage_of(0) is S.DORMANT
        fit(model, x, 3, runtime.step)
        assert second.stage_of(0) is S.DORMANT  # a bus command waits for the boundary
        acks = runtime.end_epoch(0.5)
        assert [a.success for a in acks] == [True, True], acks
        assert second.stage_of(0) is S.GRAFTING and second.legacy.stage_of(0) is S.GRAFTING
        assert set(second.chunked.stage_counts) == {"DORMANT"}
        local = [first.health_report(), second.health_report()]
    finally:
        runtime.close()
    wire = asyncio.run(_reports(oona_redis_url, job))
    assert [(r.layer_id, r.epoch, r.num_seeds) for r in wire] == [("0", 1, 1), ("2", 1, 1)]
    for report, in_process in zip(wire, local, strict=True):
        assert [stage_from_wire(s) for s in report.stage] == list(in_process.stage)
        assert list(report.alpha) == pytest.approx(list(in_process.alpha))
    assert stage_from_wire(wire[1].stage[0]) == S.GRAFTING


def test_a_hybrid_model_grows_both_paths_under_one_controller():
    torch.manual_seed(0)
    dual = DualPathLayer(nn.Linear(4, 8), 4, LEGACY, "dual")
    chunked = KasminaLayer(nn.Linear(8, 6), 3, KasminaConfig(ramp_steps=3), "chunked")
    model = nn.Sequential(dual, nn.ReLU(), chunked)
    controller = LocalController(model, ControllerConfig(plateau_epochs=1,
                                                         germinations_per_plateau=8))
    assert controller.layers == [dual, chunked]
    x = torch.randn(16, 4)
    banks = [p.detach().clone() for p in chunked.blueprint_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            fit(model, x, 3, controller.step)
            controller.end_epoch(0.5)  # a plateau: germinate, promote
    assert dual.execution_path == "legacy" and dual.stage_of(0) is S.FOSSILIZED
    assert dual.params_added() > 0
    grown = chunked.seeds_in(S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING,
                             S.FINE_TUNING, S.FOSSILIZED)
    assert grown, chunked.stage_counts
    assert any(not torch.equal(a, b) for a, b in zip(banks, chunked.blueprint_parameters(),
                                                     strict=True))  # its blueprints trained
    layers = {e.layer_id for e in controller.events if e.to_stage is S.GERMINATED}
    assert layers == {"dual", "chunked"}
