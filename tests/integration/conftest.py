"""Shared fixtures of the integration tests: Karn as a real process (`python -m karn`) on a
private embedded Redis and one SQLite file, and publishing field reports the way Kasmina does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from oona import BusSettings, EmbeddedRedis, open_bus, streams
from oona.contracts import FieldReport
from oona.embedded import free_port
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as pb_grpc

# The services refuse to start without the fleet's signing key and API tokens (docs/security.md);
# these tests exercise other things and run them with the explicit opt-out. The security tests
# (test_security.py) strip OONA_* from the environments they build, so they check the default.
os.environ.setdefault("OONA_INSECURE", "1")

_KARN_START_TIMEOUT_S = 60.0
_KARN_STOP_TIMEOUT_S = 30.0


@dataclass
class KarnProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    karn: pb_grpc.KarnStub
    channel: grpc.Channel
    log: Path

    def logs(self) -> str:
        return self.log.read_text()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metric(self, sample: str) -> float:
        """One sample of /metrics, e.g. `karn_field_report_duplicates_total`."""
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{sample} not exported")

    def terminate(self) -> int:
        """SIGTERM, then the exit code (a hang past the timeout fails the test)."""
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(_KARN_STOP_TIMEOUT_S)


StartKarn = Callable[..., KarnProcess]


@pytest.fixture
def karn_database(tmp_path: Path) -> Path:
    """The SQLite file every Karn of a test shares."""
    return tmp_path / "karn" / "karn.db"


@pytest.fixture
def start_karn(oona_restartable_broker: EmbeddedRedis, karn_database: Path,
               tmp_path: Path) -> Iterator[StartKarn]:
    """`start(**env)` starts `python -m karn` on the test's broker and database (KARN_* in `env`
    override the defaults here) and returns once /readyz says ready. Killed at the end if still
    running."""
    started: list[KarnProcess] = []

    def start(**overrides: str) -> KarnProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KARN_")}
        env.update(OONA_REDIS_URL=oona_restartable_broker.url,
                   KARN_DATABASE_URL=f"sqlite:///{karn_database}",
                   KARN_GRPC_PORT=str(free_port()), KARN_HTTP_PORT=str(free_port()),
                   KARN_RANDOM_SEED="5", KARN_SHUTDOWN_GRACE_S="5")
        env.update(overrides)  # a test may choose the ports too
        grpc_port, http_port = int(env["KARN_GRPC_PORT"]), int(env["KARN_HTTP_PORT"])
        log = tmp_path / f"karn-{len(started)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen([sys.executable, "-m", "karn"], env=env, stdout=sink,
                                       stderr=subprocess.STDOUT)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        karn = KarnProcess(process, http_port, pb_grpc.KarnStub(channel), channel, log)
        started.append(karn)
        deadline = time.monotonic() + _KARN_START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"karn exited at start:\n{karn.logs()}"
            try:
                if karn.get("/readyz")[0] == 200:
                    return karn
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"karn not ready:\n{karn.logs()}"
            time.sleep(0.1)

    yield start
    for karn in started:
        karn.channel.close()
        if karn.process.poll() is None:
            karn.process.kill()
            karn.process.wait()


PublishFieldReports = Callable[[list[FieldReport]], None]


@pytest.fixture
def publish_field_reports(oona_restartable_broker: EmbeddedRedis) -> PublishFieldReports:
    """Publish field reports on the test's broker, as Kasmina does (one round trip)."""

    def publish(reports: list[FieldReport]) -> None:
        async def body() -> None:
            async with open_bus(BusSettings.from_dsn(oona_restartable_broker.url)) as bus:
                await bus.publisher("kasmina-test").publish_many(
                    [(streams.FIELD_REPORTS, r) for r in reports])

        asyncio.run(body())

    return publish
