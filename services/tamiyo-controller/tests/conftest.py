"""Fixtures: health reports and epoch events as the Kasmina runtime publishes them, a blueprint
advisor that answers without Karn, a private real Redis per worker test, and a real
`python -m tamiyo` on it.

Tests that need the event loop call `asyncio.run` themselves, as oona's and Karn's do.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from oona import EmbeddedRedis
from oona.contracts import EpochEvent, EpochEventKind, LayerHealthReport
from oona.contracts import SeedStage as Stage
from oona.embedded import free_port
from tamiyo.blueprints import BlueprintChoice

NAN = math.nan


def _report(*, job: str = "job-1", layer: str = "layers.0", epoch: int = 0,
            stages: Sequence[int] | None = None, ready_for: Sequence[int] | None = None,
            variance: Sequence[float] | None = None, dead: Sequence[float] | None = None,
            correlation: Sequence[float] | None = None, num_seeds: int = 4) -> LayerHealthReport:
    """A layer's report; every seed DORMANT, healthy and alike unless a column is given."""
    n = len(stages) if stages is not None else num_seeds
    return LayerHealthReport(
        job_id=job, layer_id=layer, epoch=epoch, step=epoch * 100, num_seeds=n,
        stage=stages if stages is not None else [Stage.SEED_STAGE_DORMANT] * n,
        blueprint_id=[-1] * n, epochs_in_stage=[epoch] * n, strategy_id=[-1] * n,
        alpha=[0.0] * n, chunk_variance=variance if variance is not None else [1.0] * n,
        dead_ratio=dead if dead is not None else [0.0] * n,
        mean_abs_correlation=correlation if correlation is not None else [0.1] * n,
        reconstruction_ratio=[NAN] * n, grad_norm=[NAN] * n, drift=[NAN] * n,
        contribution=[NAN] * n,
        ready_for=ready_for if ready_for is not None else [Stage.SEED_STAGE_UNSPECIFIED] * n)


def _epoch_ended(epoch: int, metric: float | None, *, job: str = "job-1",
                 higher_is_better: bool = True) -> EpochEvent:
    event = EpochEvent(job_id=job, kind=EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED, epoch=epoch,
                       step=epoch * 100, val_metric_name="val_accuracy",
                       higher_is_better=higher_is_better)
    if metric is not None:
        event.val_metric = metric
    return event


@pytest.fixture
def report() -> Callable[..., LayerHealthReport]:
    """`report(layer=..., epoch=..., stages=[...], ready_for=[...], variance=[...], ...)`."""
    return _report


@pytest.fixture
def epoch_ended() -> Callable[..., EpochEvent]:
    """`epoch_ended(epoch, val_metric, job=..., higher_is_better=...)`."""
    return _epoch_ended


class RecordingAdvisor:
    """Answers like Karn would, from a fixed choice, and records what it was asked."""

    def __init__(self, choice: BlueprintChoice | None) -> None:
        self.choice = choice
        self.requests: list[tuple[str, str, int]] = []

    def choose(self, job_id: str, layer_id: str, chunk_size: int) -> BlueprintChoice | None:
        self.requests.append((job_id, layer_id, chunk_size))
        return self.choice


@pytest.fixture
def advisor() -> RecordingAdvisor:
    return RecordingAdvisor(BlueprintChoice("low_rank", "drift_controlled", "karn"))


@pytest.fixture
def private_redis_url() -> Iterator[str]:
    """A redis-server of this test's own: the worker's consumer groups and state keys have
    fixed names, so tests must not share a server."""
    with EmbeddedRedis() as broker:
        yield broker.url


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return reply.status == 200
    except OSError:  # not listening yet, or 503
        return False


@pytest.fixture
def start_tamiyo(private_redis_url: str, tmp_path: Path
                 ) -> Iterator[Callable[..., tuple[subprocess.Popen, int, Path]]]:
    """`start_tamiyo(**env)`: a real `python -m tamiyo` on the private Redis, with no Karn
    (germinations fall back to the default blueprint after 0.2 s), no cooldown and fast ticks,
    `env` on top; returns (process, HTTP port, log) once it is ready. SIGTERMed at the end."""
    started = []

    def start(**overrides: str) -> tuple[subprocess.Popen, int, Path]:
        http_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TAMIYO_", "KARN_"))}
        env.update(OONA_REDIS_URL=private_redis_url, TAMIYO_HTTP_PORT=str(http_port),
                   TAMIYO_GRPC_PORT=str(free_port()), TAMIYO_SHUTDOWN_GRACE_S="5",
                   TAMIYO_KARN_ADDRESS=f"127.0.0.1:{free_port()}", TAMIYO_KARN_TIMEOUT_S="0.2",
                   TAMIYO_COOLDOWN_EPOCHS="0", TAMIYO_REPORT_GRACE_S="0.3",
                   TAMIYO_TICK_S="0.1", OONA_INSECURE="1", **overrides)
        log = tmp_path / f"tamiyo-{len(started)}.log"
        with log.open("ab") as sink:
            process = subprocess.Popen([sys.executable, "-m", "tamiyo"], env=env, stdout=sink,
                                       stderr=subprocess.STDOUT)
        started.append(process)
        deadline = time.monotonic() + 30
        while not _ready(http_port):
            assert process.poll() is None and time.monotonic() < deadline, (
                f"tamiyo not ready:\n{log.read_text()}")
            time.sleep(0.1)
        return process, http_port, log

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
