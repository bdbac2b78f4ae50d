"""The checks on what Tamiyo reads (every malformed kind refused with a reason naming the field,
valid messages passed), and the bounds on a job's view however long the job runs."""

from __future__ import annotations

import math

import pytest
from oona.contracts import AckReason, CommandAck, EpochEvent, EpochEventKind
from oona.contracts import SeedStage as Stage
from oona.errors import Reject
from tamiyo.policy import PolicyConfig
from tamiyo.validation import (
    MAX_EPOCH,
    MAX_ID_CHARS,
    MAX_LOGGED_CHARS,
    InvalidContent,
    check_ack,
    check_epoch_event,
    check_id,
    check_report,
)
from tamiyo.view import METRIC_HISTORY_EPOCHS, JobView

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("value", ["job-1", "job-7f3a9c21", "layers.0", "0.linear", "_proj.fc",
                                   "model.layers.31.block_sparse_moe.experts.7.w1",
                                   "model.layers.0.self_attn.q_proj", "_orig_mod.fc1", "root",
                                   "team:job-1", "5b0d3f6e-7a1c-4e0b-9a55-7461d1796f01",
                                   "a" * MAX_ID_CHARS])
def test_ids_of_real_jobs_layers_and_commands_pass(value):
    check_id("id", value)


@pytest.mark.parametrize("value", ["", "a" * (MAX_ID_CHARS + 1), "x" * 200_000, "../../x",
                                   "job{1}", "job 1", "job\n1", "-job", ".hidden", "jöb", "a/b",
                                   ":job", "job@host", "job\x00"])
def test_other_ids_are_refused(value):
    with pytest.raises(InvalidContent, match="is not an id") as refused:
        check_id("job_id", value)
    assert len(str(refused.value)) < 400, "a huge id is not copied into the reason"


def test_a_report_as_the_runtime_publishes_it_passes(report):
    layer = report(stages=[Stage.SEED_STAGE_TRAINING, Stage.SEED_STAGE_DORMANT,
                           Stage.SEED_STAGE_FOSSILIZED, Stage.SEED_STAGE_ROLLED_BACK],
                   ready_for=[Stage.SEED_STAGE_GRAFTING, Stage.SEED_STAGE_UNSPECIFIED,
                              Stage.SEED_STAGE_UNSPECIFIED, Stage.SEED_STAGE_UNSPECIFIED],
                   variance=[0.0, NAN, INF, 3.5], dead=[0.0, 1.0, NAN, 0.5])
    layer.grad_norm[0] = INF  # a diverging seed: what the runtime's safety rules look at
    layer.features = 4
    check_report(layer)  # output_grad_sq empty: a runtime that does not measure it
    layer.output_grad_sq.extend([0.0, 2.5, NAN, INF])
    check_report(layer)


def _broken(report, change):
    layer = report()
    change(layer)
    return layer


def _set(column, index, value):
    def change(layer):
        getattr(layer, column)[index] = value
    return change


def _attr(name, value):
    return lambda layer: setattr(layer, name, value)


@pytest.mark.parametrize(("change", "reason"), [
    (_attr("job_id", ""), "job_id '' is not an id"),
    (_attr("job_id", "j" * 200_000), "job_id 'jjj"),
    (_attr("layer_id", "fc{1}"), r"layer_id 'fc\{1\}' is not an id"),
    (_attr("layer_id", ""), "layer_id '' is not an id"),
    (_attr("epoch", MAX_EPOCH + 1), "epoch 10000001 is past"),
    (_attr("num_seeds", 0), "num_seeds 0 is not in"),
    (_attr("num_seeds", 4_000_000_000), "num_seeds 4000000000 is not in"),
    (_attr("num_seeds", 5), "stage has 4 elements, num_seeds is 5"),
    (lambda layer: layer.chunk_variance.pop(), "chunk_variance has 3 elements"),
    (lambda layer: layer.contribution.append(0.0), "contribution has 5 elements"),
    (_set("stage", 1, 99), r"stage\[1\] = 99 is not a seed stage"),
    (_set("stage", 0, Stage.SEED_STAGE_UNSPECIFIED), r"stage\[0\] = 0 is not a seed stage"),
    (_set("ready_for", 2, 12), r"ready_for\[2\] = 12"),
    (_set("chunk_variance", 3, -1.0), r"chunk_variance\[3\] = -1.0 is outside"),
    (_set("dead_ratio", 0, 1.5), r"dead_ratio\[0\] = 1.5 is outside"),
    (_set("dead_ratio", 0, -INF), r"dead_ratio\[0\] = -inf"),
    (_set("mean_abs_correlation", 1, INF), r"mean_abs_correlation\[1\] = inf is outside"),
    (_set("alpha", 0, 2.0), r"alpha\[0\] = 2.0"),
    (_set("grad_norm", 0, -0.5), r"grad_norm\[0\] = -0.5"),
    (_set("blueprint_id", 0, -7), "blueprint_id has -7"),
    (_attr("features", 3), "features 3 < num_seeds 4"),
    (lambda layer: layer.output_grad_sq.extend([1.0, 2.0]),
     r"output_grad_sq has 2 elements, num_seeds is 4 \(or 0\)"),
    (lambda layer: layer.output_grad_sq.extend([1.0, -2.0, 0.0, 0.0]),
     r"output_grad_sq\[1\] = -2.0 is outside"),
])
def test_malformed_reports_are_refused_with_the_field_named(report, change, reason):
    with pytest.raises(InvalidContent, match=reason) as refused:
        check_report(_broken(report, change))
    assert isinstance(refused.value, Reject), "the bus dead-letters it at once"


