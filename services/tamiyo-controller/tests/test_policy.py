"""The heuristic policy through the Controller, as the worker drives it: plateau, worst-health
choice, capacity, cooldown, embargo, readiness -> command kind, and one decision per epoch."""

from __future__ import annotations

import pytest
from oona.contracts import CommandAck, LifecycleCommand
from oona.contracts import SeedStage as Stage
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.heuristics import HealthWeights
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.view import JobView

S = Stage
DORMANT, GERMINATED, TRAINING = (S.SEED_STAGE_DORMANT, S.SEED_STAGE_GERMINATED,
                                 S.SEED_STAGE_TRAINING)
NONE = S.SEED_STAGE_UNSPECIFIED
CONFIG = PolicyConfig(plateau_epochs=3, min_delta=0.01, max_active_seeds=2, cooldown_epochs=3)


@pytest.fixture
def controller(advisor) -> Controller:
    return Controller(HeuristicPolicy(CONFIG, advisor), DeliveryConfig())


def _run_epochs(controller, view, report, epoch_ended, metrics, *, reports=None,
                higher_is_better=True) -> list[list[LifecycleCommand]]:
    """Feed epochs 0.. with these metrics (and the same reports each epoch); decisions per
    epoch."""
    decided = []
    for epoch, metric in enumerate(metrics):
        for layer_report in reports or [report()]:
            layer_report.epoch = epoch
            view.record_report(layer_report)
        view.record_epoch_end(epoch_ended(epoch, metric, higher_is_better=higher_is_better),
                              now=1000.0 + epoch)
        decided.append(controller.decide(view, now=1000.0 + epoch))
    return decided


def _kinds(commands):
    return [c.WhichOneof("action") for c in commands]


def test_germinates_only_once_the_metric_plateaus(controller, report, epoch_ended, advisor):
    view = JobView("job-1")
    decided = _run_epochs(controller, view, report, epoch_ended,
                          [0.50, 0.60, 0.70, 0.705, 0.708, 0.709])
    assert [_kinds(d) for d in decided] == [[], [], [], [], [], ["germinate"]]
    (command,) = decided[5]
    assert command.germinate.blueprint_name == "low_rank"
    assert command.germinate.strategy_name == "drift_controlled"
    assert command.job_id == "job-1" and command.apply_at_epoch == 6
    assert "plateau" in command.rationale and "(karn)" in command.rationale
    assert advisor.requests == [("job-1", "layers.0", CONFIG.fallback_chunk_size)]


def test_lower_is_better_metrics_plateau_the_other_way(controller, report, epoch_ended):
    falling_loss = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1]
    decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, falling_loss,
                          higher_is_better=False)
    assert all(d == [] for d in decided), "a falling loss is progress, not a plateau"
    decided = _run_epochs(controller, JobView("job-2"), report, epoch_ended, falling_loss,
                          higher_is_better=True)
    assert _kinds(decided[3]) == ["germinate"]


def test_no_germination_without_a_validation_metric(controller, report, epoch_ended):
    decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [None] * 6)
    assert all(d == [] for d in decided)


def test_germinates_the_seed_of_worst_health_across_layers(controller, report, epoch_ended):
    healthy = report(layer="a", variance=[1.0, 1.0, 1.0, 1.0])
    # Seed 2 of layer b: a quarter of its layer's mean variance and half dead.
    sick = report(layer="b", variance=[1.0, 1.0, 0.25, 1.0], dead=[0.0, 0.0, 0.5, 0.0])
    decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5] * 4,
                          reports=[healthy, sick])
    (command,) = decided[3]
    assert (command.layer_id, command.seed_index) == ("b", 2)


@pytest.mark.parametrize("placement", ["health", "gradient"])
def test_gradient_placement_germinates_where_the_output_gradient_is(advisor, report,
                                                                    epoch_ended, placement):
    """placement="gradient": the dormant seed with the largest output_grad_sq across layers;
    a layer whose reports carry none (a runtime that does not measure it) ranks after the
    measured ones, by health; placement="health" ignores the column."""
    measured = report(layer="a")
    measured.output_grad_sq[:] = [0.1, 0.0, 3.0, 0.2]
    sick = report(layer="b", variance=[1.0, 1.0, 0.25, 1.0], dead=[0.0, 0.0, 0.5, 0.0])
    config = PolicyConfig(plateau_epochs=1, min_delta=0.01, placement=placement)
    controller = Controller(HeuristicPolicy(config, advisor), DeliveryConfig())
    decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5, 0.5],
                          reports=[measured, sick])
    (command,) = decided[1]
    assert (command.layer_id, command.seed_index) == (("a", 2) if placement == "gradient"
                                                       else ("b", 2))
    if placement == "gradient":
        assert "largest output gradient 3" in command.rationale
    with pytest.raises(ValueError, match="placement"):
        PolicyConfig(placement="random")


