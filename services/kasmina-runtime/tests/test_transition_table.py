# ruff: noqa: E501  (DESIGN's table is copied verbatim, long rows included)
"""The seed lifecycle against a literal copy of DESIGN §3.2's transition table (not the code's
own table): the code allows exactly the table's moves, refuses every other pair with a typed
`InvalidTransitionError` naming both stages and changes nothing; the one move outside the table is
the forced operator reset ROLLED_BACK -> DORMANT; only cancel, cull, rollback (and the
controller's promotion) go without a gate."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from kasmina import KasminaConfig, KasminaLayer
from kasmina.blueprints import get_blueprint
from kasmina.events import LifecycleEvent, SeedOutcome
from kasmina.gates import gate_reason
from kasmina.lifecycle import (
    LEGACY,
    TRANSITIONS,
    BlueprintDoesNotFitError,
    CapacityError,
    EmbargoError,
    GateNotPassedError,
    InvalidTransitionError,
    LifecycleError,
    SeedStage,
    UnknownBlueprintError,
    UnknownSeedError,
    check_transition,
)
from kasmina.seed_table import BLUEPRINT_ID, EPOCHS_IN_STAGE, STAGE, STRATEGY, SeedTable
from kasmina.strategies import get_strategy
from torch import nn

S = SeedStage

# DESIGN.md §3.2, copied as written.
DESIGN_TABLE = """\
| from | to | guard (defaults in `KasminaConfig`, all configurable) |
|---|---|---|
| DORMANT | GERMINATED | germination request; seed not under embargo; blueprint fits the chunk; active seeds (GERMINATED..FINE_TUNING) in the layer < `max_active_seeds` (4) |
| GERMINATED | TRAINING | promoted by the controller |
| GERMINATED, TRAINING | CANCELLED | cancel request |
| TRAINING | GRAFTING | reconstruction gate passed: `mse(bp(x), x) / var(x) <= reconstruction_threshold` (0.05), after at least `min_training_steps` (50) |
| TRAINING | CULLED | gate not passed within `max_training_epochs` (5) |
| GRAFTING | STABILIZATION | alpha reached 1.0 |
| STABILIZATION | EVALUATING | `stabilization_epochs` (3) passed with the blueprint frozen and finite outputs |
| EVALUATING | FINE_TUNING | measured contribution > `evaluation_min_gain` (0.0) over `evaluation_epochs` (2) |
| EVALUATING | CULLED | contribution <= `evaluation_min_gain` |
| FINE_TUNING | FOSSILIZED | total gain since germination >= `fossilize_min_gain` (0.001) after `fine_tuning_epochs` (3) |
| FINE_TUNING | CULLED | that gate failed |
| TRAINING .. FINE_TUNING | ROLLED_BACK | rollback command, or a safety trigger (non-finite output or gradient, drift or gradient-norm limits) |
| CULLED | DORMANT | after `embargo_epochs` (10) |
| CANCELLED | DORMANT | at the next epoch boundary |
| FOSSILIZED, ROLLED_BACK | — | terminal (ROLLED_BACK locks the seed until an operator `reset` with `force`) |
"""
DESIGN_STAGES = ("DORMANT 0, GERMINATED 1, TRAINING 2, GRAFTING 3, STABILIZATION 4, EVALUATING 5, "
                 "FINE_TUNING 6, FOSSILIZED 7, CULLED 8, CANCELLED 9, ROLLED_BACK 10")


def _stages(cell: str) -> list[S]:
    cell = cell.strip()
    if cell == "—":
        return []
    if ".." in cell:
        first, last = (S[name.strip()] for name in cell.split(".."))
        return [S(v) for v in range(first, last + 1)]
    return [S[name.strip()] for name in cell.split(",")]


def design_pairs() -> dict[tuple[S, S], str]:
    """(from, to) -> guard, from the table's rows."""
    pairs = {}
    for row in DESIGN_TABLE.splitlines()[2:]:
        source, target, guard = (c.strip() for c in row.strip().strip("|").split("|"))
        for a, b in itertools.product(_stages(source), _stages(target)):
            assert (a, b) not in pairs, f"{a.name} -> {b.name} twice in the table"
            pairs[(a, b)] = guard
    return pairs


