"""Typed settings from a DSN and from the environment; stream names and metric labels."""

from __future__ import annotations

import pytest
from oona import streams
from oona.settings import BusSettings


def test_from_dsn_reads_credentials_and_tls_options():
    s = BusSettings.from_dsn("rediss://fleet:s%40cret@redis.example:6380/2"
                             "?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none")
    assert (s.username, s.password, s.tls_enabled, s.tls_ca_file, s.tls_verify) == (
        "fleet", "s@cret", True, "/ca.pem", False)
    assert s.redacted_url() == ("rediss://fleet:***@redis.example:6380/2"
                                "?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none")


def test_from_env_without_url_means_embedded_and_reads_overrides():
    s = BusSettings.from_env({"OONA_SIGNING_KEY": "k", "OONA_STREAM_MAXLEN": "500",
                              "OONA_STALE_GROUP_S": "3600"})
    assert (s.url, s.signing_key, s.stream_maxlen, s.stale_group_s) == (None, b"k", 500, 3600)
    assert BusSettings().stale_group_s == 7 * 24 * 3600
    s = BusSettings.from_env({"OONA_REDIS_URL": "redis://h:1/0", "OONA_REDIS_PASSWORD": "pw"})
    assert (s.url, s.password, s.tls_enabled) == ("redis://h:1/0", "pw", False)


def test_cluster_urls_select_cluster_mode_and_keep_the_marker_in_the_url():
    s = BusSettings.from_dsn("rediss+cluster://fleet:pw@node-1:7000/0?ssl_cert_reqs=none")
    assert (s.cluster, s.tls_enabled, s.tls_verify, s.password) == (True, True, False, "pw")
    assert s.client_url() == "rediss://fleet:pw@node-1:7000/0?ssl_cert_reqs=none"
    assert s.redacted_url() == "rediss+cluster://fleet:***@node-1:7000/0?ssl_cert_reqs=none"
    s = BusSettings.from_env({"OONA_REDIS_URL": "redis+cluster://node-1:7000"})
    assert (s.cluster, s.tls_enabled, s.url) == (True, False, "redis+cluster://node-1:7000")
    plain = BusSettings.from_dsn("redis://h:1/0")
    assert (plain.cluster, plain.client_url()) == (False, "redis://h:1/0")
    assert not BusSettings().cluster


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        BusSettings.from_dsn("http://h")
    with pytest.raises(ValueError):
        BusSettings.from_dsn("unix+cluster:///tmp/redis.sock")
    with pytest.raises(ValueError):
        BusSettings(claim_check_bytes=10, max_payload_bytes=5)


def test_stream_names_and_bounded_metric_labels():
    assert streams.commands("job-7") == "control.kasmina.commands.{job-7}"
    assert streams.dead_letters(streams.FIELD_REPORTS) == "innovation.field_reports.dlq"
    assert streams.family(streams.commands("a")) == streams.family(streams.commands("b"))
    assert streams.family(streams.commands("a") + ".dlq") == "control.kasmina.commands.dlq"
    assert streams.family("test.random-name") == "other"
    with pytest.raises(ValueError):
        streams.commands("bad{id}")


def test_a_consumers_dead_letter_series_exist_at_zero_before_the_first_letter():
    from oona import metrics
    from oona.errors import DeadLetterReason
    from prometheus_client import REGISTRY

    metrics.dead_letter_series("test.zero")
    for reason in DeadLetterReason:
        assert REGISTRY.get_sample_value("oona_dead_lettered_total",
                                         {"stream": "test.zero", "reason": reason.value}) == 0.0
    assert REGISTRY.get_sample_value("oona_dropped_total",
                                     {"stream": "telemetry.seed.health"}) is not None
