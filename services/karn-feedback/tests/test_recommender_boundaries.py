"""The recommender at the edges (DESIGN §6: a bandit over outcomes, the catalog's cost taken into
account): the parameter budget at, one below and one above a blueprint's cost; what counts as a
success (FOSSILIZED with a contribution > 0: exactly 0 is not); the score formula; the limits of
its arguments. Costs at chunk 64 from the catalog's formulas: low_rank 2*4*64 = 512,
residual_mlp (2*16+1)*64 + 16 = 2128, linear 64*64 + 64 = 4160."""

from __future__ import annotations

import math
import random

import pytest
from karn.recommender import (
    BlueprintRecommender,
    RecommendationRequest,
    best_strategy,
    posterior_mean,
)
from karn.store import FieldReportStore, StrategyRecord
from oona.contracts import BlueprintKind, BlueprintSpec, ParameterCost

RESIDUAL_MLP, LOW_RANK, LINEAR = 1, 2, 3
COST_AT_64 = {LOW_RANK: 512, RESIDUAL_MLP: 2128, LINEAR: 4160}


@pytest.fixture
def sqlite_store(sqlite_url):
    store = FieldReportStore.open(sqlite_url)
    yield store
    store.close()


def ids(recommendations) -> set[int]:
    return {r.blueprint.blueprint_id for r in recommendations}


@pytest.mark.parametrize(("budget", "expected"), [
    (0, {LOW_RANK, RESIDUAL_MLP, LINEAR}),  # 0: no limit
    (1, set()), (511, set()), (512, {LOW_RANK}), (513, {LOW_RANK}),
    (2127, {LOW_RANK}), (2128, {LOW_RANK, RESIDUAL_MLP}),
    (4159, {LOW_RANK, RESIDUAL_MLP}), (4160, {LOW_RANK, RESIDUAL_MLP, LINEAR}),
])
def test_parameter_budget_is_inclusive(sqlite_store, budget, expected):
    recommender = BlueprintRecommender(sqlite_store, cost_penalty=0.1, rng=random.Random(0))
    request = RecommendationRequest(chunk_size=64, parameter_budget=budget, limit=3)
    assert ids(recommender.recommend(request)) == expected


@pytest.mark.parametrize(("limit", "count"), [(1, 1), (2, 2), (3, 3), (4, 3), (100, 3)])
def test_limit_caps_the_answer(sqlite_store, limit, count):
    recommender = BlueprintRecommender(sqlite_store, cost_penalty=0.1, rng=random.Random(0))
    assert len(recommender.recommend(RecommendationRequest(chunk_size=64, limit=limit))) == count


@pytest.mark.parametrize(("outcome", "contribution", "success"), [
    ("FOSSILIZED", 1e-9, True), ("FOSSILIZED", 0.5, True),
    ("FOSSILIZED", 0.0, False), ("FOSSILIZED", -1e-9, False), ("FOSSILIZED", math.nan, False),
    ("CULLED", 0.5, False), ("ROLLED_BACK", 0.5, False), ("CANCELLED", 0.5, False),
])
def test_a_success_is_fossilized_with_a_positive_contribution(sqlite_store, field_report,
                                                              outcome, contribution, success):
    sqlite_store.record(field_report(LOW_RANK, outcome, contribution=contribution))
    (stat,) = sqlite_store.statistics([LOW_RANK])
    assert (stat.reports, stat.successes) == (1, int(success))
    recommender = BlueprintRecommender(sqlite_store, cost_penalty=0.0, rng=random.Random(0))
    (rec,) = recommender.recommend(RecommendationRequest(
        chunk_size=64, exclude_blueprint_ids={RESIDUAL_MLP, LINEAR}))
    assert f"{int(success)}/1 reports" in rec.rationale


def test_posterior_mean_is_beta_one_plus_successes_one_plus_failures():
    assert posterior_mean(0, 0) == 0.5
    assert posterior_mean(1, 1) == 2 / 3
    assert posterior_mean(0, 2) == 0.25
    assert posterior_mean(3, 3) == 0.8