DESIGN = design_pairs()
# DESIGN: "A command whose gate has not passed is refused, except cancel, cull and rollback";
# GERMINATED -> TRAINING's guard is the controller's promotion itself.
DESIGN_UNGATED = {p for p in DESIGN if p[1] in (S.CANCELLED, S.CULLED, S.ROLLED_BACK)
                  } | {(S.GERMINATED, S.TRAINING)}
# Automatic moves the layer makes at a boundary; no command makes them early.
DESIGN_AUTOMATIC = {(S.CULLED, S.DORMANT), (S.CANCELLED, S.DORMANT)}
RESET = (S.ROLLED_BACK, S.DORMANT)  # outside the table; needs force
ALL_PAIRS = list(itertools.product(S, S))


def test_the_stage_numbers_are_designs():
    names = [(s.name, s.value) for s in S]
    assert names == [(n, int(v)) for n, v in
                     (item.split() for item in DESIGN_STAGES.split(", "))]


def test_the_parsed_table_has_every_row():
    assert len(DESIGN) == 19  # 15 rows; two name 2 sources, one 5
    assert RESET not in DESIGN and all(b is not S.GERMINATED or a is S.DORMANT for a, b in DESIGN)
    assert not [p for p in DESIGN if p[0] in (S.FOSSILIZED, S.ROLLED_BACK)]


def test_the_codes_table_is_designs():
    code = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert code == set(DESIGN)


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS)
def test_check_transition_allows_exactly_the_table(current, target):
    for force in (False, True):
        if (current, target) in DESIGN or (force and (current, target) == RESET):
            check_transition(3, current, target, force=force)
            continue
        with pytest.raises(InvalidTransitionError) as err:
            check_transition(3, current, target, force=force)
        assert isinstance(err.value, LifecycleError) and err.value.code == "refused_transition"
        assert (err.value.seed_id, err.value.current, err.value.target) == (3, current, target)
        assert f"{current.name} -> {target.name}" in str(err.value)


def test_check_transition_does_not_force_by_default():
    with pytest.raises(InvalidTransitionError):
        check_transition(0, S.ROLLED_BACK, S.DORMANT)
    check_transition(0, S.ROLLED_BACK, S.DORMANT, force=True)


# ---------------------------------------------------------------- the torch-free SeedTable
LINEAR = get_blueprint("linear").id


def new_table() -> SeedTable:
    return SeedTable([(0, 4), (4, 8), (8, 12)], {LINEAR: (0, 3)}, max_active_seeds=3,
                     embargo_epochs=10, layer_id="t")


def reach(move, germinate, stage: S) -> None:
    """Reach `stage` for seed 0 through the table's moves only (gates forced)."""
    path = {S.DORMANT: [], S.GERMINATED: [], S.CANCELLED: [S.CANCELLED],
            S.CULLED: [S.TRAINING, S.CULLED], S.ROLLED_BACK: [S.TRAINING, S.ROLLED_BACK]}
    happy = [S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]
    steps = path.get(stage, happy[:happy.index(stage) + 1] if stage in happy else None)
    if stage is not S.DORMANT:
        germinate()
    for s in steps:
        move(s)


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS)
def test_seed_table_moves_follow_designs_table(current, target):
    table = new_table()
    reach(lambda s: table.transition(0, s, force=True),
          lambda: table.germinate(0, "linear", "fixed_ramp"), current)
    assert table.stage_of(0) is current
    table.state[0, EPOCHS_IN_STAGE] = 2  # some epochs in the stage
    table.drain_events()
    before, slot, changes = table.state.copy(), table.slot.copy(), len(table.changes)
    allowed = (current, target) in DESIGN or (current, target) == RESET
    if target is S.GERMINATED and current is S.DORMANT:
        table.germinate(0, "linear", "fixed_ramp")
    elif allowed:
        table.transition(0, target, force=True)
    else:
        with pytest.raises(InvalidTransitionError) as err:
            table.transition(0, target, force=True)
        assert current.name in str(err.value) and target.name in str(err.value)
        assert np.array_equal(table.state, before) and np.array_equal(table.slot, slot)
        assert table.drain_events() == [] and len(table.changes) == changes
        return
    assert table.stage_of(0) is target
    assert int(table.state[0, EPOCHS_IN_STAGE]) == 0  # every transition resets it
    (event,) = table.drain_events()
    assert (event.from_stage, event.to_stage) == (current, target)


