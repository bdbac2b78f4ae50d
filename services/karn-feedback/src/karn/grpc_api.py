"""The Karn gRPC service (kasmina.karn.v1.Karn): a thin layer over the store and recommender.

A synchronous grpcio server on its own thread pool: every call does blocking database work, which
must stay off the worker's event loop anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import grpc
import oona.service
import oona.signing
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as pb_grpc
from sqlalchemy.exc import DBAPIError

from karn import metrics
from karn.recommender import BlueprintRecommender, RecommendationRequest
from karn.store import BlueprintStatistics, FieldReportStore, is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")


def statistics_message(stat: BlueprintStatistics) -> pb.BlueprintStatistics:
    # The wire has no "unmeasured": a mean over no reports is sent as 0.
    return pb.BlueprintStatistics(
        blueprint_id=stat.blueprint_id, blueprint_name=stat.blueprint_name,
        reports=stat.reports, fossilized=stat.fossilized, culled=stat.culled,
        rolled_back=stat.rolled_back, cancelled=stat.cancelled,
        mean_contribution=stat.mean_contribution or 0.0,
        mean_metric_gain=stat.mean_metric_gain or 0.0,
        mean_parameters_added=stat.mean_parameters_added or 0.0)


class KarnServicer(pb_grpc.KarnServicer):
    def __init__(self, store: FieldReportStore, recommender: BlueprintRecommender) -> None:
        self._store = store
        self._recommender = recommender

    def ListBlueprints(self, request: pb.ListBlueprintsRequest,
                       context: grpc.ServicerContext) -> pb.ListBlueprintsResponse:
        return pb.ListBlueprintsResponse(blueprints=_database(context, self._store.blueprints))

    def GetBlueprintStatistics(self, request: pb.GetBlueprintStatisticsRequest,
                               context: grpc.ServicerContext
                               ) -> pb.GetBlueprintStatisticsResponse:
        stats = _database(context, lambda: self._store.statistics(request.blueprint_ids))
        return pb.GetBlueprintStatisticsResponse(statistics=[statistics_message(s) for s in stats])

    def Recommend(self, request: pb.RecommendRequest,
                  context: grpc.ServicerContext) -> pb.RecommendResponse:
        """Best first; an empty list means no catalog entry fits the chunk size and budget (the
        caller should not germinate), which is not an error."""
        try:
            query = RecommendationRequest(
                chunk_size=request.chunk_size, parameter_budget=request.parameter_budget,
                exclude_blueprint_ids=frozenset(request.exclude_blueprint_ids),
                limit=request.limit or 1)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        ranked = _database(context, lambda: self._recommender.recommend(query))
        if ranked:
            metrics.RECOMMENDATIONS.labels(ranked[0].blueprint.name).inc()
        return pb.RecommendResponse(recommendations=[
            pb.Recommendation(blueprint=r.blueprint, strategy_name=r.strategy_name,
                              score=r.score, rationale=r.rationale) for r in ranked])


def _database(context: grpc.ServicerContext, query: Callable[[], T]) -> T:
    """Run a store query; a database outage is UNAVAILABLE, which clients may retry."""
    try:
        return query()
    except DBAPIError as exc:
        if not is_transient(exc):
            raise
        log.warning("database error serving %s: %s", context.peer(), exc.orig)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"database unavailable: {exc.orig}")
        raise  # not reached: abort raises (grpcio has no type hints to say so)


def start_grpc_server(servicer: KarnServicer, host: str, port: int, max_workers: int = 8,
                      token: str | None = None) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the port it bound (useful when `port` is 0).
    `token`: every call must carry it (UNAUTHENTICATED otherwise); None: no check."""
    add = oona.signing.with_token(pb_grpc.add_KarnServicer_to_server, token)
    return oona.service.start_grpc_server(add, servicer, host, port, name="karn",
                                          max_workers=max_workers)
