"""FieldReportStore: field reports stored once each, the blueprint catalog, per-blueprint
statistics. Synchronous and bus-agnostic: the worker and the gRPC layer call it from threads."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from oona.contracts import BlueprintSpec, FieldReport, SeedStage
from sqlalchemy import Engine, Table, case, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError

from karn.database import (
    SUPPORTED_BACKENDS,
    blueprint_proposals,
    blueprints,
    create_database_engine,
    field_reports,
    migrate,
    spec_from_row,
    spec_row,
)

log = logging.getLogger(__name__)

OUTCOMES = ("FOSSILIZED", "CULLED", "ROLLED_BACK", "CANCELLED")
_STAGE_PREFIX = "SEED_STAGE_"


def is_transient(exc: DBAPIError) -> bool:
    """Database errors that waiting can cure: server down or restarting, connection dropped,
    SQLite busy. Anything else (a constraint, a type error) is a bug that retrying won't fix."""
    return isinstance(exc, OperationalError) or exc.connection_invalidated


def stage_name(wire_stage: int) -> str:
    """FOSSILIZED for SEED_STAGE_FOSSILIZED; a stage from a newer contract keeps its number."""
    try:
        name: str = SeedStage.Name(wire_stage)
    except ValueError:
        return f"STAGE_{wire_stage}"
    return name.removeprefix(_STAGE_PREFIX)


@dataclass(frozen=True)
class BlueprintStatistics:
    """What the field reports say about one blueprint. `successes` is the reward the
    recommender and the search learn from (`_reward`), summed over the reports: each report's
    reward is in [0, 1], a fractional success."""

    blueprint_id: int
    blueprint_name: str
    reports: int = 0
    fossilized: int = 0
    culled: int = 0
    rolled_back: int = 0
    cancelled: int = 0
    successes: float = 0.0
    # None when no report measured it (contribution: no seed reached EVALUATING).
    mean_contribution: float | None = None
    mean_metric_gain: float | None = None
    mean_parameters_added: float | None = None
    mean_latency_cost_ms: float | None = None

    @property
    def success_rate(self) -> float:
        return self.successes / self.reports if self.reports else 0.0


# The execution paths of DESIGN §9, and the end reason Kasmina gives the chunked seeds a switch
# to legacy rolls back (kasmina.dual): the rollout's own rollbacks, not the seeds' failures.
PATHS = ("legacy", "chunked")
PATH_SWITCH_REASON = "execution path switched to"


@dataclass(frozen=True)
class PathOutcomes:
    """One execution path's seeds in Karn: `reports` (adaptations ended), `rolled_back` (ended
    ROLLED_BACK, for any reason), `failures` (ROLLED_BACK by a safety rule: non-finite values,
    drift, gradient norm; not by a path switch), `jobs` (jobs whose latest report is on it)."""

    reports: int = 0
    rolled_back: int = 0
    failures: int = 0
    jobs: int = 0


@dataclass(frozen=True)
class StrategyRecord:
    """Outcomes of one grafting strategy with one blueprint."""

    blueprint_id: int
    strategy_name: str
    reports: int
    successes: float  # the reward summed, as BlueprintStatistics.successes


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# The job's trajectory before a germination is extrapolated from the later half of the epochs
# it had run (at most FieldReport.metric_history's 64), as m(t) = a + b / t (t: epochs done),
# from no fewer points than this. Measured on `make run`'s host-alone digits jobs (3 runs of 5
# seeds, 165 windows: germination at epochs 18-48, 23 epochs on, as its seeds live): predicted
# their validation-loss gain with bias -0.003, sd 0.028 (the seeded jobs gained +0.05 to +0.25
# over the same spans); a + b log t over-predicted it by 0.037, a + b / sqrt(t) by 0.014.
_TREND_POINTS = 4


