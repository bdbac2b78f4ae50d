"""Decisions around the gates: the sign of the counterfactual contribution (DESIGN §3.2
EVALUATING), emergency stop (commands.proto: "roll back every active seed and pause
adaptation") and command expiry (a command far past its boundary is refused as EXPIRED)."""

from __future__ import annotations

import asyncio
import time
import uuid

import kasmina
import oona
import pytest
import torch
from kasmina import ControllerConfig, KasminaConfig, LocalController, SeedStage
from kasmina.controller import measure_contributions
from kasmina.fleet import CommandTarget
from kasmina.fleet.runtime import MAX_LATENESS_EPOCHS
from oona import streams
from oona.contracts import (
    AckReason,
    Advance,
    Cancel,
    CommandAck,
    Cull,
    EmergencyStop,
    Germinate,
    LifecycleCommand,
    PauseAdaptation,
    ResumeAdaptation,
    Rollback,
    stage_from_wire,
    stage_to_wire,
)
from torch import nn

S = SeedStage
EVAL_PATH = (S.TRAINING, S.GRAFTING)


# ---------------------------------------------------------------- counterfactual contribution
def two_evaluating_seeds(mode: str):
    """A layer of two 4-wide chunks, both seeds EVALUATING at alpha 1 (grafted by fixed_ramp's
    30 steps), under a LocalController of `mode`."""
    torch.manual_seed(0)
    model = kasmina.wrap(nn.Sequential(nn.Linear(3, 8)), seeds_per_layer=2,
                         config=KasminaConfig(blueprints=("linear",)))
    ctl = LocalController(model, ControllerConfig(mode=mode, plateau_epochs=1000))
    (layer,) = ctl.layers
    for seed in (0, 1):
        layer.germinate(seed, "linear", "fixed_ramp")
        for stage in EVAL_PATH:
            layer.transition(seed, stage, force=True)
    for _ in range(KasminaConfig().ramp_steps):
        ctl.step()
    for seed in (0, 1):
        for stage in (S.STABILIZATION, S.EVALUATING):
            layer.transition(seed, stage, force=True)
    assert layer.alpha.tolist() == [1.0, 1.0]
    return model, ctl, layer


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_seed_that_helps_contributes_positively_one_that_hurts_negatively(mode):
    """The validation target is the model's output with seed 0's blueprint and the host's own
    output on seed 1's chunk: seed 0 provably helps (without it the error grows by e0), seed 1
    provably hurts (without it the error is 0). As a loss (mode min) the metric is that error; as
    a score (mode max) its negative. Either way: contribution 0 = +e0, contribution 1 = -e1."""
    model, ctl, layer = two_evaluating_seeds(mode)
    x = torch.randn(32, 3)
    with torch.no_grad():
        host, full = layer.host(x), model(x)
        target = full.clone()
        target[:, 4:] = host[:, 4:]
        e0 = float(((full[:, :4] - host[:, :4]) ** 2).sum() / full.numel())
        e1 = float(((full[:, 4:] - host[:, 4:]) ** 2).sum() / full.numel())
    assert e0 > 1e-4 and e1 > 1e-4  # the blueprints really change their chunks

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            error = float(((model(x) - target) ** 2).mean())
        return error if mode == "min" else -error

    model.train()
    val = evaluate()
    assert val == pytest.approx(e1 if mode == "min" else -e1, rel=1e-5)
    model.train()
    measure_contributions(model, ctl.layers, val, evaluate)
    assert model.training  # the modes evaluate() changed are put back
    records = layer.table.records
    assert records[0].contributions == [pytest.approx(e0, rel=1e-4)]
    assert records[1].contributions == [pytest.approx(-e1, rel=1e-4)]
    with torch.no_grad():  # the counterfactual passes leave both seeds blended again
        torch.testing.assert_close(model(x), full, rtol=0, atol=0)
    # Through the controller: evaluation_epochs (2) boundaries judge both seeds.
    ctl.end_epoch(val, evaluate)
    report = ctl.reports[0]
    assert report.contribution[0] == pytest.approx(e0, rel=1e-4)
    assert report.contribution[1] == pytest.approx(-e1, rel=1e-4)
    assert (layer.stage_of(0), layer.stage_of(1)) == (S.EVALUATING, S.EVALUATING)
    ctl.end_epoch(val, evaluate)
    assert (layer.stage_of(0), layer.stage_of(1)) == (S.FINE_TUNING, S.CULLED)
    (culled,) = ctl.outcomes
    assert culled.seed_id == 1 and culled.contribution == pytest.approx(-e1, rel=1e-4)


def test_a_seed_that_changes_nothing_contributes_zero_and_is_culled():
    """Contribution <= evaluation_min_gain (0.0) culls: a metric that ignores the seed."""
    model, ctl, layer = two_evaluating_seeds("max")
    for _ in range(KasminaConfig().evaluation_epochs):
        ctl.end_epoch(0.5, lambda: 0.5)
    assert (layer.stage_of(0), layer.stage_of(1)) == (S.CULLED, S.CULLED)
    assert [o.contribution for o in ctl.outcomes] == [0.0, 0.0]


