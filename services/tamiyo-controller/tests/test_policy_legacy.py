"""A layer on the legacy path (one seed, the short lifecycle) promotes a germinated seed
straight to GRAFTING and says so as readiness; Tamiyo follows it instead of sending TRAINING,
which that lifecycle refuses. Layers that publish nothing keep the TRAINING promotion."""

from __future__ import annotations

from oona.contracts import SeedStage as S
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.view import JobView


def _decide(advisor, report, epoch_ended, **columns):
    view = JobView("job-1")
    view.record_report(report(**columns))
    view.record_epoch_end(epoch_ended(0, 0.5), now=1000.0)
    controller = Controller(HeuristicPolicy(PolicyConfig(plateau_epochs=99), advisor),
                            DeliveryConfig())
    return controller.decide(view, now=1000.0)


def test_a_germinated_legacy_seed_is_promoted_to_what_it_is_ready_for(advisor, report,
                                                                      epoch_ended):
    (command,) = _decide(advisor, report, epoch_ended, stages=[S.SEED_STAGE_GERMINATED],
                         ready_for=[S.SEED_STAGE_GRAFTING])
    assert command.advance.target_stage == S.SEED_STAGE_GRAFTING
    assert command.seed_index == 0 and "GRAFTING" in command.rationale


def test_a_germinated_seed_with_no_readiness_starts_training(advisor, report, epoch_ended):
    (command,) = _decide(advisor, report, epoch_ended, stages=[S.SEED_STAGE_GERMINATED],
                         ready_for=[S.SEED_STAGE_UNSPECIFIED])
    assert command.advance.target_stage == S.SEED_STAGE_TRAINING
