"""The heuristic policy at the edges of its thresholds (DESIGN §5, README "The heuristic
policy"): plateau_epochs and min_delta just below / at / just above, cooldown_epochs 0..3,
max_active_seeds at capacity - 1 / capacity, every readiness value, and the config's limits.

Metrics are binary-exact (multiples of powers of two) so "exactly min_delta" means exactly."""

from __future__ import annotations

import math

import pytest
from oona.contracts import SeedStage as Stage
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.view import JobView

S = Stage
DORMANT, GERMINATED, TRAINING = (S.SEED_STAGE_DORMANT, S.SEED_STAGE_GERMINATED,
                                 S.SEED_STAGE_TRAINING)
NONE = S.SEED_STAGE_UNSPECIFIED


def run(advisor, report, epoch_ended, metrics, *, reports=None, higher_is_better=True,
        **config):
    """Decisions per epoch for these metrics, the same reports every epoch."""
    controller = Controller(HeuristicPolicy(PolicyConfig(**config), advisor), DeliveryConfig())
    view = JobView("job-1")
    decided = []
    for epoch, metric in enumerate(metrics):
        for layer_report in reports or [report()]:
            layer_report.epoch = epoch
            view.record_report(layer_report)
        view.record_epoch_end(epoch_ended(epoch, metric, higher_is_better=higher_is_better),
                              now=1000.0 + epoch)
        decided.append(controller.decide(view, now=1000.0 + epoch))
    return decided


def germinated_at(decided) -> list[int]:
    return [e for e, d in enumerate(decided) if any(c.WhichOneof("action") == "germinate"
                                                    for c in d)]


@pytest.mark.parametrize("plateau", [1, 2, 4])
def test_germination_comes_exactly_plateau_epochs_after_the_last_gain(advisor, report,
                                                                      epoch_ended, plateau):
    decided = run(advisor, report, epoch_ended, [0.5] * (plateau + 1), plateau_epochs=plateau,
                  min_delta=0.25, cooldown_epochs=0)
    assert germinated_at(decided) == [plateau]


@pytest.mark.parametrize(("higher", "metrics", "expected"), [
    # min_delta 0.25, plateau_epochs 2. A gain of exactly min_delta is no progress.
    (True, [1.0, 1.25, 1.25], [2]),
    (True, [1.0, 1.25 + 2**-10, 1.25 + 2**-10], []),  # just above: progress at epoch 1
    (True, [1.0, 1.25 - 2**-10, 1.25 - 2**-10], [2]),
    (False, [1.0, 0.75, 0.75], [2]),
    (False, [1.0, 0.75 - 2**-10, 0.75 - 2**-10], []),
    (False, [1.0, 1.25 + 2**-10, 1.5], [2]),  # a loss going up is no progress
])
def test_min_delta_is_a_strict_threshold_in_the_metrics_direction(advisor, report, epoch_ended,
                                                                  higher, metrics, expected):
    decided = run(advisor, report, epoch_ended, metrics, higher_is_better=higher,
                  plateau_epochs=2, min_delta=0.25, cooldown_epochs=0)
    assert germinated_at(decided) == expected


def test_a_missing_metric_never_counts_towards_a_plateau(advisor, report, epoch_ended):
    decided = run(advisor, report, epoch_ended, [0.5, None, None, None], plateau_epochs=2,
                  min_delta=0.25, cooldown_epochs=0)
    assert germinated_at(decided) == []


@pytest.mark.parametrize(("cooldown", "expected"), [
    (0, list(range(1, 12))),
    (1, [1, 3, 5, 7, 9, 11]),
    (2, [1, 4, 7, 10]),
    (3, [1, 5, 9]),
])
def test_cooldown_epochs_are_decided_without_germination(advisor, report, epoch_ended,
                                                         cooldown, expected):
    """PolicyConfig: `cooldown_epochs` epochs decided with no germination after one (0: none).
    A flat metric keeps the plateau; 16 seeds and capacity 16 keep room for every germination."""
    layer = report(num_seeds=16)
    decided = run(advisor, report, epoch_ended, [0.5] * 12, reports=[layer], plateau_epochs=1,
                  min_delta=0.25, max_active_seeds=16, cooldown_epochs=cooldown)
    assert germinated_at(decided) == expected