def test_no_evaluate_means_no_contribution_and_no_judgement():
    model, ctl, layer = two_evaluating_seeds("max")
    for _ in range(4):
        ctl.end_epoch(0.5)
    assert (layer.stage_of(0), layer.stage_of(1)) == (S.EVALUATING, S.EVALUATING)
    assert layer.readiness() == {}


# ---------------------------------------------------------------- emergency stop
def command(seed=None, layer="0", job="j", **action) -> LifecycleCommand:
    c = LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id=layer, **action)
    if seed is not None:
        c.seed_index = seed
    return c


STOP_FROM = [S.GERMINATED, S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING,
             S.FINE_TUNING]


def job_with_every_stage():
    """Seeds 0..5 in GERMINATED..FINE_TUNING, 6 FOSSILIZED, 7 CULLED, 8 DORMANT."""
    torch.manual_seed(0)
    model = kasmina.wrap(nn.Sequential(nn.Linear(3, 36)), seeds_per_layer=9,
                         config=KasminaConfig(blueprints=("linear",), max_active_seeds=9))
    (layer,) = kasmina.seed_layers(model)
    path = [S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]
    for seed, stage in enumerate([*STOP_FROM, S.FOSSILIZED, S.CULLED]):
        layer.germinate(seed, "linear")
        if stage is S.CULLED:
            targets = [S.TRAINING, S.CULLED]
        else:
            targets = path[:path.index(stage) + 1] if stage in path else []
        for s in targets:
            layer.transition(seed, s, force=True)
    layer.alpha.fill_(1.0)  # every running seed blended in: the stop must undo it
    layer.drain_outcomes()
    return model, layer, CommandTarget("j", [layer])


def test_emergency_stop_returns_every_active_seed_to_the_host():
    model, layer, target = job_with_every_stage()
    x = torch.randn(5, 3)
    with torch.no_grad():  # before: GRAFTING..FINE_TUNING (seeds 2-5) blend their blueprints
        out, host = model(x), layer.host(x)
    assert all(not torch.equal(out[:, 4 * s:4 * s + 4], host[:, 4 * s:4 * s + 4])
               for s in range(2, 6))
    ack = target.apply(command(layer="", emergency_stop=EmergencyStop()), 3, 30)
    assert ack.success and ack.reason == AckReason.ACK_REASON_OK
    stages = [layer.stage_of(s) for s in range(9)]
    # GERMINATED has no ROLLED_BACK move in the table: its germination is cancelled.
    assert stages == [S.CANCELLED] + [S.ROLLED_BACK] * 5 + [S.FOSSILIZED, S.CULLED, S.DORMANT]
    assert layer.seeds_in(*STOP_FROM) == []
    # Every ended seed gives exactly one outcome (one field report).
    assert sorted((o.seed_id, o.outcome) for o in layer.drain_outcomes()) == [
        (0, S.CANCELLED)] + [(s, S.ROLLED_BACK) for s in range(1, 6)]
    with torch.no_grad():  # every chunk but the fossilized one is the host's, bit for bit
        out, host = model(x), layer.host(x)
    fossil = slice(24, 28)
    keep = torch.ones(36, dtype=torch.bool)
    keep[fossil] = False
    assert torch.equal(out[:, keep], host[:, keep])
    assert not torch.equal(out[:, fossil], host[:, fossil])


def test_after_an_emergency_stop_growth_is_refused_until_resumed_and_safety_moves_are_not():
    model, layer, target = job_with_every_stage()
    assert target.apply(command(emergency_stop=EmergencyStop()), 3, 30).success
    state = layer.state.clone()
    for refused in (command(seed=8, germinate=Germinate(blueprint_name="linear")),
                    command(seed=7, advance=Advance(target_stage=stage_to_wire(S.DORMANT)))):
        ack = target.apply(refused, 3, 30)
        assert not ack.success and ack.reason == AckReason.ACK_REASON_EMERGENCY_STOPPED, ack
        assert torch.equal(layer.state, state)
    # A second stop is harmless; a pause does not lift the stop.
    assert target.apply(command(emergency_stop=EmergencyStop()), 3, 30).success
    assert target.apply(command(pause_adaptation=PauseAdaptation()), 3, 30).success
    ack = target.apply(command(seed=8, germinate=Germinate(blueprint_name="linear")), 3, 30)
    assert ack.reason == AckReason.ACK_REASON_EMERGENCY_STOPPED
    assert torch.equal(layer.state, state)
    # Resume lifts the stop (and the pause): growth is allowed again.
    assert target.apply(command(resume_adaptation=ResumeAdaptation()), 3, 30).success
    ack = target.apply(command(seed=8, germinate=Germinate(blueprint_name="linear")), 3, 30)
    assert ack.success and stage_from_wire(ack.stage_after) == S.GERMINATED


