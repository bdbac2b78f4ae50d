"""Every field of a lifecycle command is checked before it touches a seed: a malformed or
hostile command is refused with a typed ack and the layer's state does not change."""

from __future__ import annotations

import uuid

import kasmina
import pytest
import torch
from kasmina import SeedStage
from kasmina.fleet import CommandTarget
from kasmina.lifecycle import InvalidTransitionError
from oona.contracts import (
    AckReason,
    Advance,
    BlueprintSpec,
    Cull,
    EmergencyStop,
    Germinate,
    LifecycleCommand,
    stage_to_wire,
)
from torch import nn

R = AckReason


def command(layer="0", seed=1, **fields):
    return LifecycleCommand(command_id=str(uuid.uuid4()), job_id="j", layer_id=layer,
                            seed_index=seed, **fields)


@pytest.fixture(name="target")
def _target():
    torch.manual_seed(0)
    model = kasmina.wrap(nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 3)), seeds_per_layer=4,
                         exclude=("1",))
    return CommandTarget("j", kasmina.seed_layers(model)), kasmina.seed_layers(model)[0]


HOSTILE = [
    ("stage 99", command(advance=Advance(target_stage=99)), R.ACK_REASON_INVALID, "99"),
    ("stage unset", command(advance=Advance()), R.ACK_REASON_INVALID, "target_stage"),
    ("due at epoch 4e9", command(cull=Cull(), apply_at_epoch=4_000_000_000),
     R.ACK_REASON_INVALID, "4000000000"),
    ("due after the last epoch", command(cull=Cull(), apply_at_epoch=31), R.ACK_REASON_INVALID,
     "(30)"),
    ("apply_at_step", command(cull=Cull(), apply_at_step=5), R.ACK_REASON_INVALID,
     "apply_at_step"),
    ("no command id", LifecycleCommand(job_id="j", layer_id="0", seed_index=1, cull=Cull()),
     R.ACK_REASON_INVALID, "command_id"),
    ("huge command id", LifecycleCommand(command_id="x" * 200_000, job_id="j", layer_id="0",
                                         seed_index=1, cull=Cull()),
     R.ACK_REASON_INVALID, "command_id"),
    ("huge rationale", command(cull=Cull(), rationale="r" * 10_000), R.ACK_REASON_INVALID,
     "rationale"),
    ("seed 2**32-1", command(seed=2**32 - 1, cull=Cull()), R.ACK_REASON_UNKNOWN_SEED,
     "4294967295"),
    ("no seed", LifecycleCommand(command_id="c", job_id="j", layer_id="0", cull=Cull()),
     R.ACK_REASON_INVALID, "seed_index"),
    ("unknown layer", command(layer="../" * 1000, cull=Cull()), R.ACK_REASON_UNKNOWN_LAYER,
     "no seed layer"),
    ("other job", LifecycleCommand(command_id="c", job_id="k", layer_id="0", seed_index=1,
                                   cull=Cull()), R.ACK_REASON_UNKNOWN_JOB, "not job"),
    ("unknown blueprint id", command(germinate=Germinate(blueprint_id=-7)),
     R.ACK_REASON_UNKNOWN_BLUEPRINT, "-7"),
    ("empty blueprint name", command(germinate=Germinate(blueprint_name="")),
     R.ACK_REASON_UNKNOWN_BLUEPRINT, "''"),
    ("unknown spec", command(germinate=Germinate(blueprint_spec=BlueprintSpec(
        blueprint_id=12345))), R.ACK_REASON_UNKNOWN_BLUEPRINT, "12345"),
    ("unknown strategy", command(germinate=Germinate(strategy_id=999)),
     R.ACK_REASON_UNKNOWN_STRATEGY, "999"),
    ("not in the table", command(advance=Advance(target_stage=stage_to_wire(
        SeedStage.FOSSILIZED), force=True)), R.ACK_REASON_REFUSED_TRANSITION, "DORMANT"),
]


@pytest.mark.parametrize(("name", "cmd", "reason", "says"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_bad_command_is_refused_with_a_reason_and_changes_nothing(target, name, cmd, reason,
                                                                    says):
    target, layer = target
    state = layer.state.clone()
    early = target.check(cmd, boundary=1, last_epoch=30)
    ack = target.apply(cmd, 0, 7, last_epoch=30)
    assert not ack.success and ack.reason == reason, (name, ack)
    assert says in ack.message, ack.message
    assert ack.applied_step == 7 and ack.job_id == "j"
    # Field errors are found on arrival; table errors only when applied, against the state.
    assert (early is None) == (reason == R.ACK_REASON_REFUSED_TRANSITION)
    assert torch.equal(layer.state, state)


def test_a_well_formed_command_passes_the_check_and_applies(target):
    target, layer = target
    cmd = command(germinate=Germinate(blueprint_name="residual_mlp", strategy_name="fixed_ramp"),
                  apply_at_epoch=30)
    assert target.check(cmd, boundary=1, last_epoch=30) is None
    assert target.apply(cmd, 0, 0, last_epoch=30).success
    assert layer.stage_of(1) is SeedStage.GERMINATED
    # Without a known last epoch a command may be at most MAX_LEAD_EPOCHS ahead.
    far = command(cull=Cull(), apply_at_epoch=1 + 1_000 + 1)
    assert target.check(far, boundary=1).reason == R.ACK_REASON_INVALID


def test_an_error_the_layer_raises_is_a_refusal_never_a_crash(target, monkeypatch):
    target, layer = target

    def refuse(*_args, **_kwargs):
        raise InvalidTransitionError(1, SeedStage.DORMANT, SeedStage.TRAINING)

    monkeypatch.setattr(layer, "transition", refuse)
    ack = target.apply(command(cull=Cull()), 0, 0)
    assert ack.reason == R.ACK_REASON_REFUSED_TRANSITION and "DORMANT" in ack.message

    def bug(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(layer, "transition", bug)
    ack = target.apply(command(cull=Cull()), 0, 0)
    assert ack.reason == R.ACK_REASON_INTERNAL_ERROR and "boom" in ack.message
    # An emergency stop that one seed refuses still stops the job and answers OK.
    layer.germinate(2, "residual_mlp")
    layer.transition = refuse  # GERMINATED seeds are cancelled, not transitioned
    monkeypatch.setattr(layer, "cancel_germination", refuse)
    ack = target.apply(LifecycleCommand(command_id="s", job_id="j",
                                        emergency_stop=EmergencyStop()), 0, 0)
    assert ack.success and target.stopped
