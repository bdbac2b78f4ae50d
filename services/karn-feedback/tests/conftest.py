"""Fixtures: a real database (a SQLite file; also PostgreSQL when KARN_TEST_DATABASE_URL is set,
each test in a schema of its own), a store on it, field reports, and a real Redis from oona's
pytest plugin (`oona_redis_url`).

Tests that need the event loop call `asyncio.run` themselves, as oona's do.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from karn.store import FieldReportStore
from oona.contracts import FieldReport, SeedStage, StageVisit
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_URL_VAR = "KARN_TEST_DATABASE_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'karn.db'}"
        return
    server = os.environ.get(PG_URL_VAR)
    if not server:
        pytest.skip(f"PostgreSQL: set {PG_URL_VAR}=postgresql+psycopg://user@host:5432/db")
    schema = f"karn_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(server).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """For fault tests that take the database away, which only a file lets a test do."""
    return f"sqlite:///{tmp_path / 'data' / 'karn.db'}"


@pytest.fixture
def store(database_url: str) -> Iterator[FieldReportStore]:
    opened = FieldReportStore.open(database_url)
    yield opened
    opened.close()


@pytest.fixture
def database_outage() -> Callable[[FieldReportStore], AbstractContextManager[None]]:
    """`with database_outage(store): ...`: the SQLite file's directory is moved away and the
    pooled connections closed, so every database call fails as an unreachable server would;
    everything is put back on exit."""

    @contextmanager
    def outage(store: FieldReportStore) -> Iterator[None]:
        database = store.engine.url.database
        assert database, "needs a SQLite file store"
        directory = Path(database).parent
        hidden = directory.with_name(directory.name + ".away")
        store.engine.dispose()
        shutil.move(directory, hidden)
        try:
            yield
        finally:
            store.engine.dispose()
            shutil.move(hidden, directory)

    return outage


STAGES = {name: SeedStage.Value(f"SEED_STAGE_{name}") for name in
          ("GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING",
           "FOSSILIZED", "CULLED", "CANCELLED", "ROLLED_BACK")}


def _field_report(blueprint_id: int = 1, outcome: str = "FOSSILIZED", *,
                  contribution: float = 0.0, report_id: str | None = None,
                  strategy_name: str = "fixed_ramp", metric_before: float = 0.001,
                  metric_after: float = 1.0, higher_is_better: bool = True,
                  parameters_added: int = 100, latency_cost_ms: float = 0.1,
                  reached_evaluating: bool | None = None, chunk_size: int = 16,
                  execution_path: str = "", metric_history: tuple[float, ...] = ()
                  ) -> FieldReport:
    """A field report as Kasmina sends one. The history ends in `outcome` and passes through
    EVALUATING when `reached_evaluating` (default: for FOSSILIZED and CULLED seeds). The
    default metrics rise from 0.001 to 1.0 with no trajectory before: a fossilized report with
    a contribution of 0.001 or more earns the whole reward, 1 (karn.store `_reward`)."""
    if reached_evaluating is None:
        reached_evaluating = outcome in ("FOSSILIZED", "CULLED")
    path = ["GERMINATED", "TRAINING"]
    if reached_evaluating:
        path += ["GRAFTING", "STABILIZATION", "EVALUATING"]
    history = [StageVisit(stage=STAGES[s], entered_epoch=i, epochs=1)
               for i, s in enumerate([*path, outcome])]
    names = {1: "residual_mlp", 2: "low_rank", 3: "linear"}
    return FieldReport(
        report_id=report_id or uuid.uuid4().hex, job_id="job-1", layer_id="layers.0",
        seed_index=3, blueprint_id=blueprint_id,
        blueprint_name=names.get(blueprint_id, f"bp{blueprint_id}"), strategy_id=0,
        strategy_name=strategy_name, final_stage=STAGES[outcome], history=history,
        metric_name="val_accuracy", higher_is_better=higher_is_better,
        metric_before=metric_before, metric_after=metric_after, contribution=contribution,
        parameters_added=parameters_added, latency_cost_ms=latency_cost_ms,
        chunk_size=chunk_size, end_reason="test", execution_path=execution_path,
        metric_history=metric_history)


@pytest.fixture
def field_report() -> Callable[..., FieldReport]:
    """`field_report(blueprint_id, outcome, contribution=..., ...)` -> a FieldReport."""
    return _field_report