def _event(**fields) -> EpochEvent:
    values = dict(job_id="job-1", kind=EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED, epoch=3)
    values.update(fields)
    return EpochEvent(**values)


def test_epoch_events_are_checked():
    check_epoch_event(_event(val_metric=NAN, message="x" * 100_000))  # see the next test
    for event, reason in ((_event(job_id="a/b"), "job_id 'a/b'"),
                          (_event(kind=0), "kind 0 is not a known"),
                          (_event(kind=17), "kind 17 is not a known"),
                          (_event(epoch=4_000_000_000), "epoch 4000000000 is past"),
                          (_event(val_metric_name="m" * 1000), "val_metric_name of 1000")):
        with pytest.raises(InvalidContent, match=reason):
            check_epoch_event(event)


def test_a_non_finite_metric_counts_as_not_measured():
    view = JobView("job-1")
    assert view.record_epoch_end(_event(epoch=0, val_metric=0.5), now=1.0)
    assert view.record_epoch_end(_event(epoch=1, val_metric=NAN), now=2.0)
    assert view.record_epoch_end(_event(epoch=2, val_metric=-INF), now=3.0)
    assert view.epoch == 2 and view.awaiting_decision, "the epochs are still decided"
    assert view.validation_history() == [0.5]


def _ack(**fields) -> CommandAck:
    values = dict(command_id="c-1", job_id="job-1", success=True, reason=AckReason.ACK_REASON_OK,
                  stage_before=Stage.SEED_STAGE_DORMANT, stage_after=Stage.SEED_STAGE_GERMINATED,
                  applied_epoch=4)
    values.update(fields)
    return CommandAck(**values)


def test_acks_are_checked():
    check_ack(_ack(reason=999, message="m" * 100_000))  # a reason newer than this build
    for ack, reason in ((_ack(command_id=""), "command_id '' is not an id"),
                        (_ack(job_id="x" * 300), "job_id 'xxx"),
                        (_ack(stage_after=42), "stage_after 42 is not a SeedStage"),
                        (_ack(applied_epoch=MAX_EPOCH + 1), "applied_epoch")):
        with pytest.raises(InvalidContent, match=reason):
            check_ack(ack)


def test_a_long_jobs_view_stays_bounded(report):
    """+25 KB a minute before: every epoch's metric and every unmatched ack were kept."""
    view = JobView("job-1")
    sizes = []
    for epoch in range(3000):
        view.record_report(report(epoch=epoch))
        view.record_epoch_end(_event(epoch=epoch, val_metric=0.5 + epoch * 1e-4), now=epoch)
        # acks of commands not in flight here (a follower's, duplicates), with long messages
        view.record_ack(_ack(command_id=f"c-{epoch}", message="refused: " + "x" * 5000))
        if epoch in (999, 2999):
            sizes.append(len(view.to_json()))
    assert len(view.metrics) == METRIC_HISTORY_EPOCHS
    assert min(view.metrics) == 3000 - METRIC_HISTORY_EPOCHS, "the newest are kept"
    assert len(view.early_acks) == 256 and "c-2999" in view.early_acks
    assert all(len(a.message) <= MAX_LOGGED_CHARS for a in view.early_acks.values())
    assert sizes[1] <= sizes[0] * 1.01, sizes
    assert sizes[1] < 300_000
    # A saved state from before the bound (every epoch kept) is trimmed at its next epoch.
    old = JobView.from_json(view.to_json())
    old.metrics = {e: 0.5 for e in range(5000)}
    old.record_epoch_end(_event(epoch=5000, val_metric=0.5), now=5000.0)
    assert len(old.metrics) == METRIC_HISTORY_EPOCHS


def test_the_plateau_must_fit_in_the_kept_history():
    with pytest.raises(ValueError, match="plateau_epochs <"):
        PolicyConfig(plateau_epochs=METRIC_HISTORY_EPOCHS)