def test_pause_refuses_growth_but_not_cancel_cull_or_rollback():
    model, layer, target = job_with_every_stage()
    assert target.apply(command(pause_adaptation=PauseAdaptation()), 3, 30).success
    state = layer.state.clone()
    for refused in (command(seed=8, germinate=Germinate(blueprint_name="linear")),
                    command(seed=1, advance=Advance(target_stage=stage_to_wire(S.GRAFTING),
                                                    force=True))):
        ack = target.apply(refused, 3, 30)
        assert ack.reason == AckReason.ACK_REASON_ADAPTATION_PAUSED, ack
        assert torch.equal(layer.state, state)
    for seed, action, after in ((0, {"cancel": Cancel()}, S.CANCELLED),
                                (1, {"cull": Cull()}, S.CULLED),
                                (2, {"rollback": Rollback()}, S.ROLLED_BACK)):
        ack = target.apply(command(seed=seed, **action), 3, 30)
        assert ack.success and stage_from_wire(ack.stage_after) == after, ack


def test_while_stopped_safety_commands_are_judged_by_the_table_alone():
    model, layer, target = job_with_every_stage()
    assert target.apply(command(emergency_stop=EmergencyStop()), 3, 30).success
    for seed, action in ((1, {"cull": Cull()}), (1, {"rollback": Rollback()}),
                         (0, {"cancel": Cancel()})):
        ack = target.apply(command(seed=seed, **action), 3, 30)
        # ROLLED_BACK and CANCELLED seeds have no such move: the table refuses it.
        assert ack.reason == AckReason.ACK_REASON_REFUSED_TRANSITION, ack


# ---------------------------------------------------------------- command expiry (real bus)
async def _publish(url, job, messages, fresh_event_ids=False):
    async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
        publisher = bus.publisher("test")
        for m in messages:
            await publisher.publish(streams.commands(job), m,
                                    event_id=None if fresh_event_ids else m.command_id)




def _wait_for_arrival(runtime, n, timeout=10.0):
    """Until n commands have reached the runtime (one lag is recorded per arrival)."""
    deadline, arrived = time.monotonic() + timeout, 0
    while arrived < n and time.monotonic() < deadline:
        arrived += len(runtime.take_command_lags())
        time.sleep(0.02)
    assert arrived == n


def test_a_command_more_than_max_lateness_epochs_late_is_acked_expired(oona_redis_url,
                                                                      drain_stream):
    job = f"job-{uuid.uuid4().hex[:8]}"
    torch.manual_seed(0)
    model = kasmina.wrap(nn.Sequential(nn.Linear(3, 12)), seeds_per_layer=3,
                         config=KasminaConfig(blueprints=("linear",)))
    (layer,) = kasmina.seed_layers(model)
    runtime = kasmina.attach(model, job, oona.BusSettings.from_dsn(oona_redis_url), mode="max")
    boundary = MAX_LATENESS_EPOCHS + 2
    try:
        for _ in range(boundary - 1):
            runtime.end_epoch(0.5)
        assert runtime.epoch == boundary - 1  # the next end_epoch is boundary `boundary`

        def germinate(seed, at):
            c = command(seed=seed, job=job, germinate=Germinate(blueprint_name="linear"))
            c.apply_at_epoch = at
            return c

        expired = germinate(0, boundary - MAX_LATENESS_EPOCHS - 1)
        on_the_limit = germinate(1, boundary - MAX_LATENESS_EPOCHS)
        due_now = germinate(2, boundary)
        asyncio.run(_publish(oona_redis_url, job, [expired, on_the_limit, due_now]))
        _wait_for_arrival(runtime, 3)
        acks = {a.command_id: a for a in runtime.end_epoch(0.5)}
        assert set(acks) == {expired.command_id, on_the_limit.command_id, due_now.command_id}
        late = acks[expired.command_id]
        assert not late.success and late.reason == AckReason.ACK_REASON_EXPIRED
        assert str(boundary - MAX_LATENESS_EPOCHS - 1) in late.message
        assert acks[on_the_limit.command_id].success and acks[due_now.command_id].success
        assert [layer.stage_of(s) for s in range(3)] == [S.DORMANT, S.GERMINATED, S.GERMINATED]
        # The expired command is not applied later, even when resent under a new event id.
        asyncio.run(_publish(oona_redis_url, job, [expired], fresh_event_ids=True))
        _wait_for_arrival(runtime, 1)
        assert not any(a.success for a in runtime.end_epoch(0.5))
        assert layer.stage_of(0) is S.DORMANT
    finally:
        runtime.close()
    on_bus = [a for a in asyncio.run(drain_stream(oona_redis_url, streams.CONTROL_ACKS,
                                                  CommandAck)) if a.job_id == job]
    expired_acks = [a for a in on_bus if a.command_id == expired.command_id]
    assert expired_acks and expired_acks[0].reason == AckReason.ACK_REASON_EXPIRED
    assert not any(a.success for a in expired_acks)
