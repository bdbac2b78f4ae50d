"""The Controller's bookkeeping: acks (positive, negative, duplicate), retries of overdue
commands under the same id, giving up, job end, and the state's JSON round trip."""

from __future__ import annotations

import pytest
from oona.contracts import AckReason, CommandAck
from oona.contracts import SeedStage as Stage
from tamiyo import metrics
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.view import JobView

TIMEOUT_S = 10.0


@pytest.fixture
def controller(advisor) -> Controller:
    policy = HeuristicPolicy(PolicyConfig(plateau_epochs=1), advisor)
    return Controller(policy, DeliveryConfig(ack_timeout_s=TIMEOUT_S, max_attempts=3))


@pytest.fixture
def decided(controller, report, epoch_ended):
    """A view after epoch 0 (promote seed 0) and epoch 1 (germinate on the plateau)."""
    view = JobView("job-1")
    layer = report(stages=[Stage.SEED_STAGE_GERMINATED, *[Stage.SEED_STAGE_DORMANT] * 3])
    commands = []
    for epoch in (0, 1):
        layer.epoch = epoch
        view.record_report(layer)
        view.record_epoch_end(epoch_ended(epoch, 0.5), now=100.0 + epoch)
        commands += controller.decide(view, now=100.0 + epoch)
    assert [c.WhichOneof("action") for c in commands] == ["advance", "germinate"]
    return view, commands


def _ack(command, success=True, reason=AckReason.ACK_REASON_OK):
    return CommandAck(command_id=command.command_id, job_id=command.job_id, success=success,
                      reason=reason, stage_before=Stage.SEED_STAGE_DORMANT,
                      stage_after=Stage.SEED_STAGE_GERMINATED, applied_epoch=2)


def _count(counter, *labels) -> float:
    return (counter.labels(*labels) if labels else counter)._value.get()


def test_acks_resolve_commands_once_and_are_counted_by_reason(controller, decided):
    view, (advance, germinate) = decided
    refused = _count(metrics.ACKS, "CAPACITY")
    assert controller.on_ack(view, _ack(advance)) is not None
    assert controller.on_ack(view, _ack(advance)) is None, "a redelivered ack changes nothing"
    assert controller.on_ack(view, _ack(germinate, False, AckReason.ACK_REASON_CAPACITY))
    assert view.pending == {}
    assert _count(metrics.ACKS, "CAPACITY") == refused + 1


def test_overdue_commands_are_resent_under_the_same_id(controller, decided, epoch_ended):
    view, (advance, germinate) = decided
    controller.on_ack(view, _ack(advance))
    # The germination is due at epoch 2's boundary: no retry before epoch 2 has ended.
    assert controller.due_retries(view, now=1000.0) == []
    view.record_epoch_end(epoch_ended(2, 0.5), now=1000.0)
    assert controller.due_retries(view, now=1000.0 + TIMEOUT_S - 1) == []
    retries_before = _count(metrics.COMMAND_RETRIES)
    (retry,) = controller.due_retries(view, now=1000.0 + TIMEOUT_S)
    assert retry.command.command_id == germinate.command_id and retry.attempt == 2
    assert retry.command.apply_at_epoch == germinate.apply_at_epoch
    assert _count(metrics.COMMAND_RETRIES) == retries_before + 1
    # The timeout restarts with each send.
    assert controller.due_retries(view, now=1000.0 + TIMEOUT_S + 1) == []


def test_commands_never_acked_are_abandoned_after_max_attempts(controller, decided,
                                                               epoch_ended):
    view, _ = decided
    view.record_epoch_end(epoch_ended(2, 0.5), now=1000.0)
    abandoned_before = _count(metrics.COMMANDS_ABANDONED)
    sent = [len(controller.due_retries(view, now=1000.0 + TIMEOUT_S * k)) for k in range(1, 5)]
    assert sent == [2, 2, 0, 0] and view.pending == {}
    assert _count(metrics.COMMANDS_ABANDONED) == abandoned_before + 2


def test_a_refused_command_is_not_resent(controller, decided, epoch_ended):
    view, (advance, germinate) = decided
    controller.on_ack(view, _ack(advance, False, AckReason.ACK_REASON_REFUSED_TRANSITION))
    view.record_epoch_end(epoch_ended(2, 0.5), now=1000.0)
    assert [r.command.command_id for r in controller.due_retries(view, now=1000 + TIMEOUT_S)] == [
        germinate.command_id]


