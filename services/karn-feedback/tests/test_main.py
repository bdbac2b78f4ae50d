"""`python -m karn` refuses to start without what it needs, saying what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def _run_karn(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OONA_", "KARN_"))}
    # The fleet's secrets, so each case fails for its own reason (without them: test_security).
    base.update(OONA_SIGNING_KEY="fleet-key-for-tests", KARN_API_TOKEN="karn-token-for-tests")
    return subprocess.run([sys.executable, "-m", "karn"], env={**base, **env}, check=False,
                          capture_output=True, text=True, timeout=60)


def test_without_a_bus_url_it_explains_how_to_get_one():
    result = _run_karn({})
    assert result.returncode == 2
    assert "OONA_REDIS_URL is not set" in result.stderr
    assert "python -m oona serve-embedded" in result.stderr


def test_bad_configuration_exits_with_the_setting_named(tmp_path):
    result = _run_karn({"OONA_REDIS_URL": "redis://127.0.0.1:1/0", "KARN_GRPC_PORT": "x"})
    assert result.returncode == 2
    assert "KARN_GRPC_PORT" in result.stderr


def test_an_unreachable_bus_is_a_clean_failure(tmp_path):
    result = _run_karn({"OONA_REDIS_URL": "redis://127.0.0.1:1/0", "OONA_CONNECT_ATTEMPTS": "1",
                        "KARN_DATABASE_URL": f"sqlite:///{tmp_path / 'karn.db'}"})
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "unreachable" in result.stderr


def test_a_port_in_use_is_a_clean_failure(tmp_path, oona_redis_url):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = _run_karn({"OONA_REDIS_URL": oona_redis_url, "KARN_HTTP_PORT": str(port),
                            "KARN_DATABASE_URL": f"sqlite:///{tmp_path / 'karn.db'}"})
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "Address already in use" in result.stderr
