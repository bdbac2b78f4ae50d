"""Karn: field reports of the Kasmina fleet, blueprint statistics, blueprint recommendations.

    store = FieldReportStore.open("sqlite:///karn.db")      # creates and migrates the schema
    store.record(field_report)                               # False for a redelivered report
    recommender = BlueprintRecommender(store, cost_penalty=0.1)
    best = recommender.recommend(RecommendationRequest(chunk_size=64))[0]

`python -m karn` runs the service: the bus worker, gRPC (kasmina.karn.v1.Karn) and HTTP.
"""

from karn.catalog import builtin_catalog, fits, parameter_count
from karn.recommender import BlueprintRecommender, Recommendation, RecommendationRequest
from karn.settings import KarnSettings
from karn.store import BlueprintStatistics, FieldReportStore, StrategyRecord

__all__ = [
    "BlueprintRecommender", "BlueprintStatistics", "FieldReportStore", "KarnSettings",
    "Recommendation", "RecommendationRequest", "StrategyRecord", "builtin_catalog", "fits",
    "parameter_count",
]
