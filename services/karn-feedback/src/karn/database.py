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

from oona.contracts import BlueprintSpec, ParameterCost
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

from karn.catalog import builtin_catalog

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


def _v1_create_tables(connection: Connection) -> None:
    metadata.create_all(connection, tables=[blueprints, field_reports])
    connection.execute(blueprints.insert(), [spec_row(spec) for spec in builtin_catalog()])


def spec_row(spec: BlueprintSpec) -> dict[str, Any]:
    """A `BlueprintSpec` as a row of karn_blueprints."""
    cost = spec.parameter_cost
    return {"blueprint_id": spec.blueprint_id, "name": spec.name, "kind": spec.kind,
            "hidden": spec.hidden, "rank": spec.rank,
            "cost_per_chunk_squared": cost.per_chunk_squared, "cost_per_chunk": cost.per_chunk,
            "cost_constant": cost.constant, "min_chunk_size": spec.min_chunk_size,
            "max_chunk_size": spec.max_chunk_size, "description": spec.description,
            "updated_at": _now()}


def spec_from_row(row: Any) -> BlueprintSpec:
    return BlueprintSpec(
        name=row.name, kind=row.kind, blueprint_id=row.blueprint_id, hidden=row.hidden,
        rank=row.rank, min_chunk_size=row.min_chunk_size, max_chunk_size=row.max_chunk_size,
        description=row.description,
        parameter_cost=ParameterCost(per_chunk_squared=row.cost_per_chunk_squared,
                                     per_chunk=row.cost_per_chunk, constant=row.cost_constant))


def _v2_execution_path(connection: Connection) -> None:
    """The execution path of each report; older reports were all chunked."""
    if "execution_path" not in {c["name"] for c in inspect(connection).get_columns(
            field_reports.name)}:  # a database v1 created before the column existed
        connection.execute(text(f"ALTER TABLE {field_reports.name} ADD COLUMN execution_path "
                                f"VARCHAR(16) NOT NULL DEFAULT 'chunked'"))


# Version n is MIGRATIONS[n - 1]. Append only, never edit one that has shipped: a database at
# version n has run exactly the first n. (v1 creates the tables as they are defined above, so a
# later migration that adds a column adds it only where v1 ran before the column existed.)
MIGRATIONS: list[Callable[[Connection], None]] = [_v1_create_tables, _v2_execution_path]
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
    return SCHEMA_VERSION
