"""A seed grown from a spec follows the spec's own `ramp_steps` and `seed_lr` (issue #19); a
spec that leaves them at 0 follows the layer's KasminaConfig, bit for bit as before."""

from __future__ import annotations

import copy

import pytest
import torch
from kasmina import (
    BlueprintSpec,
    DualPathLayer,
    GraftingStrategy,
    KasminaConfig,
    KasminaLayer,
    SeedStage,
    register_strategy,
)
from kasmina import blueprints as bp
from kasmina.fleet.wire import CommandTarget
from oona import contracts as wire
from oona.contracts import Germinate, LifecycleCommand

BUILT_IN = ("residual_mlp", "low_rank", "linear")  # not specs other tests registered


@pytest.fixture(name="spec")
def _spec():
    """A residual_mlp spec (it grows in the catalog's residual_mlp bank) with its own ramp and
    rate, unregistered afterwards so later layers built from the whole catalog never see it."""
    made = []

    def make(blueprint_id: int, **fields) -> BlueprintSpec:
        made.append(BlueprintSpec(f"sched_t{blueprint_id}", "residual_mlp", blueprint_id,
                                  hidden=8, **fields))
        return made[-1]

    yield make
    for s in made:
        bp._BY_ID.pop(s.id, None), bp._CATALOG.pop(s.name, None)


def _layer(**cfg) -> KasminaLayer:
    return KasminaLayer(torch.nn.Linear(6, 16), 4, KasminaConfig(blueprints=BUILT_IN, **cfg),
                        layer_id="fc")


def _graft(layer, seed, blueprint, strategy="fixed_ramp"):
    layer.germinate(seed, blueprint, strategy)
    layer.transition(seed, SeedStage.TRAINING, force=True)
    layer.transition(seed, SeedStage.GRAFTING, force=True)


@register_strategy
class _Halfway(GraftingStrategy):
    """A plug-in on the shared ramp: it moves at half speed over the seed's own length."""

    name, id = "halfway_test", 78

    def update(self, alpha, ctx):
        assert ctx.config.ramp_steps == 30  # the config is still there for plug-ins
        return self.ramp(alpha, ctx, 0.5), ctx.state


@pytest.mark.parametrize("strategy,updates", [
    ("fixed_ramp", 4), ("performance_linked", 4), ("drift_controlled", 4), ("halfway_test", 8)])
def test_a_seed_ramps_over_its_specs_ramp_steps_and_another_over_the_configs(spec, strategy,
                                                                              updates):
    layer = _layer()  # ramp_steps 30
    _graft(layer, 0, spec(1_000_201, ramp_steps=4), strategy)
    _graft(layer, 1, "residual_mlp", strategy)
    for i in range(updates):
        assert float(layer.alpha[0]) < 1.0, i
        layer.step()
    assert float(layer.alpha[0]) == 1.0
    assert float(layer.alpha[1]) == pytest.approx(updates / 30 * (0.5 if updates == 8 else 1))
    layer.end_epoch()
    assert layer.readiness() == {0: SeedStage.STABILIZATION}  # the gate: alpha reached 1


def test_a_seed_steps_at_its_specs_seed_lr_and_a_default_one_exactly_as_before(spec):
    layer = _layer(seed_lr=1e-3)
    layer.germinate(0, spec(1_000_202, seed_lr=3e-2))
    layer.germinate(1, "residual_mlp")
    for s in (0, 1):
        layer.transition(s, SeedStage.TRAINING)
    x = torch.randn(16, 6)
    for _ in range(3):
        layer(x).sum().backward()
        bank = layer.banks["1"]
        before, grad = copy.deepcopy(bank), bank.flat.grad.clone()
        layer.step()
        for s, cfg in ((0, KasminaConfig(seed_lr=3e-2)), (1, layer.config)):
            ref, slot = copy.deepcopy(before), int(layer.table.slot[s]) - layer.table.lanes[1][0]
            ref.flat.grad = grad.clone()
            ref.seed_step(torch.arange(bank.capacity) == slot, cfg)  # a bank step at that lr
            assert torch.equal(bank.flat[slot], ref.flat[slot]), s
            assert torch.equal(bank.exp_avg[slot], ref.exp_avg[slot]), s


def test_a_resumed_layer_keeps_its_seeds_ramps_and_rates(spec):
    grown = spec(1_000_203, ramp_steps=5, seed_lr=2e-2)
    layer = _layer()
    _graft(layer, 2, grown)
    for _ in range(2):
        layer.step()
    state = layer.state_dict()
    del bp._BY_ID[grown.id], bp._CATALOG[grown.name]  # as a fresh process has it
    fresh = _layer()
    fresh.load_state_dict(state)
    lane = int(fresh.table.slot[2])
    assert float(fresh.lane_ramp_steps[lane]) == 5
    assert float(fresh.lane_lr[lane]) == pytest.approx(2e-2)
    assert fresh.lane_lr.count_nonzero() == 1  # the other lanes: the config's
    for _ in range(2):
        fresh.step()
    assert float(fresh.alpha[2]) == pytest.approx(0.8)
    fresh.step()
    assert float(fresh.alpha[2]) == 1.0


def test_a_germinate_carrying_ramp_steps_and_a_rate_reaches_the_layer():
    layer = _layer()
    message = wire.BlueprintSpec(name="sched_wire_t", kind=wire.BlueprintKind.
                                 BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=1_000_204, hidden=8,
                                 ramp_steps=4, seed_learning_rate=5e-3)
    try:
        ack = CommandTarget("job", [layer]).apply(LifecycleCommand(
            command_id="g", job_id="job", layer_id="fc", seed_index=3,
            germinate=Germinate(blueprint_spec=message)), 0, 0)
        assert ack.success, ack.message
        lane = int(layer.table.slot[3])
        assert float(layer.lane_ramp_steps[lane]) == 4
        assert float(layer.lane_lr[lane]) == pytest.approx(5e-3)
        for stage in (SeedStage.TRAINING, SeedStage.GRAFTING):
            layer.transition(3, stage, force=True)
        for _ in range(4):
            layer.step()
        assert float(layer.alpha[3]) == 1.0
    finally:
        bp._BY_ID.pop(1_000_204, None), bp._CATALOG.pop("sched_wire_t", None)


@pytest.mark.parametrize("path", ["legacy", "chunked"])
def test_both_paths_of_a_dual_path_layer_ramp_over_the_specs_length(spec, path):
    layer = DualPathLayer(torch.nn.Linear(4, 8), 4, KasminaConfig(execution_path=path,
                                                                  blueprints=BUILT_IN), "d")
    layer.germinate(0, spec(1_000_205, ramp_steps=2))
    for stage in (layer.promotion_stage, SeedStage.GRAFTING):
        if layer.stage_of(0) is not stage:
            layer.transition(0, stage, force=True)
    layer.step()
    assert float(layer.active.alpha[0]) == 0.5
    layer.step()
    assert float(layer.active.alpha[0]) == 1.0
