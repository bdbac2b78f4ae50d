"""The heuristic policy with its stability guard, through the Controller as the worker drives
it: a planted metric spike (up for a loss, down for an accuracy), a burst of rollbacks in the
reports, a drifting blended seed. While paused no germination is decided and other commands
go on; growth resumes resume_epochs epochs after the newest instability; the pause is counted
and logged, and read again from a saved view."""

from __future__ import annotations

import logging
import math

import pytest
from oona.contracts import EpochEvent, EpochEventKind
from oona.contracts import SeedStage as Stage
from prometheus_client import REGISTRY
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.stability import StabilityConfig
from tamiyo.view import JobView

S = Stage
DORMANT, TRAINING, GRAFTING = S.SEED_STAGE_DORMANT, S.SEED_STAGE_TRAINING, S.SEED_STAGE_GRAFTING
NONE = S.SEED_STAGE_UNSPECIFIED
# Improving by 1/64 (> min_delta) every epoch until epoch 4, so no plateau before the spike.
ACCURACY = [0.75, 0.765625, 0.78125, 0.796875, 0.8125]
LOSS = [1.0, 0.984375, 0.96875, 0.953125, 0.9375]


def _policy(advisor, **stability) -> HeuristicPolicy:
    guard = None if stability.pop("off", False) else StabilityConfig(**stability)
    return HeuristicPolicy(PolicyConfig(plateau_epochs=2, min_delta=2**-8, cooldown_epochs=0,
                                        stability=guard), advisor)


def _run(policy, report, epoch_ended, metrics, *, reports=None, higher_is_better=True,
         view=None):
    """Decisions per epoch 0.. (reports: one list per epoch, or the same default each)."""
    controller = Controller(policy, DeliveryConfig())
    view = view or JobView("job-1")
    decided = []
    for epoch, metric in enumerate(metrics):
        for layer_report in (reports(epoch) if reports else [report()]):
            layer_report.epoch = epoch
            view.record_report(layer_report)
        view.record_epoch_end(epoch_ended(epoch, metric, higher_is_better=higher_is_better),
                              now=1000.0 + epoch)
        decided.append(controller.decide(view, now=1000.0 + epoch))
    return decided


def _germinated_at(decided) -> list[int]:
    return [e for e, d in enumerate(decided)
            if any(c.WhichOneof("action") == "germinate" for c in d)]


def _paused_epochs(signal: str) -> float:
    return REGISTRY.get_sample_value("tamiyo_growth_paused_epochs_total", {"signal": signal})


@pytest.mark.parametrize(("higher_is_better", "history", "spike"), [
    (True, ACCURACY, 0.25),  # an accuracy collapses
    (False, LOSS, 4.0),  # a loss blows up
])
def test_a_metric_spike_pauses_germination_for_resume_epochs(advisor, report, epoch_ended,
                                                             higher_is_better, history, spike):
    # After the spike the metric is back at its best: a plateau from epoch 6 on.
    metrics = [*history, spike] + [history[-1]] * 6
    unguarded = _run(_policy(advisor, off=True), report, epoch_ended, metrics,
                     higher_is_better=higher_is_better)
    assert _germinated_at(unguarded)[0] == 6
    decided = _run(_policy(advisor), report, epoch_ended, metrics,
                   higher_is_better=higher_is_better)
    # Spike at 5: paused at 5, 6, 7; epochs 6, 7, 8 stable, so epoch 8 germinates.
    assert _germinated_at(decided)[0] == 8


def test_a_spike_in_the_good_direction_is_no_pause(advisor, report, epoch_ended):
    # The accuracy run's "spike" read as a loss: a loss falling to 0.25 is progress.
    metrics = [*LOSS, 0.25, 0.25, 0.25, 0.25]
    decided = _run(_policy(advisor), report, epoch_ended, metrics, higher_is_better=False)
    assert _germinated_at(decided)[0] == 7  # the plateau after epoch 5's gain


def test_resume_epochs_is_the_length_of_the_pause(advisor, report, epoch_ended):
    metrics = [*ACCURACY, 0.25] + [ACCURACY[-1]] * 8
    decided = _run(_policy(advisor, resume_epochs=5), report, epoch_ended, metrics)
    assert _germinated_at(decided)[0] == 10


def test_other_commands_go_on_while_growth_is_paused(advisor, report, epoch_ended):
    def reports(epoch):
        # Seed 0 trains and becomes ready to graft at epoch 6, inside the pause.
        ready = S.SEED_STAGE_GRAFTING if epoch == 6 else NONE
        return [report(stages=[TRAINING, DORMANT, DORMANT, DORMANT],
                       ready_for=[ready, NONE, NONE, NONE])]

    metrics = [*ACCURACY, 0.25, ACCURACY[-1], ACCURACY[-1]]
    decided = _run(_policy(advisor), report, epoch_ended, metrics, reports=reports)
    assert [(c.WhichOneof("action"), c.seed_index) for c in decided[6]] == [("advance", 0)]
    assert _germinated_at(decided) == []


def _rolled_back_at(report, epoch_of: dict[int, int]):
    """Reports per epoch in which seed i is rolled back at epoch_of[i] (dormant before)."""
    def reports(epoch):
        stages = [DORMANT] * 4
        in_stage = [epoch] * 4
        for seed, at in epoch_of.items():
            if epoch >= at:
                stages[seed], in_stage[seed] = S.SEED_STAGE_ROLLED_BACK, epoch - at
        layer = report(stages=stages)
        layer.epochs_in_stage[:] = in_stage
        return [layer]
    return reports


