"""The recommender at the edges (DESIGN §6: a bandit over outcomes, the catalog's cost taken into
account): the parameter budget at, one below and one above a blueprint's cost; the reward
(FOSSILIZED with a contribution > 0, exactly 0 is not; then the smaller of the contribution and
the gain beyond the job's trajectory, relative to the metric, clipped to [0, 1]); the score
formula; the limits of its arguments. Costs at chunk 64 from the catalog's formulas: low_rank
2*4*64 = 512, residual_mlp (2*16+1)*64 + 16 = 2128, linear 64*64 + 64 = 4160."""

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
from karn.store import FieldReportStore, StrategyRecord, trend_gain
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


@pytest.mark.parametrize(("outcome", "contribution", "reward"), [
    # The default metrics rise from 0.001 to 1.0: the contribution is the smaller, / 0.001.
    ("FOSSILIZED", 1e-9, 1e-6), ("FOSSILIZED", 0.5, 1.0),
    ("FOSSILIZED", 0.0, 0.0), ("FOSSILIZED", -1e-9, 0.0), ("FOSSILIZED", math.nan, 0.0),
    ("CULLED", 0.5, 0.0), ("ROLLED_BACK", 0.5, 0.0), ("CANCELLED", 0.5, 0.0),
])
def test_a_reward_needs_a_fossilized_seed_with_a_positive_contribution(sqlite_store, field_report,
                                                                       outcome, contribution,
                                                                       reward):
    sqlite_store.record(field_report(LOW_RANK, outcome, contribution=contribution))
    (stat,) = sqlite_store.statistics([LOW_RANK])
    assert stat.reports == 1 and stat.successes == pytest.approx(reward)
    assert (stat.successes > 0) == (reward > 0)
    recommender = BlueprintRecommender(sqlite_store, cost_penalty=0.0, rng=random.Random(0))
    (rec,) = recommender.recommend(RecommendationRequest(
        chunk_size=64, exclude_blueprint_ids={RESIDUAL_MLP, LINEAR}))
    assert f"rewards summing to {reward:.2f} over 1 reports" in rec.rationale


# A loss on the trajectory m(t) = 0.3 + 2 / t before germination at epoch 10 (history: epochs
# 1..10, m(10) = 0.5); the seed ends at epoch 20, where the trend predicts m(20) = 0.4: +0.1.
TRAJECTORY = tuple(0.3 + 2 / t for t in range(1, 11))


def _on_trajectory(field_report, after: float, history=TRAJECTORY, **kwargs):
    report = field_report(LOW_RANK, "FOSSILIZED", contribution=0.1, metric_before=0.5,
                          metric_after=after, higher_is_better=False, metric_history=history,
                          **kwargs)
    report.history[0].entered_epoch, report.history[-1].entered_epoch = 10, 20
    return report


@pytest.mark.parametrize(("before", "after", "higher_is_better", "reward"), [
    (0.5, 0.6, True, 0.2), (0.5, 0.5, True, 0.0), (0.5, 0.4, True, 0.0),  # no gain: 0
    (0.5, 1.0, True, 1.0), (0.5, 1.5, True, 1.0),  # clipped at 1
    (2.0, 1.5, False, 0.25), (2.0, 2.5, False, 0.0),  # a loss: falling is the gain
    (-0.5, -0.4, True, 0.2),  # relative to the metric's size
    (0.0, 0.5, True, 0.0),  # no size to be relative to
])
def test_the_reward_is_the_gain_relative_to_the_metric_clipped(sqlite_store, field_report,
                                                                before, after, higher_is_better,
                                                                reward):
    sqlite_store.record(field_report(LOW_RANK, "FOSSILIZED", contribution=10.0,  # not the bound
                                     metric_before=before, metric_after=after,
                                     higher_is_better=higher_is_better))
    (stat,) = sqlite_store.statistics([LOW_RANK])
    assert stat.successes == pytest.approx(reward)


@pytest.mark.parametrize(("contribution", "reward"), [
    (0.1, 0.2),  # removing it cost 0.1, the job gained 0.5: the seed added at most 0.1
    (0.5, 1.0), (0.6, 1.0),  # then the gain is the smaller
])
def test_the_reward_is_the_smaller_of_contribution_and_gain(sqlite_store, field_report,
                                                             contribution, reward):
    sqlite_store.record(field_report(LOW_RANK, "FOSSILIZED", contribution=contribution,
                                     metric_before=0.5, metric_after=1.0))
    (stat,) = sqlite_store.statistics([LOW_RANK])
    assert stat.successes == pytest.approx(reward)