def test_health_weights_decide_which_symptom_matters(advisor, report, epoch_ended):
    # Seed 0 is highly correlated; seed 1 has low variance.
    layer = report(variance=[1.0, 0.6, 1.2, 1.2], correlation=[0.9, 0.1, 0.1, 0.1])
    for weights, expected in ((HealthWeights(variance=1, correlation=0), 1),
                              (HealthWeights(variance=0.1, correlation=1), 0)):
        config = PolicyConfig(plateau_epochs=1, min_delta=0.01, weights=weights)
        controller = Controller(HeuristicPolicy(config, advisor), DeliveryConfig())
        decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5, 0.5],
                              reports=[layer])
        assert decided[1][0].seed_index == expected


def test_full_layers_get_no_germination(controller, report, epoch_ended):
    full = report(layer="a", stages=[TRAINING, S.SEED_STAGE_GRAFTING, DORMANT, DORMANT],
                  variance=[1, 1, 0.01, 1])
    roomy = report(layer="b", variance=[1, 1, 0.9, 1])
    decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5] * 4,
                          reports=[full, roomy])
    (command,) = decided[3]
    assert (command.layer_id, command.seed_index) == ("b", 2)
    decided = _run_epochs(controller, JobView("job-2"), report, epoch_ended, [0.5] * 4,
                          reports=[full])
    assert decided[3] == []


@pytest.mark.parametrize(("cooldown", "expected"), [
    (0, [3, 4, 5, 6]),  # no cooldown: every plateau epoch, until the 4 seeds are used
    (1, [3, 5, 7, 9]),  # one epoch decided without germination after each
    (3, [3, 7]),
])
def test_cooldown_spaces_germinations(advisor, report, epoch_ended, cooldown, expected):
    config = PolicyConfig(plateau_epochs=3, min_delta=0.01, max_active_seeds=4,
                          cooldown_epochs=cooldown)
    controller = Controller(HeuristicPolicy(config, advisor), DeliveryConfig())
    decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5] * 10)
    germinated_at = [epoch for epoch, d in enumerate(decided) if "germinate" in _kinds(d)]
    assert germinated_at == expected


@pytest.mark.parametrize("unavailable", [S.SEED_STAGE_CULLED, S.SEED_STAGE_FOSSILIZED,
                                         S.SEED_STAGE_ROLLED_BACK, S.SEED_STAGE_CANCELLED])
def test_never_germinates_embargoed_or_ended_seeds(controller, report, epoch_ended,
                                                   unavailable):
    # The unavailable seed looks the sickest by far.
    layer = report(stages=[unavailable, DORMANT, DORMANT, DORMANT],
                   variance=[0.0, 1.0, 0.8, 1.0], dead=[1.0, 0, 0, 0])
    decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5] * 4,
                          reports=[layer])
    assert [c.seed_index for c in decided[3]] == [2]


def test_nothing_fits_means_no_germination(advisor, report, epoch_ended):
    advisor.choice = None
    controller = Controller(HeuristicPolicy(CONFIG, advisor), DeliveryConfig())
    decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5] * 4)
    assert decided[3] == [] and len(advisor.requests) == 1


@pytest.mark.parametrize(("stage", "ready", "kind", "target"), [
    (GERMINATED, NONE, "advance", TRAINING),
    (TRAINING, S.SEED_STAGE_GRAFTING, "advance", S.SEED_STAGE_GRAFTING),
    (S.SEED_STAGE_GRAFTING, S.SEED_STAGE_STABILIZATION, "advance", S.SEED_STAGE_STABILIZATION),
    (S.SEED_STAGE_EVALUATING, S.SEED_STAGE_FINE_TUNING, "advance", S.SEED_STAGE_FINE_TUNING),
    (S.SEED_STAGE_FINE_TUNING, S.SEED_STAGE_FOSSILIZED, "advance", S.SEED_STAGE_FOSSILIZED),
    (TRAINING, S.SEED_STAGE_CULLED, "cull", None),
    (S.SEED_STAGE_EVALUATING, S.SEED_STAGE_CULLED, "cull", None),
    (S.SEED_STAGE_STABILIZATION, S.SEED_STAGE_ROLLED_BACK, "rollback", None),
])
def test_readiness_becomes_the_matching_command(controller, report, epoch_ended, stage, ready,
                                                kind, target):
    layer = report(stages=[DORMANT, stage], ready_for=[NONE, ready])
    (decided,) = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5],
                             reports=[layer])
    (command,) = decided
    assert (command.WhichOneof("action"), command.seed_index) == (kind, 1)
    if target is not None:
        assert command.advance.target_stage == target and not command.advance.force