@pytest.mark.parametrize(("epoch_of", "first_germination"), [
    ({0: 1}, 2),  # one rollback: no pause, the plateau germinates at 2
    ({0: 1, 1: 2}, 5),  # two within 5 epochs: paused at 2, 3, 4
    ({0: 1, 1: 6}, 2),  # 6 is outside the window that begins at 1
])
def test_repeated_rollbacks_pause_germination(advisor, report, epoch_ended, epoch_of,
                                             first_germination):
    metrics = [0.5] * 9  # a plateau from epoch 2 on
    decided = _run(_policy(advisor), report, epoch_ended, metrics,
                   reports=_rolled_back_at(report, epoch_of))
    assert _germinated_at(decided)[0] == first_germination


def _drifting_at(report, epochs: set[int], stage=GRAFTING):
    def reports(epoch):
        layer = report(stages=[stage, DORMANT, DORMANT, DORMANT])
        layer.drift[0] = 0.75 if epoch in epochs else 0.0625
        return [layer]
    return reports


def test_a_drifting_blended_seed_pauses_germination_until_resume_epochs_stable(
        advisor, report, epoch_ended):
    metrics = [0.5] * 9
    decided = _run(_policy(advisor), report, epoch_ended, metrics,
                   reports=_drifting_at(report, {2}))
    # Drift seen in epoch 2's report only; remembered: paused at 2, 3, 4.
    assert _germinated_at(decided)[0] == 5


def test_drift_of_a_seed_not_blended_is_no_pause(advisor, report, epoch_ended):
    decided = _run(_policy(advisor), report, epoch_ended, [0.5] * 4,
                   reports=_drifting_at(report, {0, 1, 2, 3}, stage=TRAINING))
    assert _germinated_at(decided)[0] == 2


def test_the_pause_is_counted_by_signal_and_logged(advisor, report, epoch_ended, caplog):
    before = _paused_epochs("metric_spike")
    with caplog.at_level(logging.INFO, logger="tamiyo.policy"):
        _run(_policy(advisor), report, epoch_ended, [*ACCURACY, 0.25] + [ACCURACY[-1]] * 4)
    assert _paused_epochs("metric_spike") - before == 3
    lines = [r.getMessage() for r in caplog.records if "growth paused" in r.getMessage()]
    assert len(lines) == 3
    assert lines[0].startswith("job job-1 epoch 5: growth paused: metric_spike at epoch 5 "
                               "(validation metric fell to 0.25 from a median of 0.7812")
    assert lines[0].endswith("; resumes at epoch 8 if stable")
    # Epoch 6 is a plateau: the germination it asked for is withheld, and said so.
    assert "withheld" not in lines[0]
    assert lines[1].endswith("resumes at epoch 8 if stable; germination withheld (plateau: "
                             "no gain > 0.00390625 for 2 epochs)")


def test_the_pause_is_read_again_from_a_saved_view(advisor, report, epoch_ended):
    """A restarted or taking-over Tamiyo (a fresh policy, the view from its JSON) still sees a
    spike pause: it is a function of the metrics the view keeps."""
    view = JobView("job-1")
    _run(_policy(advisor), report, epoch_ended, [*ACCURACY, 0.25, ACCURACY[-1]], view=view)
    restored = JobView.from_json(view.to_json())
    pause = _policy(advisor).growth_pause(restored)
    assert pause is not None and (pause.cause.epoch, pause.resumes_at) == (5, 8)


def test_a_job_rewound_to_before_a_drift_forgets_it(advisor, report, epoch_ended):
    policy = _policy(advisor)
    view = JobView("job-1")
    _run(policy, report, epoch_ended, [0.5] * 5, reports=_drifting_at(report, {4}), view=view)
    assert policy.growth_pause(view).cause.signal == "drift"
    # The job resumes from its checkpoint of epoch 2 and replays epochs 3.. without drift.
    view.record_job_start(EpochEvent(job_id="job-1", epoch=2,
                                     kind=EpochEventKind.EPOCH_EVENT_KIND_JOB_STARTED), "run-2")
    assert policy.growth_pause(view) is None
    steady = _drifting_at(report, set())
    for epoch in (3, 4):
        (layer,) = steady(epoch)
        layer.epoch = epoch
        view.record_report(layer)
        view.record_epoch_end(epoch_ended(epoch, 0.5), now=2000.0 + epoch)
        assert policy.growth_pause(view) is None, epoch


def test_no_guard_no_pause(advisor, report, epoch_ended):
    metrics = [*ACCURACY, 0.25, ACCURACY[-1], ACCURACY[-1]]
    policy = _policy(advisor, off=True)
    decided = _run(policy, report, epoch_ended, metrics,
                   reports=_drifting_at(report, set(range(8))))
    assert _germinated_at(decided)[0] == 6
    view = JobView("job-1", metrics=dict(enumerate(metrics)), epoch=7)
    assert policy.growth_pause(view) is None


def test_the_default_policy_has_the_guard():
    assert PolicyConfig().stability == StabilityConfig()
    assert not math.isinf(StabilityConfig().spike_mads)