@pytest.mark.parametrize("penalty", [0.0, 0.25, 3.0])
def test_score_is_the_beta_sample_minus_penalty_times_relative_cost(sqlite_store, field_report,
                                                                    penalty):
    """Worked out by hand with the same random stream: candidates are sampled in blueprint-id
    order (the catalog's), Beta(1 + s, 1 + f) each, minus penalty * cost / largest cost."""
    sqlite_store.record(field_report(LOW_RANK, "FOSSILIZED", contribution=0.2))
    sqlite_store.record(field_report(LOW_RANK, "CULLED", contribution=-0.2))
    sqlite_store.record(field_report(LOW_RANK, "CULLED", contribution=-0.2))
    recommender = BlueprintRecommender(sqlite_store, cost_penalty=penalty,
                                       rng=random.Random(11))
    ranked = recommender.recommend(RecommendationRequest(chunk_size=64, limit=3))
    twin = random.Random(11)
    samples = {RESIDUAL_MLP: twin.betavariate(1, 1), LOW_RANK: twin.betavariate(2, 3),
               LINEAR: twin.betavariate(1, 1)}
    expected = {bid: samples[bid] - penalty * COST_AT_64[bid] / COST_AT_64[LINEAR]
                for bid in samples}
    assert {r.blueprint.blueprint_id: r.score for r in ranked} == pytest.approx(expected)
    assert [r.blueprint.blueprint_id for r in ranked] == sorted(expected, key=expected.get,
                                                                reverse=True)


def test_overwhelming_evidence_decides_the_order(sqlite_store, field_report):
    for _ in range(40):
        sqlite_store.record(field_report(LINEAR, "FOSSILIZED", contribution=0.1))
        sqlite_store.record(field_report(LOW_RANK, "CULLED", contribution=-0.1))
    recommender = BlueprintRecommender(sqlite_store, cost_penalty=0.0, rng=random.Random(3))
    for _ in range(20):
        ranked = recommender.recommend(RecommendationRequest(
            chunk_size=64, limit=2, exclude_blueprint_ids={RESIDUAL_MLP}))
        assert [r.blueprint.blueprint_id for r in ranked] == [LINEAR, LOW_RANK]


def test_best_strategy_breaks_an_exact_tie_by_evidence_and_keeps_a_better_mean():
    def record(name, reports, successes):
        return StrategyRecord(LOW_RANK, name, reports, successes)

    # Equal posterior means, (1+3)/(2+4) == (1+1)/(2+1): the longer record wins, either order.
    assert best_strategy([record("short", 1, 1), record("long", 4, 3)]) == "long"
    assert best_strategy([record("long", 4, 3), record("short", 1, 1)]) == "long"
    # A slightly better mean wins over more evidence: 2/2 -> 0.75 vs 5/8 -> 0.6.
    assert best_strategy([record("a", 2, 2), record("b", 8, 5)]) == "a"


@pytest.mark.parametrize(("kwargs", "ok"), [
    ({"chunk_size": 0}, False), ({"chunk_size": 1}, True),
    ({"chunk_size": 4, "limit": 0}, False), ({"chunk_size": 4, "limit": 1}, True),
    ({"chunk_size": 4, "parameter_budget": -1}, False),
    ({"chunk_size": 4, "parameter_budget": 0}, True),
])
def test_request_limits(kwargs, ok):
    if ok:
        RecommendationRequest(**kwargs)
    else:
        with pytest.raises(ValueError) as error:
            RecommendationRequest(**kwargs)
        assert str(error.value) == ("chunk_size must be >= 1" if kwargs["chunk_size"] < 1 else
                                    "parameter_budget must be >= 0 and limit >= 1")


def test_cost_penalty_limits(sqlite_store):
    BlueprintRecommender(sqlite_store, cost_penalty=0.0)
    with pytest.raises(ValueError) as error:
        BlueprintRecommender(sqlite_store, cost_penalty=-1e-12)
    assert str(error.value) == "cost_penalty must be >= 0"


def test_a_one_parameter_blueprint_alone_costs_its_full_penalty(sqlite_store):
    """The largest fitting cost is the divisor (floored at 1 only for a free catalog): a lone
    1-parameter blueprint is 1.00 of the largest, so the score is sample - cost_penalty."""
    sqlite_store.register_blueprint(BlueprintSpec(
        name="scale", kind=BlueprintKind.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=10,
        min_chunk_size=1, parameter_cost=ParameterCost(constant=1)))
    recommender = BlueprintRecommender(sqlite_store, cost_penalty=1.0, rng=random.Random(0))
    request = RecommendationRequest(chunk_size=64, exclude_blueprint_ids={RESIDUAL_MLP,
                                                                          LOW_RANK, LINEAR})
    (only,) = recommender.recommend(request)
    assert only.blueprint.blueprint_id == 10
    assert only.score == random.Random(0).betavariate(1, 1) - 1.0
    assert only.rationale.endswith("1 parameters at chunk size 64 (1.00 of the largest "
                                   "fitting blueprint)")
