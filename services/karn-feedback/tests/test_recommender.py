"""The bandit recommender on a real store: fit constraints, cost, and learning from outcomes."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from karn.catalog import builtin_catalog, fits, parameter_count
from karn.recommender import BlueprintRecommender, RecommendationRequest, best_strategy
from karn.store import FieldReportStore, StrategyRecord

RESIDUAL_MLP, LOW_RANK, LINEAR = 1, 2, 3


def _ids(recommendations) -> list[int]:
    return [r.blueprint.blueprint_id for r in recommendations]


@pytest.mark.parametrize(("chunk_size", "expected"), [
    (1, {RESIDUAL_MLP, LINEAR}),  # low_rank needs chunks of 5 or more
    (4, {RESIDUAL_MLP, LINEAR}),
    (5, {RESIDUAL_MLP, LOW_RANK, LINEAR}),
    (256, {RESIDUAL_MLP, LOW_RANK, LINEAR}),
    (257, {RESIDUAL_MLP, LOW_RANK}),  # linear stops at 256
])
def test_only_blueprints_that_fit_the_chunk_are_recommended(store, chunk_size, expected):
    recommender = BlueprintRecommender(store, cost_penalty=0.1, rng=random.Random(0))
    ranked = recommender.recommend(RecommendationRequest(chunk_size=chunk_size, limit=10))
    assert set(_ids(ranked)) == expected
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)


@given(chunk_size=st.integers(1, 2000), budget=st.integers(0, 100_000),
       exclude=st.sets(st.sampled_from([RESIDUAL_MLP, LOW_RANK, LINEAR])),
       limit=st.integers(1, 4))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_recommendations_respect_fit_budget_exclusions_and_limit(store, chunk_size, budget,
                                                                 exclude, limit):
    recommender = BlueprintRecommender(store, cost_penalty=0.1, rng=random.Random(0))
    request = RecommendationRequest(chunk_size=chunk_size, parameter_budget=budget,
                                    exclude_blueprint_ids=exclude, limit=limit)
    allowed = {spec.blueprint_id for spec in builtin_catalog()
               if fits(spec, chunk_size) and spec.blueprint_id not in exclude
               and (budget == 0 or parameter_count(spec, chunk_size) <= budget)}
    ranked = recommender.recommend(request)
    assert len(ranked) == min(limit, len(allowed))
    assert set(_ids(ranked)) <= allowed


def test_between_equally_rewarded_blueprints_the_cheapest_fitting_one_wins(store, field_report):
    # At chunk 64: low_rank 512, residual_mlp 2128, linear 4160 parameters. 100 full rewards each
    # put every sample within ~0.01 of 0.99; a penalty of 0.1 divides them by 1.012, 1.051, 1.1.
    for _ in range(100):
        for blueprint in (LOW_RANK, RESIDUAL_MLP, LINEAR):
            store.record(field_report(blueprint, "FOSSILIZED", contribution=0.1))
    recommender = BlueprintRecommender(store, cost_penalty=0.1, rng=random.Random(0))
    for _ in range(20):
        ranked = recommender.recommend(RecommendationRequest(chunk_size=64, limit=3))
        assert _ids(ranked) == [LOW_RANK, RESIDUAL_MLP, LINEAR]


def test_a_seeded_recommender_is_reproducible(store):
    runs = []
    for _ in range(2):
        recommender = BlueprintRecommender(store, cost_penalty=0.1, rng=random.Random(42))
        runs.append([_ids(recommender.recommend(RecommendationRequest(chunk_size=64, limit=3)))
                     for _ in range(10)])
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 1, "no exploration at all with no reports"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_blueprint_that_always_fails_is_chosen_less_and_less(sqlite_url, field_report, seed):
    """A simulated fleet: each round Karn recommends, the seed runs, its report comes back.
    linear always gets culled; the others succeed 60% / 50% of the time."""
    store = FieldReportStore.open(sqlite_url)
    recommender = BlueprintRecommender(store, cost_penalty=0.0, rng=random.Random(seed))
    world = random.Random(1000 + seed)
    success_rate = {RESIDUAL_MLP: 0.6, LOW_RANK: 0.5, LINEAR: 0.0}
    chosen: list[int] = []
    for _ in range(160):
        (pick,) = _ids(recommender.recommend(RecommendationRequest(chunk_size=64)))
        chosen.append(pick)
        if world.random() < success_rate[pick]:
            store.record(field_report(pick, "FOSSILIZED", contribution=0.01))
        else:
            store.record(field_report(pick, "CULLED", contribution=-0.01))
    first, second = chosen[:80].count(LINEAR), chosen[80:].count(LINEAR)
    assert first > second
    # Posterior Beta(1, 1 + failures): after ~10 failures it wins a round only by rare chance.
    assert second <= 3, (first, second)
    store.close()


def test_the_recommendation_carries_the_best_strategy_for_its_blueprint(store, field_report):
    for strategy, outcome in [("fixed_ramp", "CULLED"), ("fixed_ramp", "CULLED"),
                              ("drift_controlled", "FOSSILIZED")]:
        store.record(field_report(LOW_RANK, outcome,
                                  contribution=0.1 if outcome == "FOSSILIZED" else -0.1,
                                  strategy_name=strategy))
    recommender = BlueprintRecommender(store, cost_penalty=1000.0, rng=random.Random(0))
    ranked = recommender.recommend(RecommendationRequest(chunk_size=64, limit=3))
    assert ranked[0].blueprint.blueprint_id == LOW_RANK
    assert ranked[0].strategy_name == "drift_controlled"
    assert "rewards summing to 1.00 over 3 reports" in ranked[0].rationale
    assert ranked[1].strategy_name == ""  # residual_mlp: no reports, no opinion


def test_best_strategy_prefers_the_better_record_then_the_longer_one():
    def record(name: str, reports: int, successes: int) -> StrategyRecord:
        return StrategyRecord(1, name, reports, successes)

    assert best_strategy([]) == ""
    assert best_strategy([record("a", 10, 2), record("b", 10, 8)]) == "b"
    # Same posterior mean (0.5): more evidence wins.
    assert best_strategy([record("a", 2, 1), record("b", 8, 4)]) == "b"


def test_nothing_fits_gives_no_recommendation(store):
    recommender = BlueprintRecommender(store, cost_penalty=0.1)
    request = RecommendationRequest(chunk_size=300, exclude_blueprint_ids={RESIDUAL_MLP},
                                    parameter_budget=100)
    assert recommender.recommend(request) == []


@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"chunk_size": 4, "limit": 0},
                                    {"chunk_size": 4, "parameter_budget": -1}])
def test_invalid_requests_are_refused(kwargs):
    with pytest.raises(ValueError):
        RecommendationRequest(**kwargs)