@pytest.mark.parametrize(("after", "reward"), [
    (0.3, 0.2),  # gained 0.2, the trend 0.1: 0.1 of 0.5 is the seed's
    (0.4, 0.0),  # exactly the trend: nothing added
    (0.45, 0.0),  # less than the trend
])
def test_the_gain_the_jobs_trajectory_predicts_is_not_the_seeds(sqlite_store, field_report,
                                                                 after, reward):
    report = _on_trajectory(field_report, after)
    assert trend_gain(report) == pytest.approx(0.1)
    sqlite_store.record(report)
    (stat,) = sqlite_store.statistics([LOW_RANK])
    assert stat.successes == pytest.approx(reward)


def test_the_trend_is_fitted_on_the_later_half_and_needs_four_points(field_report):
    # The first half off the curve changes nothing; a NaN boundary is left out.
    early = (9.0, float("nan"), 9.0, 9.0, 9.0)
    assert trend_gain(_on_trajectory(field_report, 0.3, early + TRAJECTORY[5:])) == \
        pytest.approx(0.1)
    short = _on_trajectory(field_report, 0.3, TRAJECTORY[-7:])  # later half: 4 points
    assert trend_gain(short) == pytest.approx(0.1)
    assert trend_gain(_on_trajectory(field_report, 0.3, TRAJECTORY[-6:])) is None  # 3 points
    assert trend_gain(_on_trajectory(field_report, 0.3, ())) is None
    # Without a trend the whole gain is the seed's: 0.2 of 0.5.
    assert trend_gain(field_report(LOW_RANK, "FOSSILIZED")) is None


def test_posterior_mean_is_beta_one_plus_successes_one_plus_failures():
    assert posterior_mean(0, 0) == 0.5
    assert posterior_mean(1, 1) == 2 / 3
    assert posterior_mean(0, 2) == 0.25
    assert posterior_mean(3, 3) == 0.8


@pytest.mark.parametrize("penalty", [0.0, 0.25, 3.0])
def test_score_is_the_beta_sample_over_one_plus_penalty_times_relative_cost(sqlite_store,
                                                                            field_report, penalty):
    """Worked out by hand with the same random stream: candidates are sampled in blueprint-id
    order (the catalog's), Beta(1 + s, 1 + n - s) each, divided by 1 + penalty * cost / largest
    cost."""
    sqlite_store.record(field_report(LOW_RANK, "FOSSILIZED", contribution=0.2))
    sqlite_store.record(field_report(LOW_RANK, "CULLED", contribution=-0.2))
    sqlite_store.record(field_report(LOW_RANK, "CULLED", contribution=-0.2))
    recommender = BlueprintRecommender(sqlite_store, cost_penalty=penalty,
                                       rng=random.Random(11))
    ranked = recommender.recommend(RecommendationRequest(chunk_size=64, limit=3))
    twin = random.Random(11)
    samples = {RESIDUAL_MLP: twin.betavariate(1, 1), LOW_RANK: twin.betavariate(2, 3),
               LINEAR: twin.betavariate(1, 1)}
    expected = {bid: samples[bid] / (1 + penalty * COST_AT_64[bid] / COST_AT_64[LINEAR])
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
    1-parameter blueprint is 1.00 of the largest, so the score is sample / (1 + cost_penalty)."""
    sqlite_store.register_blueprint(BlueprintSpec(
        name="scale", kind=BlueprintKind.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=10,
        min_chunk_size=1, parameter_cost=ParameterCost(constant=1)))
    recommender = BlueprintRecommender(sqlite_store, cost_penalty=1.0, rng=random.Random(0))
    request = RecommendationRequest(chunk_size=64, exclude_blueprint_ids={RESIDUAL_MLP,
                                                                          LOW_RANK, LINEAR})
    (only,) = recommender.recommend(request)
    assert only.blueprint.blueprint_id == 10
    assert only.score == random.Random(0).betavariate(1, 1) / 2.0
    assert only.rationale.endswith("1 parameters at chunk size 64 (1.00 of the largest "
                                   "fitting blueprint)")
