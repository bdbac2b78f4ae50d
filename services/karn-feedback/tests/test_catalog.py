"""Karn's catalog is the contracts' catalog: upserted at every start, migrations frozen."""

from __future__ import annotations

import ast
from pathlib import Path

from karn import database
from karn.catalog import builtin_catalog
from karn.database import blueprints, metadata
from karn.store import FieldReportStore
from oona.contracts import BlueprintKind, BlueprintSpec, catalog, with_cost
from sqlalchemy import inspect, select, update


def test_the_builtin_catalog_is_the_contracts_catalog():
    assert builtin_catalog() == catalog()
    assert [s.blueprint_id for s in builtin_catalog()] == [1, 2, 3]
    assert all(s.parameter_cost == with_cost(s).parameter_cost for s in builtin_catalog())


def test_an_existing_database_sees_a_new_or_changed_builtin_entry_at_start(database_url):
    store = FieldReportStore.open(database_url)
    with store.engine.begin() as connection:  # as a Karn from before entry 3 left it
        connection.execute(blueprints.delete().where(blueprints.c.blueprint_id == 3))
        connection.execute(update(blueprints).where(blueprints.c.blueprint_id == 1)
                           .values(hidden=8, description="old"))
    assert [s.blueprint_id for s in store.blueprints()] == [1, 2]
    store.close()
    again = FieldReportStore.open(database_url)
    try:
        assert again.blueprints() == builtin_catalog()
    finally:
        again.close()


def test_an_operators_entry_survives_the_upsert_and_keeps_its_name(database_url):
    store = FieldReportStore.open(database_url)
    mine = with_cost(BlueprintSpec(name="residual_mlp_wide", blueprint_id=40, hidden=64,
                                   kind=BlueprintKind.BLUEPRINT_KIND_RESIDUAL_MLP))
    store.register_blueprint(mine)
    store.close()
    again = FieldReportStore.open(database_url)
    try:
        assert again.blueprints() == [*builtin_catalog(), mine]
    finally:
        again.close()


def test_the_migrated_schema_is_the_live_tables(store):
    live = {t.name: {c.name for c in t.columns} for t in metadata.sorted_tables}
    inspector = inspect(store.engine)
    for table, columns in live.items():
        assert {c["name"] for c in inspector.get_columns(table)} == columns, table


def test_migrations_use_no_live_catalog_or_live_tables():
    """A migration is a frozen snapshot: it names no live table object and calls nothing that
    reads today's catalog (catalog(), builtin_catalog(), spec_row)."""
    tree = ast.parse(Path(database.__file__).read_text())
    live = {"blueprints", "field_reports", "blueprint_proposals", "metadata", "catalog",
            "builtin_catalog", "spec_row", "with_cost"}
    migrations = [node for node in tree.body if isinstance(node, ast.FunctionDef)
                  and node.name in {m.__name__ for m in database.MIGRATIONS}]
    assert len(migrations) == len(database.MIGRATIONS) == database.SCHEMA_VERSION
    for function in migrations:
        names = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
        assert not names & live, (function.name, names & live)


def test_a_proposal_id_never_collides_with_a_builtin_one(store):
    from karn.search import BlueprintSearch, SearchConfig

    (proposal, *_) = BlueprintSearch(store, SearchConfig(seed=0)).step()
    with store.engine.connect() as connection:
        ids = connection.execute(select(blueprints.c.blueprint_id)).scalars().all()
    assert proposal.spec.blueprint_id == 1_000_000 and max(s.blueprint_id for s in catalog()) < (
        min(i for i in ids if i >= 1_000_000))
