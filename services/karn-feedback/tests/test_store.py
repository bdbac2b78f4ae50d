"""The store against a real database: schema and migrations, the catalog, idempotent storage,
statistics."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime

import pytest
from karn.catalog import builtin_catalog, fits, parameter_count
from karn.database import (
    SCHEMA_VERSION,
    create_database_engine,
    field_reports,
    migrate,
    schema_version,
)
from karn.store import FieldReportStore
from oona.contracts import BlueprintKind, BlueprintSpec, ParameterCost
from sqlalchemy import func, select, text


def test_a_new_database_gets_the_schema_and_the_builtin_catalog(store):
    assert store.blueprints() == builtin_catalog()
    with store.engine.connect() as connection:
        versions = connection.execute(select(schema_version.c.version)).scalars().all()
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_reopening_keeps_reports_and_catalog_edits_and_migrates_nothing_again(database_url,
                                                                                field_report):
    first = FieldReportStore.open(database_url)
    first.record(field_report(report_id="r1"))
    bigger = BlueprintSpec(name="residual_mlp_wide", blueprint_id=4,
                           kind=BlueprintKind.BLUEPRINT_KIND_RESIDUAL_MLP, hidden=64,
                           parameter_cost=ParameterCost(per_chunk=129, constant=64))
    first.register_blueprint(bigger)
    first.close()
    again = FieldReportStore.open(database_url)
    try:
        assert again.report_count() == 1
        assert again.blueprints() == [*builtin_catalog(), bigger]
        with again.engine.connect() as connection:
            rows = connection.execute(select(func.count()).select_from(schema_version))
            assert rows.scalar_one() == SCHEMA_VERSION
    finally:
        again.close()


def test_a_schema_newer_than_this_karn_is_refused(database_url):
    store = FieldReportStore.open(database_url)
    with store.engine.begin() as connection:
        connection.execute(schema_version.insert(),
                           {"version": SCHEMA_VERSION + 1, "applied_at": datetime.now(UTC)})
    with pytest.raises(RuntimeError, match="newer than this Karn"):
        migrate(store.engine)
    store.close()


def test_v2_gives_a_v1_database_the_execution_path_and_old_reports_are_chunked(database_url,
                                                                              field_report):
    store = FieldReportStore.open(database_url)
    store.record(field_report(report_id="old"))
    with store.engine.begin() as connection:  # back to the v1 shape, as a v1 Karn left it
        connection.execute(text(f"ALTER TABLE {field_reports.name} DROP COLUMN execution_path"))
        connection.execute(schema_version.delete().where(schema_version.c.version > 1))
    store.close()
    again = FieldReportStore.open(database_url)  # migrates to the current version
    try:
        again.record(field_report(report_id="new", execution_path="legacy"))
        with again.engine.connect() as connection:
            paths = dict(connection.execute(
                select(field_reports.c.report_id, field_reports.c.execution_path)).all())
            assert connection.execute(select(func.max(schema_version.c.version))).scalar() == (
                SCHEMA_VERSION)
        assert paths == {"old": "chunked", "new": "legacy"}
    finally:
        again.close()


def test_v4_gives_a_v3_database_the_trend_and_old_reports_keep_their_whole_gain(database_url,
                                                                               field_report):
    store = FieldReportStore.open(database_url)
    store.record(field_report(report_id="old", contribution=0.2, metric_before=0.5,
                              metric_after=0.6))  # gained 0.1 of 0.5
    with store.engine.begin() as connection:  # back to the v3 shape, as a v3 Karn left it
        connection.execute(text(f"ALTER TABLE {field_reports.name} DROP COLUMN trend_gain"))
        connection.execute(schema_version.delete().where(schema_version.c.version > 3))
    store.close()
    again = FieldReportStore.open(database_url)
    try:
        new = field_report(report_id="new", contribution=0.2, metric_before=0.5, metric_after=0.6,
                           metric_history=tuple(0.4 - 0.5 / t for t in range(1, 11)))
        new.history[0].entered_epoch, new.history[-1].entered_epoch = 10, 20
        again.record(new)  # the trend (a + b / t, rising) predicts +0.025 of the 0.1
        with again.engine.connect() as connection:
            trends = dict(connection.execute(
                select(field_reports.c.report_id, field_reports.c.trend_gain)).all())
        assert trends["old"] is None and trends["new"] == pytest.approx(0.025)
        (stat,) = again.statistics([1])
        assert stat.successes == pytest.approx(0.2 + 0.15)
    finally:
        again.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "mysql://u@h/db"])
def test_databases_that_cannot_keep_reports_are_refused(url):
    with pytest.raises(ValueError):
        create_database_engine(url)


def test_builtin_catalog_costs_and_fit():
    residual, low_rank, linear = builtin_catalog()
    # residual_mlp: w1 (c,16) b1 (16) w2 (16,c) b2 (c); low_rank: a (c,4) b (4,c); linear: w, b.
    assert parameter_count(residual, 10) == 10 * 16 + 16 + 16 * 10 + 10
    assert parameter_count(low_rank, 10) == 2 * 4 * 10
    assert parameter_count(linear, 10) == 10 * 10 + 10
    assert [fits(low_rank, c) for c in (4, 5)] == [False, True]
    assert [fits(linear, c) for c in (256, 257)] == [True, False]
    assert fits(residual, 1) and fits(residual, 100_000)


def test_builtin_catalog_matches_kasmina():
    blueprints = pytest.importorskip("kasmina.blueprints", reason="kasmina (torch) not installed")
    for spec in builtin_catalog():
        theirs = blueprints.get_blueprint(spec.name)
        assert (theirs.id, theirs.hidden, theirs.rank) == (spec.blueprint_id, spec.hidden,
                                                           spec.rank)
        for chunk in (1, 4, 5, 17, 256, 257, 1000):
            assert theirs.fits(chunk) == fits(spec, chunk), (spec.name, chunk)
            assert theirs.param_count(chunk) == parameter_count(spec, chunk), (spec.name, chunk)


def test_a_redelivered_report_is_stored_once(store, field_report, caplog):
    report = field_report(report_id="same")
    assert store.record(report) is True
    assert store.record(report) is False
    changed = field_report(report_id="same", outcome="CULLED")
    assert store.record(changed) is False
    assert "different content" in caplog.text
    assert store.report_count() == 1
    (stats,) = store.statistics([1])
    assert (stats.reports, stats.fossilized, stats.culled) == (1, 1, 0)


def test_concurrent_deliveries_of_the_same_reports_store_each_once(store, field_report):
    reports = [field_report(report_id=f"r{i}") for i in range(20)]
    inserted: list[bool] = []
    lock = threading.Lock()

    def deliver() -> None:
        for report in reports:
            result = store.record(report)
            with lock:
                inserted.append(result)

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert inserted.count(True) == 20
    assert store.report_count() == 20


def test_a_report_without_report_id_is_refused(store, field_report):
    report = field_report()
    report.report_id = ""
    with pytest.raises(ValueError, match="report_id"):
        store.record(report)


def test_statistics_per_blueprint(store, field_report):
    for report in [
        field_report(1, "FOSSILIZED", contribution=0.04, metric_before=0.5, metric_after=0.6,
                     parameters_added=100, latency_cost_ms=1.0),
        # Fossilized without a positive contribution: counted, no reward.
        field_report(1, "FOSSILIZED", contribution=-0.02, metric_before=0.5, metric_after=0.5,
                     parameters_added=300, latency_cost_ms=3.0),
        field_report(1, "CULLED", contribution=-0.05, metric_before=0.6, metric_after=0.55,
                     parameters_added=0, latency_cost_ms=2.0),
        # Never reached EVALUATING: its contribution of 0 is "not measured", not a zero.
        field_report(1, "CANCELLED", contribution=0.0, metric_before=0.6, metric_after=0.6,
                     parameters_added=0, latency_cost_ms=0.0),
        field_report(1, "ROLLED_BACK", contribution=0.0, metric_before=0.6, metric_after=0.4,
                     parameters_added=0, latency_cost_ms=0.0),
        # Lower is better (a loss went from 2.0 to 1.5): a gain of +0.5.
        field_report(2, "FOSSILIZED", contribution=0.1, metric_before=2.0, metric_after=1.5,
                     higher_is_better=False),
        # A blueprint that is not in the catalog still gets its statistics.
        field_report(9, "CULLED", contribution=-0.1),
    ]:
        assert store.record(report)

    by_id = {s.blueprint_id: s for s in store.statistics()}
    assert sorted(by_id) == [1, 2, 3, 9]
    one = by_id[1]
    assert (one.blueprint_name, one.reports, one.fossilized, one.culled, one.rolled_back,
            one.cancelled) == ("residual_mlp", 5, 2, 1, 1, 1)
    # The one fossilized with a contribution: the smaller of it (0.04) and the gain (0.1, no
    # trajectory), on 0.5: reward 0.08.
    assert one.successes == pytest.approx(0.08)
    assert one.success_rate == pytest.approx(0.016)
    assert by_id[2].successes == pytest.approx(0.05)  # a loss from 2.0 to 1.5, contribution 0.1
    assert one.mean_contribution == pytest.approx((0.04 - 0.02 - 0.05) / 3)
    assert one.mean_metric_gain == pytest.approx((0.1 + 0.0 - 0.05 + 0.0 - 0.2) / 5)
    assert one.mean_parameters_added == pytest.approx(80.0)
    assert one.mean_latency_cost_ms == pytest.approx(1.2)
    assert by_id[2].mean_metric_gain == pytest.approx(0.5)
    assert (by_id[3].reports, by_id[3].mean_contribution) == (0, None)
    assert (by_id[9].blueprint_name, by_id[9].culled) == ("bp9", 1)
    assert [s.blueprint_id for s in store.statistics([2, 9])] == [2, 9]


def test_strategy_records(store, field_report):
    for strategy, outcome, contribution in [("fixed_ramp", "FOSSILIZED", 0.1),
                                            ("fixed_ramp", "CULLED", -0.1),
                                            ("drift_controlled", "FOSSILIZED", 0.2)]:
        store.record(field_report(1, outcome, contribution=contribution,
                                  strategy_name=strategy))
    store.record(field_report(2, "FOSSILIZED", contribution=0.2, strategy_name="fixed_ramp"))
    records = store.strategy_records([1])
    assert [(r.strategy_name, r.reports, r.successes) for r in records] == [
        ("drift_controlled", 1, 1), ("fixed_ramp", 2, 1)]


def test_non_finite_measurements_are_stored_but_left_out_of_the_means(store, field_report):
    store.record(field_report(1, "ROLLED_BACK", contribution=0.0, metric_before=0.5,
                              metric_after=math.nan, latency_cost_ms=math.inf,
                              reached_evaluating=True))
    store.record(field_report(1, "FOSSILIZED", contribution=0.2, metric_before=0.5,
                              metric_after=0.7, latency_cost_ms=2.0))
    (stats,) = store.statistics([1])
    assert (stats.reports, stats.rolled_back, stats.fossilized) == (2, 1, 1)
    assert stats.mean_metric_gain == pytest.approx(0.2)
    assert stats.mean_latency_cost_ms == pytest.approx(2.0)
    assert stats.mean_contribution == pytest.approx(0.1)