@pytest.mark.parametrize(("current", "target"), sorted(set(DESIGN) | {RESET}))
def test_without_force_only_cancel_cull_rollback_and_promotion_skip_the_gate(current, target):
    """No gate has passed (no boundary ran): the ungated moves go, every other is refused with
    a typed error and changes nothing; the reset needs force even then."""
    table = new_table()
    reach(lambda s: table.transition(0, s, force=True),
          lambda: table.germinate(0, "linear", "fixed_ramp"), current)
    before = table.state.copy()
    if target is S.GERMINATED:  # DORMANT -> GERMINATED: the germination request is its guard
        table.germinate(0, "linear", "fixed_ramp")
        assert table.stage_of(0) is S.GERMINATED
        return
    if (current, target) in DESIGN_UNGATED:
        table.transition(0, target)
        assert table.stage_of(0) is target
        return
    with pytest.raises(LifecycleError) as err:
        table.transition(0, target)
    if (current, target) == RESET:
        assert isinstance(err.value, InvalidTransitionError)
    elif (current, target) not in DESIGN_AUTOMATIC:
        assert isinstance(err.value, GateNotPassedError)
        assert f"{current.name} -> {target.name}" in str(err.value)
    assert np.array_equal(table.state, before)


@pytest.mark.parametrize("seed", [-1, 3, 99, 1.0, "0"])
def test_a_seed_that_does_not_exist_is_refused_with_a_typed_error(seed):
    table = new_table()
    before = table.state.copy()
    for call in (lambda: table.transition(seed, S.TRAINING, force=True),
                 lambda: table.germinate(seed, "linear", "fixed_ramp")):
        with pytest.raises(UnknownSeedError) as err:
            call()
        assert err.value.code == "unknown_seed" and err.value.seed_id == seed
        assert str(err.value) == f"seed {seed} does not exist (layer has 3 seeds)"
    assert np.array_equal(table.state, before)


def test_germination_guard_capacity_counts_germinated_to_fine_tuning():
    """DORMANT -> GERMINATED: active seeds (GERMINATED..FINE_TUNING) < max_active_seeds."""
    lanes = {LINEAR: (0, 8)}
    table = SeedTable([(4 * i, 4 * i + 4) for i in range(8)], lanes, max_active_seeds=2,
                      embargo_epochs=10)
    ended = [S.FOSSILIZED, S.CULLED, S.CANCELLED, S.ROLLED_BACK]
    for seed, stage in enumerate(ended):  # none of these count
        reach(lambda s, seed=seed: table.transition(seed, s, force=True),
              lambda seed=seed: table.germinate(seed, "linear", "fixed_ramp"), stage)
    table.germinate(4, "linear", "fixed_ramp")  # 0 active -> 1
    table.transition(4, S.TRAINING)
    for s in (S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING):
        table.transition(4, s, force=True)
    table.germinate(5, "linear", "fixed_ramp")  # 1 active (FINE_TUNING) < 2
    before = table.state.copy()
    with pytest.raises(CapacityError, match="max_active_seeds=2"):
        table.germinate(6, "linear", "fixed_ramp")  # 2 active = capacity
    assert np.array_equal(table.state, before)
    table.transition(5, S.CANCELLED)  # back to 1 active
    table.germinate(6, "linear", "fixed_ramp")
    assert table.stage_of(6) is S.GERMINATED


def test_germination_guard_blueprint_must_fit_the_chunk():
    """low_rank needs chunks of at least 5 features (its catalog entry)."""
    low_rank = get_blueprint("low_rank")
    table = SeedTable([(0, 4), (4, 9)], {low_rank.id: (0, 2)}, max_active_seeds=4,
                      embargo_epochs=10)
    with pytest.raises(BlueprintDoesNotFitError) as error:
        table.germinate(0, "low_rank", "fixed_ramp")
    assert str(error.value) == "blueprint 'low_rank' does not fit seed 0's chunk of 4 features"
    assert table.stage_of(0) is S.DORMANT
    table.germinate(1, "low_rank", "fixed_ramp")
    assert table.stage_of(1) is S.GERMINATED


