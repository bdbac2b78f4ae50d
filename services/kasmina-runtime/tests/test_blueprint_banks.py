"""A layer grows a spec it was not built with (a Germinate carrying a spec Karn proposed) in a
bank of its kind with room for it: exact in its sizes, zeros past them, kept across a checkpoint
and an export."""

from __future__ import annotations

import kasmina
import pytest
import torch
from kasmina import KasminaConfig, SeedStage
from kasmina import blueprints as bp
from kasmina.fleet.wire import CommandTarget
from oona import contracts as wire
from oona.contracts import AckReason, Germinate, LifecycleCommand

W = wire.BlueprintKind


def _wire_spec(blueprint_id: int, hidden: int, **extra) -> wire.BlueprintSpec:
    return wire.BlueprintSpec(name=f"karn_t{blueprint_id}", kind=W.BLUEPRINT_KIND_RESIDUAL_MLP,
                              blueprint_id=blueprint_id, hidden=hidden, **extra)


def _germinate(target: CommandTarget, seed: int, spec: wire.BlueprintSpec):
    return target.apply(LifecycleCommand(
        command_id=f"g{seed}-{spec.blueprint_id}", job_id="job", layer_id="fc", seed_index=seed,
        germinate=Germinate(blueprint_spec=spec)), 0, 0)


BUILT_IN = ("residual_mlp", "low_rank", "linear")  # not specs other tests registered


def _layer(**cfg) -> kasmina.KasminaLayer:
    return kasmina.KasminaLayer(torch.nn.Linear(6, 16), 4,
                                KasminaConfig(blueprints=BUILT_IN, **cfg), layer_id="fc")


def test_a_spec_never_seen_grows_in_a_bank_with_room_and_its_padding_stays_zero():
    layer = _layer(bank_hidden=32, seed_lr=1e-2)
    spec = _wire_spec(1_000_101, hidden=24)
    with pytest.raises(kasmina.UnknownBlueprintError):
        bp.get_blueprint(1_000_101)  # this process has never seen it
    ack = _germinate(CommandTarget("job", [layer]), 2, spec)
    assert ack.success, ack.message
    assert int(layer.state[2, 1]) == 1_000_101
    bank, local = layer._bank_slot(int(layer.table.slot[2]))
    assert bank is layer.banks["1"] and bank.spec.hidden == 32
    p = {n: t[local].detach() for n, t in bank.params.items()}
    assert not p["w1"][:, 24:].any() and not p["b1"][24:].any() and not p["w2"][24:].any()
    assert p["w1"][:4, :24].all()
    layer.transition(2, SeedStage.TRAINING)
    x = torch.randn(32, 6)
    for _ in range(5):
        layer(x).sum().backward()
        layer.step()
    p = {n: t[local].detach() for n, t in bank.params.items()}
    assert not p["w1"][:, 24:].any() and not p["b1"][24:].any() and not p["w2"][24:].any()
    h = layer.host(x)[:, 8:12]  # seed 2's chunk
    y = bank(torch.stack([h.detach()] * bank.capacity))[local]
    ref = h + torch.nn.functional.gelu(h @ p["w1"][:4, :24] + p["b1"][:24]) @ p["w2"][:24, :4] \
        + p["b2"][:4]
    torch.testing.assert_close(y[:, :4], ref)
    assert layer.params_added() == bp.get_blueprint(1_000_101).param_count(4)


def test_a_spec_wider_than_every_bank_or_of_another_activation_is_refused_by_name():
    layer = _layer()  # the catalog's own sizes: residual_mlp banks of hidden 16
    target = CommandTarget("job", [layer])
    narrow = _germinate(target, 0, _wire_spec(1_000_102, hidden=8))
    assert narrow.success, narrow.message  # fits the 16-wide bank
    wide = _germinate(target, 1, _wire_spec(1_000_103, hidden=17))
    assert wide.reason == AckReason.ACK_REASON_UNKNOWN_BLUEPRINT and "bank_hidden" in wide.message
    relu = _germinate(target, 1, _wire_spec(
        1_000_104, hidden=8, activation=wire.BlueprintActivation.BLUEPRINT_ACTIVATION_RELU))
    assert relu.reason == AckReason.ACK_REASON_UNKNOWN_BLUEPRINT
    assert layer.stage_of(1) is SeedStage.DORMANT


def test_a_checkpoint_brings_back_the_specs_it_grew():
    layer = _layer(bank_hidden=32)
    assert _germinate(CommandTarget("job", [layer]), 1, _wire_spec(1_000_105, hidden=20)).success
    state = layer.state_dict()
    spec = bp.get_blueprint(1_000_105)
    del bp._BY_ID[spec.id], bp._CATALOG[spec.name]  # as a fresh process has it
    fresh = _layer(bank_hidden=32)
    fresh.load_state_dict(state)
    assert bp.get_blueprint(1_000_105) == spec and fresh.params_added() == 0
    fresh.transition(1, SeedStage.TRAINING)
    assert fresh.params_added() == spec.param_count(4)


def test_export_of_a_seed_grown_in_a_wider_bank_computes_what_the_layer_does():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model[0] = layer = kasmina.KasminaLayer(model[0], 4, KasminaConfig(
        blueprints=BUILT_IN, bank_hidden=32), layer_id="fc")
    assert _germinate(CommandTarget("job", [layer]), 3, _wire_spec(1_000_106, hidden=12)).success
    for stage in (SeedStage.TRAINING, SeedStage.GRAFTING, SeedStage.STABILIZATION,
                  SeedStage.EVALUATING, SeedStage.FINE_TUNING, SeedStage.FOSSILIZED):
        layer.transition(3, stage, force=True)
    layer.alpha[3] = 1.0
    model.eval()
    x = torch.randn(5, 6)
    exported = kasmina.export(model)
    torch.testing.assert_close(exported(x), model(x))