def trend_gain(report: FieldReport) -> float | None:
    """The gain (sign-adjusted: > 0 is an improvement) the job's own trajectory before the
    germination predicts over the seed's life, from its metric_history; None when the report
    has too little history (then the whole gain counts as the seed's)."""
    if not report.history:
        return None
    germinated, ended = report.history[0].entered_epoch, report.history[-1].entered_epoch
    epochs = range(germinated - len(report.metric_history) + 1, germinated + 1)
    points = [(t, m) for t, m in zip(epochs, report.metric_history, strict=True)
              if t >= 1 and math.isfinite(m)]
    points = points[len(points) // 2:]
    if len(points) < _TREND_POINTS or ended <= germinated:
        return None
    x = [1.0 / t for t, _ in points]
    y = [m for _, m in points]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((v - mx) ** 2 for v in x)
    if sxx == 0:
        return None
    b = sum((u - mx) * (v - my) for u, v in zip(x, y, strict=True)) / sxx
    change = b * (1.0 / ended - 1.0 / germinated)  # m(ended) - m(germinated)
    return _finite(change if report.higher_is_better else -change)


def report_row(report: FieldReport, received_at: datetime) -> dict[str, Any]:
    final_stage = stage_name(report.final_stage)
    visited = {visit.stage for visit in report.history}
    # Contribution is measured while EVALUATING (DESIGN §3.2); proto3 cannot say "unset", so a
    # seed that ended before that stage carries a meaningless 0 that must not drag the mean.
    measured = (final_stage == "FOSSILIZED"
                or SeedStage.SEED_STAGE_EVALUATING in visited)
    gain = _finite(report.metric_after - report.metric_before)
    return {
        "report_id": report.report_id, "job_id": report.job_id, "layer_id": report.layer_id,
        "seed_index": report.seed_index, "blueprint_id": report.blueprint_id,
        "blueprint_name": report.blueprint_name, "strategy_id": report.strategy_id,
        "strategy_name": report.strategy_name, "final_stage": final_stage,
        "metric_name": report.metric_name, "higher_is_better": report.higher_is_better,
        "metric_before": _finite(report.metric_before),
        "metric_after": _finite(report.metric_after),
        "metric_gain": gain if gain is None or report.higher_is_better else -gain,
        "trend_gain": trend_gain(report),
        "contribution": _finite(report.contribution) if measured else None,
        "parameters_added": report.parameters_added,
        "latency_cost_ms": _finite(report.latency_cost_ms),
        "memory_cost_bytes": report.memory_cost_bytes, "chunk_size": report.chunk_size,
        "end_reason": report.end_reason, "execution_path": report.execution_path or "chunked",
        "history": [MessageToDict(v, preserving_proto_field_name=True) for v in report.history],
        "payload": report.SerializeToString(deterministic=True), "received_at": received_at,
    }


def _reward() -> Any:
    """A report's reward, in [0, 1]: what its seed added. 0 unless the seed was fossilized and
    removing it cost the metric (contribution > 0); then the smaller of that counterfactual
    contribution and the job's gain over the seed's life beyond what the job's own trajectory
    predicted (trend_gain; none known: 0), as a fraction of the metric at germination, clipped.

    Each half bounds what the seed added from above (issue 17, `make run` on digits, 5 random
    seeds). The counterfactual overstates it by co-adaptation: low_rank seeds add no capacity
    to the linear host, yet removing one cost +0.08 validation loss (residual_mlp +0.12) and 18
    of 19 fossilized, so "fossilized with a positive contribution" preferred them, being cheaper.
    The job's gain beyond its trajectory is shared by every seed growing at the time: with only
    one blueprint per run it separated them (+0.050 low_rank, +0.082 residual_mlp), but in a run
    where Karn mixed them in the same jobs low_rank's seeds were credited residual_mlp's gains
    (rewards 0.17 low_rank vs 0.14 residual_mlp on the gain alone). The smaller of the two ranks
    residual_mlp first in both: 0.12 vs 0.10 (one blueprint per run) and 0.12 vs 0.09 (mixed).
    Not per parameter: per parameter low_rank (128 at chunk 16) would win over residual_mlp
    (544), while residual_mlp's seeds lift test accuracy 3 times as much (+0.037 vs +0.012); the
    recommender's cost penalty weighs cost instead."""
    fr = field_reports.c
    beyond = fr.metric_gain - func.coalesce(fr.trend_gain, 0.0)
    added = case((fr.contribution < beyond, fr.contribution), else_=beyond) / func.abs(
        fr.metric_before)
    counted = (fr.final_stage == "FOSSILIZED") & (fr.contribution > 0) & (
        func.abs(fr.metric_before) > 0) & fr.metric_gain.is_not(None)
    # (A NULL condition is not true: an unmeasured contribution or metric earns 0.)
    return case((counted, case((added <= 0, 0.0), (added >= 1, 1.0), else_=added)), else_=0.0)


def _count_where(condition: Any) -> Any:
    return func.sum(case((condition, 1), else_=0))


def _mean(value: Any) -> float | None:
    # PostgreSQL averages integers as NUMERIC (Decimal).
    return None if value is None else float(value)


class FieldReportStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        if engine.dialect.name not in SUPPORTED_BACKENDS:
            raise ValueError(f"unsupported database {engine.dialect.name!r}")
        # Both dialects' INSERT has the ON CONFLICT clauses that make storing idempotent.
        self._insert: Callable[[Table], sqlite.Insert | postgresql.Insert] = (
            sqlite.insert if engine.dialect.name == "sqlite" else postgresql.insert)

    @classmethod
    def open(cls, database_url: str) -> FieldReportStore:
        """Connect and migrate the schema to this version (creating it on a new database)."""
        engine = create_database_engine(database_url)
        try:
            migrate(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raises (sqlalchemy.exc.OperationalError) when the database cannot be reached."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def record(self, report: FieldReport) -> bool:
        """Store a report durably; returns False (storing nothing) when its report_id is already
        stored, which is what a redelivery looks like."""
        if not report.report_id:
            raise ValueError("field report without report_id")
        row = report_row(report, datetime.now(UTC))
        with self.engine.begin() as connection:
            # RETURNING rather than rowcount: psycopg 3 reports rowcount -1 for this statement.
            inserted = connection.execute(
                self._insert(field_reports).values(row)
                .on_conflict_do_nothing(index_elements=["report_id"])
                .returning(field_reports.c.report_id)).first() is not None
            if not inserted:
                stored = connection.execute(
                    select(field_reports.c.payload)
                    .where(field_reports.c.report_id == report.report_id)).scalar_one()
                if stored != row["payload"]:
                    log.warning("field report %s arrived again with different content; the "
                                "first one is kept", report.report_id)
        return inserted

    def blueprints(self) -> list[BlueprintSpec]:
        """The catalog, by blueprint id."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(blueprints).order_by(blueprints.c.blueprint_id))
            return [spec_from_row(row) for row in rows]

    def register_blueprint(self, spec: BlueprintSpec) -> None:
        """Add a catalog entry, or replace the one with the same blueprint_id."""
        if spec.blueprint_id < 1 or not spec.name:
            raise ValueError("a blueprint needs a name and an id >= 1")
        row = spec_row(spec)
        with self.engine.begin() as connection:
            connection.execute(
                self._insert(blueprints).values(row).on_conflict_do_update(
                    index_elements=["blueprint_id"],
                    set_={k: v for k, v in row.items() if k != "blueprint_id"}))

    def statistics(self, blueprint_ids: Iterable[int] = ()) -> list[BlueprintStatistics]:
        """Per-blueprint statistics, by blueprint id: every catalog entry (zero reports included)
        and every blueprint id that appears in reports; restricted to `blueprint_ids` if given."""
        wanted = set(blueprint_ids)
        fr = field_reports.c
        query = (select(fr.blueprint_id, func.max(fr.blueprint_name), func.count(),
                        *(_count_where(fr.final_stage == outcome) for outcome in OUTCOMES),
                        func.coalesce(func.sum(_reward()), 0.0), func.avg(fr.contribution),
                        func.avg(fr.metric_gain), func.avg(fr.parameters_added),
                        func.avg(fr.latency_cost_ms))
                 .group_by(fr.blueprint_id))
        if wanted:
            query = query.where(fr.blueprint_id.in_(wanted))
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
            names: dict[int, str] = {
                row.blueprint_id: row.name
                for row in connection.execute(select(blueprints.c.blueprint_id, blueprints.c.name))}
        result = {bid: BlueprintStatistics(bid, name) for bid, name in names.items()
                  if not wanted or bid in wanted}
        for (bid, reported_name, reports, fossilized, culled, rolled_back, cancelled, successes,
             contribution, gain, params, latency) in rows:
            result[bid] = BlueprintStatistics(
                blueprint_id=bid, blueprint_name=names.get(bid, reported_name), reports=reports,
                fossilized=fossilized, culled=culled, rolled_back=rolled_back,
                cancelled=cancelled, successes=float(successes),
                mean_contribution=_mean(contribution),
                mean_metric_gain=_mean(gain), mean_parameters_added=_mean(params),
                mean_latency_cost_ms=_mean(latency))
        return [result[bid] for bid in sorted(result)]

    def strategy_records(self, blueprint_ids: Sequence[int]) -> list[StrategyRecord]:
        """Outcomes per (blueprint, grafting strategy) for the given blueprints."""
        fr = field_reports.c
        query = (select(fr.blueprint_id, fr.strategy_name, func.count(),
                        func.coalesce(func.sum(_reward()), 0.0))
                 .where(fr.blueprint_id.in_(list(blueprint_ids)), fr.strategy_name != "")
                 .group_by(fr.blueprint_id, fr.strategy_name)
                 .order_by(fr.blueprint_id, fr.strategy_name))
        with self.engine.connect() as connection:
            return [StrategyRecord(bid, name, reports, float(reward))
                    for bid, name, reports, reward in connection.execute(query)]

    def gains_by_path(self, since: datetime | None = None
                      ) -> dict[str, tuple[list[float], list[float]]]:
        """Per execution path, each report's (metric gain since germination, sign-adjusted, and
        the metric before it: the rollout's outcome and its CUPED covariate), in arrival order;
        reports without a finite gain or metric before are left out, and with `since` those
        received before it (a new rollout judged on its own reports)."""
        fr = field_reports.c
        query = (select(fr.execution_path, fr.metric_gain, fr.metric_before)
                 .where(fr.metric_gain.is_not(None), fr.metric_before.is_not(None))
                 .order_by(fr.received_at, fr.report_id))
        if since is not None:
            query = query.where(fr.received_at >= since)
        out: dict[str, tuple[list[float], list[float]]] = {}
        with self.engine.connect() as connection:
            for path, gain, before in connection.execute(query):
                gains, befores = out.setdefault(path, ([], []))
                gains.append(gain)
                befores.append(before)
        return out

    def outcomes_by_path(self) -> dict[str, PathOutcomes]:
        """The migration's success metrics' counts per execution path, over every stored report
        (PathOutcomes); every path in PATHS is present."""
        fr = field_reports.c
        switched = fr.end_reason.like(f"%{PATH_SWITCH_REASON}%")
        query = (select(fr.execution_path, func.count(),
                        _count_where(fr.final_stage == "ROLLED_BACK"),
                        _count_where((fr.final_stage == "ROLLED_BACK") & ~switched))
                 .group_by(fr.execution_path))
        # Each job on the path of its latest report (a job the rollout moved counts once).
        latest = (select(fr.job_id, fr.execution_path, func.row_number().over(
                      partition_by=fr.job_id, order_by=(fr.received_at.desc(),
                                                        fr.report_id.desc())).label("newest"))
                  .subquery())
        jobs_query = (select(latest.c.execution_path, func.count())
                      .where(latest.c.newest == 1).group_by(latest.c.execution_path))
        out = {path: PathOutcomes() for path in PATHS}
        with self.engine.connect() as connection:
            for path, reports, rolled_back, failures in connection.execute(query):
                out[path] = PathOutcomes(reports, rolled_back, failures, 0)
            for path, jobs in connection.execute(jobs_query):
                out[path] = dataclasses.replace(out.get(path, PathOutcomes()), jobs=jobs)
        return out

    def report_count(self) -> int:
        with self.engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(field_reports)).scalar_one()

    def retired_blueprint_ids(self) -> set[int]:
        """Blueprints Karn's search proposed and then retired (karn.search): never recommended."""
        query = select(blueprint_proposals.c.blueprint_id).where(
            blueprint_proposals.c.status == "retired")
        with self.engine.connect() as connection:
            return set(connection.execute(query).scalars())
