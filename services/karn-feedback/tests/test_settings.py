"""KarnSettings from the environment."""

from __future__ import annotations

import pytest
from karn.settings import KarnSettings


def test_defaults_without_environment():
    settings = KarnSettings.from_env({})
    assert settings == KarnSettings()
    assert (settings.database_url, settings.grpc_port, settings.http_port) == (
        "sqlite:///karn.db", 50053, 8083)
    assert settings.random_seed is None


def test_every_field_reads_its_variable():
    settings = KarnSettings.from_env({
        "KARN_DATABASE_URL": "postgresql+psycopg://karn:secret@db:5432/karn",
        "KARN_GRPC_PORT": "6000", "KARN_HTTP_PORT": "6001", "KARN_BIND_HOST": "0.0.0.0",
        "KARN_CONSUMER_NAME": "karn-7", "KARN_COST_PENALTY": "0.25", "KARN_RANDOM_SEED": "9",
        "KARN_MAX_DELIVERIES": "3", "KARN_SHUTDOWN_GRACE_S": "1.5", "UNRELATED": "x",
        "KARN_RECLAIM_IDLE_MS": "1500", "KARN_RECLAIM_INTERVAL_S": "0.2"})
    assert settings == KarnSettings(
        database_url="postgresql+psycopg://karn:secret@db:5432/karn", grpc_port=6000,
        http_port=6001, bind_host="0.0.0.0", consumer_name="karn-7", cost_penalty=0.25,
        random_seed=9, max_deliveries=3, shutdown_grace_s=1.5, reclaim_idle_ms=1500,
        reclaim_interval_s=0.2)
    assert settings.redacted_database_url() == "postgresql+psycopg://karn:***@db:5432/karn"


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("KARN_GRPC_PORT", "http", "KARN_GRPC_PORT"),
    ("KARN_HTTP_PORT", "70000", "http_port"),
    ("KARN_COST_PENALTY", "-1", "cost_penalty"),
    ("KARN_MAX_DELIVERIES", "0", "max_deliveries"),
    ("KARN_RECLAIM_IDLE_MS", "0", "reclaim_idle_ms"),
    ("KARN_RECLAIM_INTERVAL_S", "0", "reclaim_interval_s"),
])
def test_bad_values_are_refused_naming_the_setting(variable, value, message):
    with pytest.raises(ValueError, match=message):
        KarnSettings.from_env({variable: value})