def test_a_finished_job_decides_and_resends_nothing(controller, decided, epoch_ended, report):
    view, commands = decided
    unapplied_before = _count(metrics.COMMANDS_UNAPPLIED)
    controller.finish(view)  # its two commands were never acked: counted, let go
    assert _count(metrics.COMMANDS_UNAPPLIED) == unapplied_before + len(commands) == (
        unapplied_before + 2)
    view.record_report(report(epoch=5))
    view.record_epoch_end(epoch_ended(5, 0.5), now=0.0)
    assert controller.decide(view, now=0.0) == []
    assert controller.due_retries(view, now=1e9) == []


def test_state_survives_a_json_round_trip(controller, decided, epoch_ended):
    view, (advance, germinate) = decided
    controller.on_ack(view, _ack(advance))
    view.record_epoch_end(epoch_ended(2, 0.5), now=123.0)
    restored = JobView.from_json(view.to_json())
    assert restored.to_json() == view.to_json()
    assert restored.pending[germinate.command_id].command == germinate
    assert restored.pending[germinate.command_id].retry_at == 123.0
    assert restored.reports == view.reports and restored.applied == view.applied
    # Without reports (as the worker stores it), they come from elsewhere.
    assert JobView.from_json(view.to_json(with_reports=False), {}).reports == {}
    # The restored view decides on as the original would.
    assert controller.decide(restored, now=200.0) == controller.decide(view, now=200.0)


def test_unknown_state_versions_are_refused():
    state = JobView("job-1").to_json().replace('"version": 1', '"version": 99')
    with pytest.raises(ValueError, match="version 99"):
        JobView.from_json(state)


def test_a_job_resumed_from_an_older_checkpoint_is_decided_again(controller, report,
                                                                 epoch_ended):
    view = JobView("job-1")
    assert view.record_job_start(epoch_ended(0, None), run_id="run-1")
    first_run = []
    for epoch in range(4):
        view.record_report(report(epoch=epoch))
        view.record_epoch_end(epoch_ended(epoch, 0.5), now=float(epoch))
        first_run += controller.decide(view, now=float(epoch))
    assert [c.WhichOneof("action") for c in first_run] == ["germinate"]  # at epoch 1
    assert not view.record_job_start(epoch_ended(0, None), run_id="run-1"), "a redelivery"
    assert view.epoch == 3

    # The runtime restarts from its epoch-0 checkpoint and replays epochs 1 to 3.
    assert view.record_job_start(epoch_ended(0, None), run_id="run-2")
    assert (view.epoch, view.last_decided_epoch, sorted(view.metrics)) == (0, 0, [0])
    assert view.pending == {} and view.reports == {} and view.last_germination_epoch is None
    view.record_report(report(epoch=1))
    view.record_epoch_end(epoch_ended(1, 0.5), now=10.0)
    (again,) = controller.decide(view, now=10.0)
    # Same decision as the first run's epoch 1, under a new id: the bus would otherwise drop
    # it as a duplicate of the command the stopped run took with it.
    assert again.WhichOneof("action") == "germinate"
    assert again.command_id not in {c.command_id for c in first_run}


def test_a_decision_repeated_after_a_crash_is_resolved_by_its_early_ack(controller, report,
                                                                          epoch_ended):
    """Crash after publishing a decision, before saving it: the restarted controller may read
    the runtime's ack before it decides that epoch again. The repeat must not stay in flight
    (the runtime acks an id once) nor be sent again."""
    layer = report(stages=[Stage.SEED_STAGE_GERMINATED, *[Stage.SEED_STAGE_DORMANT] * 3])
    view = JobView("job-1")
    view.record_report(layer)
    view.record_epoch_end(epoch_ended(0, 0.5), now=100.0)
    saved = view.to_json()  # the state as it was saved, before the decision
    (promote,) = controller.decide(view, now=100.0)
    restarted = JobView.from_json(JobView.from_json(saved).to_json())
    assert controller.on_ack(restarted, _ack(promote)) is None  # not (yet) in flight
    restarted = JobView.from_json(restarted.to_json())  # the early ack is saved too
    assert controller.decide(restarted, now=101.0) == []
    assert restarted.pending == {} and restarted.early_acks == {}
    assert restarted.applied[(promote.layer_id, promote.seed_index)].epoch == 2