def test_the_runtimes_own_moves_are_left_to_it(controller, report, epoch_ended):
    layer = report(stages=[S.SEED_STAGE_CULLED, S.SEED_STAGE_CANCELLED],
                   ready_for=[DORMANT, DORMANT])
    (decided,) = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5],
                             reports=[layer])
    assert decided == []


def test_one_decision_per_epoch_under_redelivery(controller, report, epoch_ended):
    view = JobView("job-1")
    decided = _run_epochs(controller, view, report, epoch_ended, [0.5] * 4)
    assert _kinds(decided[3]) == ["germinate"]
    # The bus delivers epoch 3's report and end event again.
    assert not view.record_epoch_end(epoch_ended(3, 0.5), now=2000.0)
    view.record_report(report(epoch=3))
    assert controller.decide(view, now=2000.0) == []


def test_command_ids_are_deterministic_and_unique(advisor, report, epoch_ended):
    layer = report(stages=[GERMINATED, TRAINING, DORMANT, DORMANT],
                   ready_for=[NONE, S.SEED_STAGE_GRAFTING, NONE, NONE])
    ids = []
    for _ in range(2):  # a fresh Tamiyo deciding the same epoch (a crash before saving)
        config = PolicyConfig(plateau_epochs=3, max_active_seeds=4)
        controller = Controller(HeuristicPolicy(config, advisor), DeliveryConfig())
        decided = _run_epochs(controller, JobView("job-1"), report, epoch_ended, [0.5] * 4,
                              reports=[layer])
        ids.append([(c.WhichOneof("action"), c.command_id) for d in decided for c in d])
    assert ids[0] == ids[1]
    assert [kind for kind, _ in ids[0]] == ["advance", "advance", "germinate"]
    assert len({command_id for _, command_id in ids[0]}) == 3


def test_seeds_with_commands_in_flight_get_no_other(controller, report, epoch_ended):
    view = JobView("job-1")
    layer = report(stages=[GERMINATED, DORMANT, DORMANT, DORMANT])
    decided = _run_epochs(controller, view, report, epoch_ended, [0.5] * 4, reports=[layer])
    assert _kinds(decided[0]) == ["advance"]
    # No ack yet: the seed still reports GERMINATED, and is not promoted again.
    assert all("advance" not in _kinds(d) for d in decided[1:])
    # The germination of epoch 3 counts against capacity while in flight: with the promoted
    # seed that makes max_active_seeds (2), so the cooldown-free epoch 6 germinates nothing.
    decided = _run_epochs(controller, view, report, epoch_ended, [0.5] * 7, reports=[layer])
    assert all(d == [] for d in decided)


def test_a_report_older_than_an_applied_command_is_not_acted_on(controller, report,
                                                                epoch_ended):
    view = JobView("job-1")
    layer = report(stages=[TRAINING], ready_for=[S.SEED_STAGE_GRAFTING])
    (decided,) = _run_epochs(controller, view, report, epoch_ended, [0.5], reports=[layer])
    (advance,) = decided
    controller.on_ack(view, CommandAck(command_id=advance.command_id, job_id="job-1",
                                       success=True, stage_before=TRAINING,
                                       stage_after=S.SEED_STAGE_GRAFTING, applied_epoch=1))
    # Epoch 1's report was taken before the advance was applied at that boundary.
    layer.epoch = 1
    view.record_report(layer)
    view.record_epoch_end(epoch_ended(1, 0.5), now=1001.0)
    assert controller.decide(view, now=1001.0) == []
    # From epoch 2 on the report is current again.
    layer.epoch = 2
    view.record_report(layer)
    view.record_epoch_end(epoch_ended(2, 0.5), now=1002.0)
    assert _kinds(controller.decide(view, now=1002.0)) == ["advance"]