@pytest.mark.parametrize(("stages", "germinates"), [
    ([TRAINING, DORMANT, DORMANT], True),  # 1 active < 2
    ([TRAINING, S.SEED_STAGE_FINE_TUNING, DORMANT], False),  # 2 active = capacity
    ([GERMINATED, S.SEED_STAGE_EVALUATING, DORMANT], False),
    # Ended and embargoed seeds do not count.
    ([S.SEED_STAGE_FOSSILIZED, S.SEED_STAGE_CULLED, S.SEED_STAGE_CANCELLED,
      S.SEED_STAGE_ROLLED_BACK, TRAINING, DORMANT], True),
])
def test_capacity_counts_germinated_to_fine_tuning(advisor, report, epoch_ended, stages,
                                                   germinates):
    layer = report(stages=stages)
    decided = run(advisor, report, epoch_ended, [0.5, 0.5], reports=[layer], plateau_epochs=1,
                  max_active_seeds=2, cooldown_epochs=0)
    assert germinated_at(decided) == ([1] if germinates else [])
    if germinates:
        (command,) = [c for c in decided[1] if c.WhichOneof("action") == "germinate"]
        assert stages[command.seed_index] == DORMANT


def test_a_germination_in_flight_counts_against_capacity(advisor, report, epoch_ended):
    # max_active_seeds 1: the first germination (never acked) fills the layer.
    decided = run(advisor, report, epoch_ended, [0.5] * 6, plateau_epochs=1, max_active_seeds=1,
                  cooldown_epochs=0)
    assert germinated_at(decided) == [1]


EXPECTED_COMMAND = {
    S.SEED_STAGE_TRAINING: ("advance", S.SEED_STAGE_TRAINING),
    S.SEED_STAGE_GRAFTING: ("advance", S.SEED_STAGE_GRAFTING),
    S.SEED_STAGE_STABILIZATION: ("advance", S.SEED_STAGE_STABILIZATION),
    S.SEED_STAGE_EVALUATING: ("advance", S.SEED_STAGE_EVALUATING),
    S.SEED_STAGE_FINE_TUNING: ("advance", S.SEED_STAGE_FINE_TUNING),
    S.SEED_STAGE_FOSSILIZED: ("advance", S.SEED_STAGE_FOSSILIZED),
    S.SEED_STAGE_CULLED: ("cull", None),
    S.SEED_STAGE_ROLLED_BACK: ("rollback", None),
    S.SEED_STAGE_CANCELLED: ("cancel", None),
}


@pytest.mark.parametrize("ready", list(S.values()))
def test_every_readiness_value_maps_to_its_command_or_none(advisor, report, epoch_ended, ready):
    # A seed in TRAINING (not GERMINATED, which is promoted whatever it reports).
    layer = report(stages=[TRAINING, DORMANT], ready_for=[ready, NONE])
    (decided,) = run(advisor, report, epoch_ended, [0.5], reports=[layer])
    expected = EXPECTED_COMMAND.get(ready)
    if expected is None:  # UNSPECIFIED, DORMANT (the runtime's own move), GERMINATED
        assert decided == []
        return
    (command,) = decided
    kind, target = expected
    assert (command.WhichOneof("action"), command.seed_index) == (kind, 0)
    if target is not None:
        assert command.advance.target_stage == target and not command.advance.force


@pytest.mark.parametrize(("ready", "action", "target"), [
    (NONE, "advance", TRAINING),  # nothing published: the 11-stage promotion
    (S.SEED_STAGE_GRAFTING, "advance", S.SEED_STAGE_GRAFTING),  # the legacy path's promotion
    (S.SEED_STAGE_CULLED, "cull", None)])
def test_a_germinated_seed_follows_what_it_is_ready_for_else_starts_training(
        advisor, report, epoch_ended, ready, action, target):
    layer = report(stages=[GERMINATED, DORMANT], ready_for=[ready, NONE])
    (decided,) = run(advisor, report, epoch_ended, [0.5], reports=[layer])
    (command,) = decided
    assert command.WhichOneof("action") == action
    if target is not None:
        assert command.advance.target_stage == target


