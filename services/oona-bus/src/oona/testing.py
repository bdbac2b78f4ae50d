"""pytest fixtures for any service that tests against the bus (a pytest11 plugin, loaded
automatically where oona is installed).

- `oona_redis_url`: the server at OONA_REDIS_URL when set, else one embedded redis-server for
  the session, so the same suite runs against both.
- `oona_restartable_broker`: a private embedded server (TCP port, own data directory) that a
  fault test may stop and restart; skipped when OONA_REDIS_URL points at an external server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from oona.embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def oona_redis_url() -> Iterator[str]:
    external = os.environ.get("OONA_REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis() as broker:
        yield broker.url


@pytest.fixture
def oona_restartable_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    if os.environ.get("OONA_REDIS_URL"):
        pytest.skip("needs a server it can restart: runs on the embedded broker only")
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=0) as broker:
        yield broker