def test_automatic_moves_happen_after_their_wait():
    table = new_table()
    table.germinate(0, "linear", "fixed_ramp")
    table.transition(0, S.CANCELLED)
    table.germinate(1, "linear", "fixed_ramp")
    table.transition(1, S.TRAINING)
    table.transition(1, S.CULLED)
    no_flags = np.zeros(3, dtype=bool)
    table.end_epoch(no_flags, None, 1.0)  # CANCELLED -> DORMANT at the next boundary
    assert (table.stage_of(0), table.stage_of(1)) == (S.DORMANT, S.CULLED)
    for _ in range(8):
        table.end_epoch(no_flags, None, 1.0)
    assert table.stage_of(1) is S.CULLED  # 9 epochs: still under embargo
    table.end_epoch(no_flags, None, 1.0)
    assert table.stage_of(1) is S.DORMANT  # embargo_epochs (10) served
    returns = [(e.seed_id, e.from_stage, e.reason) for e in table.drain_events()
               if e.to_stage is S.DORMANT]
    assert returns == [(0, S.CANCELLED, "cancelled seed returns to dormant"),
                       (1, S.CULLED, "embargo served")]


def test_a_new_table_is_all_dormant_with_nothing_held():
    """Columns STAGE, BLUEPRINT_ID, EPOCHS_IN_STAGE, STRATEGY (the layer's state tensor); -1 is
    "none" for ids and lanes; a table without banks has no lanes."""
    table = new_table()
    assert table.state.tolist() == [[S.DORMANT, -1, 0, -1]] * 3
    assert table.slot.tolist() == [-1] * 3 and table.num_lanes == 3
    bankless = SeedTable([(0, 4)], {}, max_active_seeds=1, embargo_epochs=10)
    assert bankless.num_lanes == 0 and bankless.lane_owner().shape == (0,)


def test_a_cancel_is_recorded_with_its_reason():
    table = new_table()
    table.germinate(0, "linear", "fixed_ramp")
    assert table.cancel(0)
    (outcome,) = table.drain_outcomes()
    assert (outcome.reason, outcome.params_added) == ("cancel request", 0)  # not fossilized
    assert table.drain_events()[-1].reason == "cancel request"


def test_an_outcome_carries_the_seeds_whole_record():
    """linear on a 4-feature chunk: a 4x4 weight and a bias of 4, 20 parameters."""
    table, no_flags = new_table(), np.zeros(3, dtype=bool)
    table.end_epoch(no_flags, 0.25, 1.0)
    table.germinate(1, "linear", "fixed_ramp")  # at epoch 1, after a metric of 0.25
    table.end_epoch(no_flags, 0.75, 1.0)
    happy = [S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]
    for stage in happy:
        table.transition(1, stage, force=True)
    (outcome,) = table.drain_outcomes()
    assert outcome == SeedOutcome(
        layer_id="t", seed_id=1, outcome=S.FOSSILIZED, blueprint_id=LINEAR,
        strategy_id=get_strategy("fixed_ramp").id, germinated_epoch=1, ended_epoch=2,
        history=[(S.GERMINATED, 1)] + [(stage, 2) for stage in happy], metric_before=0.25,
        metric_after=0.75, contribution=None, params_added=20, reason="command", chunk_size=4,
        execution_path="chunked")


def test_a_germinated_seed_is_ready_for_its_lifecycles_promotion_unless_it_is_training():
    """The legacy path grafts at once: its germinated seeds publish GRAFTING as readiness (so
    Tamiyo promotes them); the 11-stage path's promotion, TRAINING, is not published."""
    chunks, lanes = [(0, 4), (4, 8), (8, 12)], {LINEAR: (0, 3)}
    legacy = SeedTable(chunks, lanes, max_active_seeds=3, embargo_epochs=10, lifecycle=LEGACY)
    full = new_table()
    for table in (legacy, full):
        table.germinate(1, "linear", "fixed_ramp")
    assert legacy.readiness_from({}) == {1: S.GRAFTING}
    assert full.readiness_from({}) == {}
    # What the local controller records for that promotion: no gate of its own to name.
    assert gate_reason(S.GERMINATED, S.GRAFTING) == "gate passed"


def test_a_non_finite_seed_is_rolled_back_at_the_boundary_for_safety():
    table = new_table()
    table.germinate(0, "linear", "fixed_ramp")
    table.transition(0, S.TRAINING)
    table.end_epoch(np.array([True, False, False]), None, 1.0)
    assert table.stage_of(0) is S.ROLLED_BACK
    (outcome,) = table.drain_outcomes()
    assert (outcome.outcome, outcome.reason) == (S.ROLLED_BACK,
                                                 "safety: non-finite output or gradient")