def test_unmeasured_health_is_neutral_and_the_worst_measured_seed_is_chosen(advisor, report,
                                                                           epoch_ended):
    layer = report(variance=[math.nan, 1.0, 0.5, 1.0], dead=[math.nan, 0, 0, 0],
                   correlation=[math.nan, 0.1, 0.1, 0.1])
    decided = run(advisor, report, epoch_ended, [0.5, 0.5], reports=[layer], plateau_epochs=1)
    (command,) = decided[1]
    assert command.seed_index == 2


@pytest.mark.parametrize(("kwargs", "ok"), [
    ({"plateau_epochs": 0}, False), ({"plateau_epochs": 1}, True),
    ({"cooldown_epochs": -1}, False), ({"cooldown_epochs": 0}, True),
    ({"max_active_seeds": 0}, False), ({"max_active_seeds": 1}, True),
    ({"min_delta": -1e-12}, False), ({"min_delta": 0.0}, True),
    ({"fallback_chunk_size": 0}, False), ({"fallback_chunk_size": 1}, True),
])
def test_policy_config_limits(kwargs, ok):
    if ok:
        PolicyConfig(**kwargs)
    else:
        with pytest.raises(ValueError):
            PolicyConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"plateau_epochs": 0},
     "need plateau_epochs >= 1, cooldown_epochs >= 0, max_active_seeds >= 1"),
    ({"plateau_epochs": 256},
     "need plateau_epochs < 256, the validation metrics a job's view keeps"),
    ({"min_delta": -1.0}, "need min_delta >= 0 and fallback_chunk_size >= 1"),
])
def test_policy_config_errors_name_the_limit(kwargs, message):
    """256 is METRIC_HISTORY_EPOCHS: a plateau that long could never be seen in the view."""
    with pytest.raises(ValueError) as error:
        PolicyConfig(**kwargs)
    assert str(error.value) == message


def test_the_longest_plateau_is_one_below_the_metric_history():
    assert PolicyConfig(plateau_epochs=255).plateau_epochs == 255


def test_the_worst_seed_of_every_layer_below_capacity_competes(advisor, report, epoch_ended):
    # The worst seed is in the first layer decided ("a"); "b" is below capacity too.
    sick = report(layer="a", variance=[1.0, 0.25, 1.0, 1.0])
    healthy = report(layer="b")
    decided = run(advisor, report, epoch_ended, [0.5, 0.5], reports=[sick, healthy],
                  plateau_epochs=1)
    (command,) = decided[1]
    assert (command.layer_id, command.seed_index) == ("a", 1)


def test_the_advisor_is_asked_for_the_seeds_own_chunk_width(advisor, report, epoch_ended):
    # 10 features over 4 seeds: chunks 3, 3, 2, 2 (the fallback width, 16, only without it).
    layer = report(variance=[1.0, 1.0, 0.25, 1.0])
    layer.features = 10
    decided = run(advisor, report, epoch_ended, [0.5, 0.5], reports=[layer], plateau_epochs=1)
    (command,) = decided[1]
    assert command.seed_index == 2
    assert advisor.requests == [("job-1", "layers.0", 2)]


@pytest.mark.parametrize(("stage", "ready", "action", "rationale"), [
    (GERMINATED, NONE, "advance", "promote: germinated seeds start training"),
    (TRAINING, S.SEED_STAGE_GRAFTING, "advance", "gate passed: ready for GRAFTING"),
    (TRAINING, S.SEED_STAGE_CULLED, "cull", "gate passed: ready for CULLED"),
    (TRAINING, S.SEED_STAGE_ROLLED_BACK, "rollback", "gate passed: ready for ROLLED_BACK"),
])
def test_moves_name_their_seed_and_why(advisor, report, epoch_ended, stage, ready, action,
                                       rationale):
    layer = report(layer="layers.3", stages=[DORMANT, stage], ready_for=[NONE, ready])
    (decided,) = run(advisor, report, epoch_ended, [0.5], reports=[layer])
    (command,) = decided
    assert (command.WhichOneof("action"), command.layer_id, command.seed_index) == (
        action, "layers.3", 1)
    assert command.rationale == rationale
