"""Karn's tables, the database engine, and the schema migrations the service runs at start.

SQLite (a file, the default) and PostgreSQL are supported; both have the `INSERT ... ON CONFLICT
DO NOTHING` that makes storing a redelivered report a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from oona.contracts import BlueprintSpec, ParameterCost, catalog
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url

log = logging.getLogger(__name__)

metadata = MetaData()

schema_version = Table(
    "karn_schema_version", metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

blueprints = Table(
    "karn_blueprints", metadata,
    Column("blueprint_id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(128), nullable=False, unique=True),
    Column("kind", Integer, nullable=False),
    Column("hidden", Integer, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("cost_per_chunk_squared", BigInteger, nullable=False),
    Column("cost_per_chunk", BigInteger, nullable=False),
    Column("cost_constant", BigInteger, nullable=False),
    Column("min_chunk_size", Integer, nullable=False),
    Column("max_chunk_size", Integer, nullable=False),
    Column("description", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Schema v3: the rest of BlueprintSpec, as wire enum numbers and 0 for "the default".
    Column("activation", Integer, nullable=False, server_default="0"),
    Column("init", Integer, nullable=False, server_default="0"),
    Column("ramp_steps", Integer, nullable=False, server_default="0"),
    Column("seed_learning_rate", Double, nullable=False, server_default="0"),
)

# Blueprints Karn's search proposed (schema v3): where each came from. Its spec is in
# karn_blueprints under the same id; outcomes are the field reports that name that id.
blueprint_proposals = Table(
    "karn_blueprint_proposals", metadata,
    Column("blueprint_id", Integer, primary_key=True, autoincrement=False),
    Column("parent_blueprint_id", Integer, nullable=False, index=True),
    # The search that proposed it ("optuna-tpe") and its trial number in the parent's study.
    Column("proposer", String(64), nullable=False),
    Column("trial_number", Integer, nullable=False),
    # The hyper-parameters the search asked for, by name.
    Column("params", JSON, nullable=False),
    # "active" or "retired" (its outcomes stopped it being recommended).
    Column("status", String(16), nullable=False),
    Column("status_reason", Text, nullable=False),
    Column("proposed_at", DateTime(timezone=True), nullable=False),
    # When it went out on the bus; NULL until then (published at least once).
    Column("published_at", DateTime(timezone=True), nullable=True),
)

field_reports = Table(
    "karn_field_reports", metadata,
    Column("report_id", String(256), primary_key=True),
    Column("job_id", String(256), nullable=False, index=True),
    Column("layer_id", String(256), nullable=False),
    Column("seed_index", BigInteger, nullable=False),
    Column("blueprint_id", Integer, nullable=False, index=True),
    Column("blueprint_name", String(128), nullable=False),
    Column("strategy_id", Integer, nullable=False),
    Column("strategy_name", String(128), nullable=False),
    # Stage name without the SEED_STAGE_ prefix (FOSSILIZED, CULLED, ...): readable in SQL.
    Column("final_stage", String(32), nullable=False),
    Column("metric_name", String(128), nullable=False),
    Column("higher_is_better", Boolean, nullable=False),
    # Measurements are NULL when not finite (a seed rolled back for NaN outputs can report a NaN
    # metric), so averages skip them; the raw value stays in `payload`.
    Column("metric_before", Double, nullable=True),
    Column("metric_after", Double, nullable=True),
    # metric_after - metric_before, sign-flipped when lower is better: > 0 is an improvement.
    Column("metric_gain", Double, nullable=True),
    # Also NULL when the seed never reached EVALUATING, where contribution is measured.
    Column("contribution", Double, nullable=True),
    # The gain (sign-adjusted as metric_gain) the job's own trajectory before the germination
    # predicted over the seed's life (karn.store.trend_gain, schema v4); NULL when unknown.
    Column("trend_gain", Double, nullable=True),
    Column("parameters_added", BigInteger, nullable=False),
    Column("latency_cost_ms", Double, nullable=True),
    Column("memory_cost_bytes", BigInteger, nullable=False),
    Column("chunk_size", BigInteger, nullable=False),
    Column("end_reason", Text, nullable=False),
    # "chunked" or "legacy" (DESIGN §9): the rollout compares outcomes per path (schema v2).
    Column("execution_path", String(16), nullable=False, server_default="chunked"),
    Column("history", JSON, nullable=False),
    # The report as received, so a later migration can derive new columns from old reports.
    Column("payload", LargeBinary, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

SUPPORTED_BACKENDS = ("sqlite", "postgresql")


def create_database_engine(url: str) -> Engine:
    """An engine for a SQLite file or a PostgreSQL server (plain `postgresql://` uses psycopg 3,
    the driver this package installs)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"unsupported database {backend!r}; Karn runs on {SUPPORTED_BACKENDS}")
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend == "postgresql":
        # pre-ping: a connection the server dropped (restart, idle timeout) is replaced, not used.
        return create_engine(parsed, pool_pre_ping=True)
    if parsed.database in (None, "", ":memory:"):
        raise ValueError("Karn needs a SQLite *file* (e.g. sqlite:///karn.db): an in-memory "
                         "database would lose every report at exit")
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"timeout": 30})
    _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite opens transactions lazily and not before DDL, so a failed migration could leave
    # half a schema; SQLAlchemy's documented recipe hands BEGIN back to us.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: the gRPC readers never block the worker's writes. synchronous stays FULL (the
        # default) because a report is acknowledged on the bus as soon as its commit returns.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Migrations take the write lock up front: a deferred transaction that reads and then
        # writes fails at once (SQLITE_BUSY) when another process writes, instead of waiting.
        immediate = connection.get_execution_options().get("sqlite_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _now() -> datetime:
    return datetime.now(UTC)


def spec_row(spec: BlueprintSpec) -> dict[str, Any]:
    """A `BlueprintSpec` as a row of karn_blueprints, as given (the built-in entries and the
    search's proposals come with their costs derived: `oona.contracts.with_cost`)."""
    cost = spec.parameter_cost
    return {"blueprint_id": spec.blueprint_id, "name": spec.name, "kind": spec.kind,
            "hidden": spec.hidden, "rank": spec.rank,
            "cost_per_chunk_squared": cost.per_chunk_squared, "cost_per_chunk": cost.per_chunk,
            "cost_constant": cost.constant, "min_chunk_size": spec.min_chunk_size,
            "max_chunk_size": spec.max_chunk_size, "description": spec.description,
            "activation": spec.activation, "init": spec.init, "ramp_steps": spec.ramp_steps,
            "seed_learning_rate": spec.seed_learning_rate, "updated_at": _now()}


def spec_from_row(row: Any) -> BlueprintSpec:
    return BlueprintSpec(
        name=row.name, kind=row.kind, blueprint_id=row.blueprint_id, hidden=row.hidden,
        rank=row.rank, min_chunk_size=row.min_chunk_size, max_chunk_size=row.max_chunk_size,
        description=row.description, activation=row.activation, init=row.init,
        ramp_steps=row.ramp_steps, seed_learning_rate=row.seed_learning_rate,
        parameter_cost=ParameterCost(per_chunk_squared=row.cost_per_chunk_squared,
                                     per_chunk=row.cost_per_chunk, constant=row.cost_constant))


# ---------------------------------------------------------------- migrations
# Frozen snapshots: each migration writes the schema and rows as they were when it shipped,
# never the live tables above or the live catalog, so a database migrated today gets what one
# migrated then got. What the live code adds since is a later migration.

def _v1_create_tables(connection: Connection) -> None:
    v1 = MetaData()
    Table("karn_blueprints", v1,
          Column("blueprint_id", Integer, primary_key=True, autoincrement=False),
          Column("name", String(128), nullable=False, unique=True),
          Column("kind", Integer, nullable=False),
          Column("hidden", Integer, nullable=False),
          Column("rank", Integer, nullable=False),
          Column("cost_per_chunk_squared", BigInteger, nullable=False),
          Column("cost_per_chunk", BigInteger, nullable=False),
          Column("cost_constant", BigInteger, nullable=False),
          Column("min_chunk_size", Integer, nullable=False),
          Column("max_chunk_size", Integer, nullable=False),
          Column("description", Text, nullable=False),
          Column("updated_at", DateTime(timezone=True), nullable=False))
    Table("karn_field_reports", v1,
          Column("report_id", String(256), primary_key=True),
          Column("job_id", String(256), nullable=False, index=True),
          Column("layer_id", String(256), nullable=False),
          Column("seed_index", BigInteger, nullable=False),
          Column("blueprint_id", Integer, nullable=False, index=True),
          Column("blueprint_name", String(128), nullable=False),
          Column("strategy_id", Integer, nullable=False),
          Column("strategy_name", String(128), nullable=False),
          Column("final_stage", String(32), nullable=False),
          Column("metric_name", String(128), nullable=False),
          Column("higher_is_better", Boolean, nullable=False),
          Column("metric_before", Double, nullable=True),
          Column("metric_after", Double, nullable=True),
          Column("metric_gain", Double, nullable=True),
          Column("contribution", Double, nullable=True),
          Column("parameters_added", BigInteger, nullable=False),
          Column("latency_cost_ms", Double, nullable=True),
          Column("memory_cost_bytes", BigInteger, nullable=False),
          Column("chunk_size", BigInteger, nullable=False),
          Column("end_reason", Text, nullable=False),
          Column("history", JSON, nullable=False),
          Column("payload", LargeBinary, nullable=False),
          Column("received_at", DateTime(timezone=True), nullable=False))
    v1.create_all(connection)
    # The catalog v1 shipped (kind 1 residual_mlp, 2 low_rank, 3 linear). The catalog of today
    # is upserted after the migrations (`upsert_builtin_catalog`).
    now = _now()
    connection.execute(v1.tables["karn_blueprints"].insert(), [
        {"blueprint_id": 1, "name": "residual_mlp", "kind": 1, "hidden": 16, "rank": 0,
         "cost_per_chunk_squared": 0, "cost_per_chunk": 33, "cost_constant": 16,
         "min_chunk_size": 1, "max_chunk_size": 0, "updated_at": now,
         "description": "x + W2 gelu(W1 x + b1) + b2, hidden width 16"},
        {"blueprint_id": 2, "name": "low_rank", "kind": 2, "hidden": 0, "rank": 4,
         "cost_per_chunk_squared": 0, "cost_per_chunk": 8, "cost_constant": 0,
         "min_chunk_size": 5, "max_chunk_size": 0, "updated_at": now,
         "description": "x + B A x, rank 4"},
        {"blueprint_id": 3, "name": "linear", "kind": 3, "hidden": 0, "rank": 0,
         "cost_per_chunk_squared": 1, "cost_per_chunk": 1, "cost_constant": 0,
         "min_chunk_size": 1, "max_chunk_size": 256, "updated_at": now,
         "description": "W x + b over the chunk"}])


def _v2_execution_path(connection: Connection) -> None:
    """The execution path of each report; older reports were all chunked."""
    if "execution_path" not in {c["name"] for c in inspect(connection).get_columns(
            "karn_field_reports")}:  # a database v1 created before the column existed
        connection.execute(text("ALTER TABLE karn_field_reports ADD COLUMN execution_path "
                                "VARCHAR(16) NOT NULL DEFAULT 'chunked'"))


def _v3_blueprint_specs_and_proposals(connection: Connection) -> None:
    """The rest of BlueprintSpec in karn_blueprints, and the search's proposals. (Each step
    only where missing, as v2: a test rebuilds an older shape by hand from a newer database.)"""
    present = {c["name"] for c in inspect(connection).get_columns("karn_blueprints")}
    for column, sql_type in (("activation", "INTEGER"), ("init", "INTEGER"),
                             ("ramp_steps", "INTEGER"),
                             ("seed_learning_rate", "DOUBLE PRECISION")):
        if column not in present:
            connection.execute(text(f"ALTER TABLE karn_blueprints ADD COLUMN {column} "
                                    f"{sql_type} NOT NULL DEFAULT 0"))
    v3 = MetaData()
    Table("karn_blueprint_proposals", v3,
          Column("blueprint_id", Integer, primary_key=True, autoincrement=False),
          Column("parent_blueprint_id", Integer, nullable=False, index=True),
          Column("proposer", String(64), nullable=False),
          Column("trial_number", Integer, nullable=False),
          Column("params", JSON, nullable=False),
          Column("status", String(16), nullable=False),
          Column("status_reason", Text, nullable=False),
          Column("proposed_at", DateTime(timezone=True), nullable=False),
          Column("published_at", DateTime(timezone=True), nullable=True))
    v3.create_all(connection)


def _v4_trend_gain(connection: Connection) -> None:
    """The job's predicted gain beside each report's own (FieldReport.metric_history); reports
    from before it carry no history: NULL."""
    if "trend_gain" not in {c["name"] for c in inspect(connection).get_columns(
            "karn_field_reports")}:
        connection.execute(text("ALTER TABLE karn_field_reports ADD COLUMN trend_gain "
                                "DOUBLE PRECISION"))


# Version n is MIGRATIONS[n - 1]. Append only, never edit one that has shipped: a database at
# version n has run exactly the first n. (Until v3, v1 created the tables from the live
# definitions, so v2 adds its column only where v1 ran before the column existed.)
MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1_create_tables, _v2_execution_path, _v3_blueprint_specs_and_proposals, _v4_trend_gain]
SCHEMA_VERSION = len(MIGRATIONS)
# Any constant works; it only has to be the same in every Karn process.
_PG_MIGRATION_LOCK = 0x4B61726E  # "Karn"