def test_germination_by_transition_is_refused_with_what_to_call_instead():
    table = new_table()
    with pytest.raises(LifecycleError) as error:
        table.transition(0, S.GERMINATED, force=True)
    assert type(error.value) is LifecycleError
    assert str(error.value) == "germination needs a blueprint: use germinate()"
    table.germinate(2, "linear", "fixed_ramp")
    table.transition(2, S.TRAINING)
    with pytest.raises(InvalidTransitionError) as refused:
        table.transition(2, S.GERMINATED, force=True)
    assert str(refused.value) == "seed 2: transition TRAINING -> GERMINATED is not allowed"
    with pytest.raises(InvalidTransitionError) as refused:
        table.transition(2, S.DORMANT, force=True)
    assert str(refused.value) == "seed 2: transition TRAINING -> DORMANT is not allowed"
    with pytest.raises(InvalidTransitionError) as refused:
        table.germinate(2, "linear", "fixed_ramp")
    assert str(refused.value) == "seed 2: transition TRAINING -> GERMINATED is not allowed"


def test_refusals_before_a_wait_is_served_or_a_gate_passed_name_the_seed():
    table = new_table()
    table.germinate(0, "linear", "fixed_ramp")
    table.transition(0, S.TRAINING)
    with pytest.raises(GateNotPassedError) as gate:
        table.transition(0, S.GRAFTING)
    assert str(gate.value) == ("seed 0: gate for TRAINING -> GRAFTING has not passed (use "
                               "force=True to skip it)")
    table.transition(0, S.CULLED)
    for _ in range(3):
        table.end_epoch(np.zeros(3, dtype=bool), None, 1.0)
    with pytest.raises(EmbargoError) as embargo:
        table.germinate(0, "linear", "fixed_ramp")
    assert str(embargo.value) == "seed 0 is under embargo for 7 more epoch(s)"
    table.germinate(1, "linear", "fixed_ramp")
    table.transition(1, S.CANCELLED)
    with pytest.raises(EmbargoError) as embargo:
        table.transition(0, S.DORMANT)
    assert str(embargo.value) == "seed 0 is under embargo"
    with pytest.raises(GateNotPassedError) as waiting:
        table.transition(1, S.DORMANT)
    assert str(waiting.value) == ("seed 1: gate for CANCELLED -> DORMANT has not passed (use "
                                  "force=True to skip it)")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_boundary_returns_each_seeds_gain_since_germination_in_the_metrics_sense(sign):
    table, no_flags = new_table(), np.zeros(3, dtype=bool)
    table.end_epoch(no_flags, 0.25, sign)
    table.germinate(1, "linear", "fixed_ramp")  # metric_before 0.25
    _, gain = table.end_epoch(no_flags, 0.75, sign)
    np.testing.assert_array_equal(gain, [np.nan, sign * 0.5, np.nan])
    _, gain = table.end_epoch(no_flags, None, sign)  # no metric: no gain, the last one kept
    np.testing.assert_array_equal(gain, [np.nan] * 3)
    assert table.last_metric == 0.75


def test_moves_queue_lane_changes_drop_readiness_and_a_release_frees_the_lane():
    table = new_table()
    table.end_epoch(np.zeros(3, dtype=bool), None, 1.0)
    table.step = 7
    table.germinate(0, "linear", "fixed_ramp")
    owner = table.lane_owner()
    assert owner.dtype == np.int64 and owner.tolist() == [0, -1, -1]  # seed ids, for indexing
    table.transition(0, S.TRAINING)
    table.readiness[0] = S.GRAFTING
    table.transition(0, S.CULLED)
    assert table.readiness == {}  # a verdict is for the stage it was given in
    assert table.records == {} and table.state[0, BLUEPRINT_ID] == table.state[0, STRATEGY] == -1
    events = table.drain_events()
    assert [e.reason for e in events] == ["germination request", "command", "command"]
    assert events[-1] == LifecycleEvent("t", 0, S.TRAINING, S.CULLED, 1, 7, "command")
    assert [(c.seed, c.lane, c.target) for c in table.changes] == [
        (0, 0, S.GERMINATED), (0, 0, S.TRAINING), (0, 0, S.CULLED)]
    assert table.slot[0] == -1 and table.lane_owner().tolist() == [-1, -1, -1]  # -1: none


