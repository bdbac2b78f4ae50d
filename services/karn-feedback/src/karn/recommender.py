"""The blueprint recommender: Thompson sampling over field-report outcomes, cost-aware.

Each field report earns a reward in [0, 1], what its seed added (karn.store `_reward`: fossilized,
then the smaller of its counterfactual contribution and the job's gain beyond its own
trajectory, relative to the metric). A blueprint's mean reward has a Beta(1 + s, 1 + n - s)
posterior from its n reports whose rewards sum to s (fractional successes). A recommendation
samples every fitting blueprint's posterior, divides it by 1 + `cost_penalty` times its
parameter count relative to the largest candidate's, and ranks by that score. The penalty
divides rather than subtracts: rewards are fractions of the metric (0.04 to 0.16 per report on
make run's digits), which a penalty of 0.1 subtracted would outweigh, so the cheapest blueprint
would win whatever it added. A blueprint whose seeds keep adding nothing has its posterior
pushed towards 0 and is chosen less and less, but never exactly never: if it starts to pay,
sampling notices. Sampling rather than a deterministic index (UCB) also spreads seeds germinated
at the same epoch over blueprints while their outcomes are still unknown.

The catalog includes the blueprints Karn's search proposed (karn.search): a new proposal starts
at the Beta(1, 1) prior, so it is tried, and one the search retired is never recommended again.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Collection
from dataclasses import dataclass

from oona.contracts import BlueprintSpec

from karn.catalog import fits, parameter_count
from karn.store import BlueprintStatistics, FieldReportStore, StrategyRecord


@dataclass(frozen=True)
class Recommendation:
    blueprint: BlueprintSpec
    # The strategy with the best record for this blueprint; "" when there is none yet.
    strategy_name: str
    score: float
    rationale: str


@dataclass(frozen=True)
class RecommendationRequest:
    chunk_size: int
    # Most parameters one seed may add; 0 means no limit.
    parameter_budget: int = 0
    exclude_blueprint_ids: Collection[int] = ()
    limit: int = 1

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.parameter_budget < 0 or self.limit < 1:
            raise ValueError("parameter_budget must be >= 0 and limit >= 1")


def posterior_mean(successes: float, reports: int) -> float:
    """The mean of the Beta(1 + successes, 1 + reports - successes) posterior: the reward a
    blueprint (or a strategy) is expected to earn, as the search also reads it."""
    return (1 + successes) / (2 + reports)


def best_strategy(records: list[StrategyRecord]) -> str:
    """The strategy with the highest posterior mean; ties go to the one with more reports."""
    if not records:
        return ""
    best = max(records, key=lambda r: (posterior_mean(r.successes, r.reports), r.reports))
    return best.strategy_name


class BlueprintRecommender:
    def __init__(self, store: FieldReportStore, cost_penalty: float,
                 rng: random.Random | None = None) -> None:
        if cost_penalty < 0:
            raise ValueError("cost_penalty must be >= 0")
        self._store = store
        self.cost_penalty = cost_penalty
        self._rng = rng or random.Random()
        # random.Random is shared by the gRPC threads; sampling under a lock keeps a seeded
        # recommender reproducible call by call.
        self._rng_lock = threading.Lock()

    def candidates(self, request: RecommendationRequest) -> list[BlueprintSpec]:
        """Catalog entries that fit the chunk, the budget and the exclusions, less the search's
        retired proposals (karn.search)."""
        retired = self._store.retired_blueprint_ids()
        return [spec for spec in self._store.blueprints()
                if fits(spec, request.chunk_size)
                and spec.blueprint_id not in request.exclude_blueprint_ids
                and spec.blueprint_id not in retired
                and (request.parameter_budget == 0
                     or parameter_count(spec, request.chunk_size) <= request.parameter_budget)]

    def recommend(self, request: RecommendationRequest) -> list[Recommendation]:
        """Up to `limit` blueprints, best first; empty when nothing in the catalog fits."""
        candidates = self.candidates(request)
        if not candidates:
            return []
        ids = [spec.blueprint_id for spec in candidates]
        stats = {s.blueprint_id: s for s in self._store.statistics(ids)}
        strategies: dict[int, list[StrategyRecord]] = {}
        for record in self._store.strategy_records(ids):
            strategies.setdefault(record.blueprint_id, []).append(record)
        costs = {spec.blueprint_id: parameter_count(spec, request.chunk_size)
                 for spec in candidates}
        largest = max(max(costs.values()), 1)
        scored: list[Recommendation] = []
        with self._rng_lock:
            samples = [self._sample(stats[bid]) for bid in ids]
        for spec, sample in zip(candidates, samples, strict=True):
            stat = stats[spec.blueprint_id]
            relative_cost = costs[spec.blueprint_id] / largest
            rationale = (f"rewards summing to {stat.successes:.2f} over {stat.reports} reports "
                         f"(posterior mean {posterior_mean(stat.successes, stat.reports):.2f}); "
                         f"{costs[spec.blueprint_id]} parameters at chunk size "
                         f"{request.chunk_size} ({relative_cost:.2f} of the largest fitting "
                         f"blueprint)")
            scored.append(Recommendation(
                blueprint=spec, strategy_name=best_strategy(strategies.get(spec.blueprint_id, [])),
                score=sample / (1 + self.cost_penalty * relative_cost), rationale=rationale))
        scored.sort(key=lambda r: r.score, reverse=True)
        return scored[:request.limit]

    def _sample(self, stat: BlueprintStatistics) -> float:
        return self._rng.betavariate(1 + stat.successes, 1 + stat.reports - stat.successes)
