"""The single-seed layer's old API (kasmina.legacy): every old call works, makes the new call,
and warns with a DeprecationWarning naming the replacement and the release it goes away in."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from kasmina import KasminaConfig, KasminaLayer, LocalController, SeedStage, seed_layers
from kasmina.legacy import REMOVED_IN, MorphogeneticLayer
from kasmina.lifecycle import GateNotPassedError, InvalidTransitionError
from torch import nn

S = SeedStage


def deprecation(old: str, new: str) -> pytest.WarningsChecker:
    return pytest.warns(DeprecationWarning, match=rf"^{old} is deprecated since kasmina \S+ and "
                        rf"will be removed in {REMOVED_IN}; use {new}")


def old_layer(host: nn.Module | None = None, blueprint: str = "residual_mlp",
              config: KasminaConfig | None = None) -> MorphogeneticLayer:
    with deprecation("MorphogeneticLayer",
                     r"KasminaLayer\(host, 1, KasminaConfig\(execution_path='legacy'\)\)"):
        return MorphogeneticLayer(host or nn.Linear(4, 6), blueprint,
                                  config or KasminaConfig(ramp_steps=2))


def train(layer: nn.Module, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        loss = layer(x).square().mean()
        loss.backward()
        layer.step(loss.detach())


def test_the_old_layer_is_a_legacy_kasmina_layer():
    layer = old_layer(config=KasminaConfig(ramp_steps=2))  # execution_path set for the caller
    assert isinstance(layer, KasminaLayer) and layer.execution_path == "legacy"
    assert layer.num_seeds == 1 and layer.chunks == [(0, 6)] and layer.config.ramp_steps == 2
    model = nn.Sequential(layer)
    assert seed_layers(model) == [layer]  # wrap, controllers and the bridge take it as one


def test_germinate_graft_fossilize_each_make_the_new_call_and_warn():
    torch.manual_seed(0)
    layer, x = old_layer(blueprint="low_rank"), torch.randn(8, 4)
    with deprecation("MorphogeneticLayer.germinate_seed", r"KasminaLayer.germinate\(0, "):
        layer.germinate_seed()
    assert layer.stage_of(0) is S.GERMINATED
    assert layer.table.records[0].blueprint_id == 2 or layer.bank_names()  # the default one
    with deprecation("MorphogeneticLayer.fossilize", "KasminaLayer.transition"), \
            pytest.raises(InvalidTransitionError):
        layer.fossilize()  # the new call's refusal comes through
    with deprecation("MorphogeneticLayer.graft",
                     r"KasminaLayer.transition\(0, SeedStage.GRAFTING\)"):
        layer.graft()
    assert layer.stage_of(0) is S.GRAFTING
    with deprecation("MorphogeneticLayer.fossilize", "KasminaLayer.transition"), \
            pytest.raises(GateNotPassedError):
        layer.fossilize()  # alpha has not reached 1: the gate holds, as in the new API
    train(layer, x, 2)
    layer.end_epoch(None)
    with deprecation("MorphogeneticLayer.fossilize",
                     r"KasminaLayer.transition\(0, SeedStage.FOSSILIZED\)"):
        layer.fossilize()
    assert layer.stage_of(0) is S.FOSSILIZED and layer.params_added() > 0
    assert not torch.equal(layer(x), layer.host(x))


def test_germinate_seed_takes_the_layers_blueprint_or_its_argument():
    from kasmina import get_blueprint
    for default, argument, want in (("low_rank", None, "low_rank"),
                                    ("residual_mlp", "low_rank", "low_rank")):
        layer = old_layer(blueprint=default)
        with deprecation("MorphogeneticLayer.germinate_seed", "KasminaLayer.germinate"):
            layer.germinate_seed(argument)
        assert layer.table.records[0].blueprint_id == get_blueprint(want).id


def test_cull_makes_the_new_call_and_warns():
    layer, x = old_layer(), torch.randn(3, 4)
    with deprecation("MorphogeneticLayer.germinate_seed", "KasminaLayer.germinate"):
        layer.germinate_seed()
    with deprecation("MorphogeneticLayer.graft", "KasminaLayer.transition"):
        layer.graft()
    train(layer, x, 1)
    with deprecation("MorphogeneticLayer.cull", r"KasminaLayer.transition\(0, SeedStage.CULLED\)"):
        layer.cull()
    assert layer.stage_of(0) is S.CULLED
    assert torch.equal(layer(x), layer.host(x))


def test_get_telemetry_reads_this_epoch_so_far_without_ending_it():
    torch.manual_seed(0)
    layer = old_layer()
    x = torch.randn(16, 4)
    with deprecation("MorphogeneticLayer.get_telemetry", "the LayerHealthReport"):
        empty = layer.get_telemetry()
    assert empty["stage"] == "DORMANT" and math.isnan(empty["chunk_variance"])
    with torch.no_grad():
        layer(x)
    with deprecation("MorphogeneticLayer.get_telemetry", "the LayerHealthReport"):
        so_far = layer.get_telemetry()
    assert layer.epoch == 0  # the epoch did not end
    report = layer.end_epoch(None)  # ... and the boundary reports what get_telemetry read
    assert so_far["chunk_variance"] == pytest.approx(float(report.chunk_variance[0]), rel=1e-6)
    assert so_far["dead_ratio"] == pytest.approx(float(report.dead_ratio[0]), rel=1e-6)
    assert so_far["chunk_variance"] > 0
    with deprecation("MorphogeneticLayer.germinate_seed", "KasminaLayer.germinate"):
        layer.germinate_seed()
    with deprecation("MorphogeneticLayer.graft", "KasminaLayer.transition"):
        layer.graft()
    train(layer, x, 1)
    with deprecation("MorphogeneticLayer.get_telemetry", "the LayerHealthReport"):
        grafting = layer.get_telemetry()
    assert grafting["stage"] == "GRAFTING" and grafting["alpha"] == 0.5
    assert grafting["step"] == 1 and grafting["epoch"] == 1


def test_each_call_site_warns_once_by_default():
    layer = old_layer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            layer.get_telemetry()  # one call site, three calls
        layer.get_telemetry()  # another
    assert [w.category for w in caught] == [DeprecationWarning] * 2
    assert {w.filename for w in caught} == {__file__}  # attributed to the caller's line


def test_the_local_controller_grows_an_old_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), old_layer(nn.Linear(6, 3)))
    controller = LocalController(model)
    x = torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(5):
        for _ in range(2):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            controller.step(loss.detach())
        controller.end_epoch(0.5)
    assert model[2].stage_of(0) is S.FOSSILIZED