def test_a_seed_takes_the_first_free_lane_of_its_own_blueprints_bank():
    mlp = get_blueprint("residual_mlp").id
    table = SeedTable([(0, 4), (4, 8), (8, 12)], {LINEAR: (0, 2), mlp: (2, 3)},
                      max_active_seeds=3, embargo_epochs=10, layer_id="t")
    table.germinate(0, "residual_mlp", "fixed_ramp")
    assert table.slot[0] == 2
    with pytest.raises(CapacityError) as full:
        table.germinate(1, "residual_mlp", "fixed_ramp")
    assert str(full.value) == ("layer 't': all 1 slots of 'residual_mlp' are held "
                               "(KasminaConfig.bank_slots)")
    with pytest.raises(UnknownBlueprintError) as unknown:
        new_table().germinate(0, "residual_mlp", "fixed_ramp")
    assert str(unknown.value) == ("layer 't' has no bank for blueprint 'residual_mlp' (banks are "
                                  "made at construction for KasminaConfig.blueprints: "
                                  "['linear'])")


def checkpointed_table() -> tuple[SeedTable, dict]:
    """Seed 0 in TRAINING and ready for GRAFTING after one boundary; its bookkeeping as a
    checkpoint stores it (through JSON: string keys, lists for tuples)."""
    table = new_table()
    table.germinate(0, "linear", "fixed_ramp")
    table.transition(0, S.TRAINING)
    table.end_epoch(np.zeros(3, dtype=bool), 0.5, 1.0)
    table.readiness[0] = S.GRAFTING
    return table, json.loads(json.dumps(table.to_dict()))


def test_the_bookkeeping_round_trips_through_a_checkpoint():
    table, extra = checkpointed_table()
    assert extra == {
        "epoch": 1, "step": 0, "last_metric": 0.5, "layer_id": "t", "lifecycle": "chunked",
        "readiness": {"0": int(S.GRAFTING)},
        "records": {"0": {"blueprint_id": LINEAR, "strategy_id": get_strategy("fixed_ramp").id,
                          "germinated_epoch": 0, "germinated_step": 0, "metric_before": 0.5,
                          "history": [[int(S.GERMINATED), 0], [int(S.TRAINING), 0]],
                          "contributions": []}}}
    restored = SeedTable(table.chunks, table.lanes, max_active_seeds=3, embargo_epochs=10)
    restored.changes.append(table.changes[0])  # uncommitted before the load: dropped by it
    restored.load_dict(extra, table.state.copy(), table.slot.copy())
    assert (restored.epoch, restored.step, restored.last_metric) == (1, 0, 0.5)
    assert restored.layer_id == "t"  # a layer without an id of its own takes the saved one
    assert restored.readiness == {0: S.GRAFTING}
    assert restored.records == table.records and restored.stage_of(0) is S.TRAINING
    assert restored.changes == []
    restored.transition(0, S.GRAFTING)  # the saved readiness opens the gate


def test_a_checkpoint_of_another_lifecycle_is_refused_and_one_without_a_name_is_ours():
    table, extra = checkpointed_table()
    legacy = {**extra, "lifecycle": "legacy"}
    with pytest.raises(ValueError) as error:
        new_table().load_dict(legacy, table.state.copy(), table.slot.copy())
    assert str(error.value) == (
        "layer 't': the checkpoint holds a legacy seed table, this layer runs the chunked path "
        "(python -m kasmina migrate converts a legacy checkpoint)")
    unnamed = {k: v for k, v in extra.items() if k != "lifecycle"}  # saved before the legacy path
    restored = new_table()
    restored.load_dict(unnamed, table.state.copy(), table.slot.copy())
    assert restored.readiness == {0: S.GRAFTING}


# ---------------------------------------------------------------- the layer (tensors follow)
@pytest.mark.parametrize(("current", "target"), ALL_PAIRS)
def test_layer_moves_follow_designs_table(current, target):
    layer = KasminaLayer(nn.Linear(6, 12), 3, KasminaConfig(blueprints=("linear",)))
    reach(lambda s: layer.transition(0, s, force=True), lambda: layer.germinate(0, "linear"),
          current)
    state = layer.state.clone()
    if (current, target) in DESIGN or (current, target) == RESET:
        if target is S.GERMINATED:
            layer.germinate(0, "linear")
        else:
            layer.transition(0, target, force=True)
        assert layer.stage_of(0) is target
        assert int(layer.state[0, STAGE]) == target and int(layer.state[0, EPOCHS_IN_STAGE]) == 0
    else:
        with pytest.raises(InvalidTransitionError):
            layer.transition(0, target, force=True)
        assert torch.equal(layer.state, state)