def migrate(engine: Engine) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction; returns the version.

    Safe when several Karn processes start at once: they serialise on an advisory lock
    (PostgreSQL) or on the database's write lock (SQLite)."""
    with engine.connect() as connection, \
            connection.execution_options(sqlite_immediate=True).begin():
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": _PG_MIGRATION_LOCK})
        schema_version.create(connection, checkfirst=True)
        current = connection.execute(select(schema_version.c.version)
                                     .order_by(schema_version.c.version.desc())).scalar() or 0
        if current > SCHEMA_VERSION:
            raise RuntimeError(f"database schema is at version {current}, newer than this Karn "
                               f"({SCHEMA_VERSION}): upgrade Karn")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version - 1](connection)
            connection.execute(schema_version.insert(), {"version": version, "applied_at": _now()})
            log.info("database migrated to schema version %d", version)
        upsert_builtin_catalog(connection)
    return SCHEMA_VERSION


def upsert_builtin_catalog(connection: Connection) -> None:
    """Every entry of the contracts' built-in catalog (oona.contracts.catalog()) into
    karn_blueprints, inserted or brought up to date by id, at every start: a database made by an
    older Karn sees the entries added since. An entry whose name another id holds (an
    operator's) is left out, with a warning."""
    rows = {row.blueprint_id: row for row in connection.execute(
        select(blueprints.c.blueprint_id, blueprints.c.name))}
    names = {row.name: bid for bid, row in rows.items()}
    for spec in catalog():
        values = spec_row(spec)
        if names.get(spec.name, spec.blueprint_id) != spec.blueprint_id:
            log.warning("built-in blueprint %s (id %d) not added: id %d has its name",
                        spec.name, spec.blueprint_id, names[spec.name])
        elif spec.blueprint_id in rows:
            connection.execute(blueprints.update()
                               .where(blueprints.c.blueprint_id == spec.blueprint_id)
                               .values({k: v for k, v in values.items() if k != "blueprint_id"}))
        else:
            connection.execute(blueprints.insert(), values)
