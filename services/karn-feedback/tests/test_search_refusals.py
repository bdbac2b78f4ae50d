"""The search and the runtimes' room: a proposal the runtimes refuse (the field report a runtime
publishes for a refused Germinate, final stage DORMANT) is retired after `max_refusals`, and the
sizes asked for stay within the room the runtimes' banks have (KARN_SEARCH_MAX_HIDDEN / _RANK)."""

from __future__ import annotations

import random
import uuid

import pytest
from karn.recommender import BlueprintRecommender, RecommendationRequest
from karn.search import ACTIVE, RETIRED, BlueprintSearch, SearchConfig, search_space
from karn.settings import KarnSettings
from oona.contracts import FieldReport, SeedStage, catalog

RESIDUAL_MLP, LOW_RANK = 1, 2


def refusal(blueprint_id: int) -> FieldReport:
    """What kasmina.fleet.wire.refusal_to_field_report publishes for a refused Germinate."""
    nan = float("nan")
    return FieldReport(
        report_id=f"job-1/layers.0/3/refused:{uuid.uuid4()}", job_id="job-1",
        layer_id="layers.0", seed_index=3, blueprint_id=blueprint_id, strategy_id=-1,
        blueprint_name=f"bp{blueprint_id}", final_stage=SeedStage.SEED_STAGE_DORMANT,
        metric_name="val_loss", metric_before=nan, metric_after=nan, contribution=nan,
        chunk_size=16, execution_path="chunked",
        end_reason="refused: ACK_REASON_UNKNOWN_BLUEPRINT: no bank with room")


def test_a_proposal_refused_max_refusals_times_is_retired_and_never_asked_for_again(
        store, field_report):
    search = BlueprintSearch(store, SearchConfig(seed=5, max_pending=1, max_refusals=2),
                             parents=("residual_mlp",))
    (refused,) = search.step()
    store.record(refusal(refused.spec.blueprint_id))
    assert search.step() == [] and search.proposals()[0].status == ACTIVE  # one: still pending
    store.record(refusal(refused.spec.blueprint_id))
    (nxt,) = search.step()  # retired, so no longer pending: the next one is asked for
    first = search.proposals()[0]
    assert first.status == RETIRED and nxt.trial_number == 1
    reason = _status_reason(store, first.spec.blueprint_id)
    assert reason.startswith("refused 2 times"), reason
    recommender = BlueprintRecommender(store, cost_penalty=0.0, rng=random.Random(0))
    offered = recommender.candidates(RecommendationRequest(chunk_size=16, limit=100))
    assert refused.spec.blueprint_id not in {s.blueprint_id for s in offered}
    # Refusal reports count as reports with no success in the statistics (no outcome column).
    (stat,) = store.statistics([refused.spec.blueprint_id])
    assert (stat.reports, stat.successes, stat.culled, stat.mean_metric_gain) == (2, 0, 0, None)
    for _ in range(12):  # the search never asks for it again
        for proposal in search.proposals():
            if proposal.status == ACTIVE:
                for _ in range(search.config.reports_per_trial):
                    store.record(field_report(proposal.spec.blueprint_id, "FOSSILIZED",
                                              contribution=0.1))
        search.step()
    params = [p.params for p in search.proposals()]
    assert len(params) > 5 and params.count(refused.params) == 1


def test_reports_of_grown_seeds_do_not_count_as_refusals(store, field_report):
    search = BlueprintSearch(store, SearchConfig(seed=5, max_pending=1, max_refusals=1),
                             parents=("residual_mlp",))
    (grown,) = search.step()
    for outcome in ("CULLED", "CANCELLED", "ROLLED_BACK"):
        store.record(field_report(grown.spec.blueprint_id, outcome))
    search.step()
    assert search.proposals()[0].status == ACTIVE
    assert search.refusals() == {}


@pytest.mark.parametrize(("room", "hidden", "rank"), [
    ({"max_hidden": 0, "max_rank": 0}, 16, 4),   # KasminaConfig's default room: the catalog's
    ({"max_hidden": 64, "max_rank": 8}, 64, 8),
    ({"max_hidden": 8, "max_rank": 2}, 16, 4),   # never below the parent's own bank
    ({}, 512, 64),                               # no room given: the configured bounds
])
def test_the_sizes_asked_for_stay_within_the_runtimes_room(store, field_report, room, hidden,
                                                           rank):
    config = SearchConfig(seed=11, max_pending=1, **room)
    residual, low_rank = catalog()[RESIDUAL_MLP - 1], catalog()[LOW_RANK - 1]
    assert search_space(residual, config)["hidden"].high == hidden
    assert search_space(low_rank, config)["rank"].high == rank
    search = BlueprintSearch(store, config, parents=("residual_mlp", "low_rank"))
    for _ in range(8):
        search.step()
        for proposal in search.proposals():
            if proposal.status == ACTIVE:
                for _ in range(config.reports_per_trial):
                    store.record(field_report(proposal.spec.blueprint_id, "CULLED"))
    proposals = search.proposals()
    assert len(proposals) >= 10
    assert all(p.spec.hidden <= hidden for p in proposals if p.parent_blueprint_id == 1)
    assert all(p.spec.rank <= rank for p in proposals if p.parent_blueprint_id == 2)


def test_proposals_asked_for_under_a_larger_room_do_not_stop_the_search(store):
    wide = BlueprintSearch(store, SearchConfig(seed=4, max_hidden=512, max_pending=3),
                           parents=("residual_mlp",))
    for _ in range(3):
        wide.step()
    assert any(p.spec.hidden > 16 for p in wide.proposals())
    narrow = BlueprintSearch(store, SearchConfig(seed=4, max_hidden=0, max_pending=9),
                             parents=("residual_mlp",))
    (new,) = narrow.step()  # a restarted Karn with a lowered room carries on
    assert new.spec.hidden <= 16 and new.trial_number == 3


def test_search_room_settings():
    settings = KarnSettings.from_env({"KARN_SEARCH_MAX_HIDDEN": "64",
                                      "KARN_SEARCH_MAX_RANK": "8"})
    assert (settings.search_max_hidden, settings.search_max_rank) == (64, 8)
    assert (KarnSettings().search_max_hidden, KarnSettings().search_max_rank) == (0, 0)
    with pytest.raises(ValueError, match="search_max_hidden"):
        KarnSettings(search_max_hidden=-1)
    with pytest.raises(ValueError):
        SearchConfig(max_refusals=0)


def _status_reason(store, blueprint_id: int) -> str:
    from karn.database import blueprint_proposals
    from sqlalchemy import select

    with store.engine.connect() as connection:
        return connection.execute(select(blueprint_proposals.c.status_reason).where(
            blueprint_proposals.c.blueprint_id == blueprint_id)).scalar_one()
