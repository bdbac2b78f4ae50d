"""`python -m tamiyo` as a real process on a private embedded Redis, fed bad input: malformed
reports (the one that made it exit 1 at every restart among them), events and acks, a 200 KB
job id, a poison entry in its saved state. It stays up, dead-letters each with a reason, keeps
deciding valid input, keeps /metrics bounded, and restarts cleanly."""

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
from pathlib import Path

import pytest
import redis
from google.protobuf.message import Message
from oona import BusSettings, open_bus, streams
from oona.contracts import AckReason, CommandAck, Envelope, LifecycleCommand
from oona.contracts import SeedStage as Stage
from oona.dead_letters import parse
from oona.embedded import free_port
from oona.envelope import ENVELOPE_FIELD
from tamiyo.store import JOBS_KEY, job_key

LAYERS = ("fc1", "fc2")


class Tamiyo:
    def __init__(self, url: str, log: Path) -> None:
        self.http_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TAMIYO_", "KARN_"))}
        env.update(OONA_REDIS_URL=url, TAMIYO_HTTP_PORT=str(self.http_port),
                   TAMIYO_GRPC_PORT=str(free_port()), TAMIYO_SHUTDOWN_GRACE_S="5",
                   TAMIYO_KARN_ADDRESS=f"127.0.0.1:{free_port()}", TAMIYO_KARN_TIMEOUT_S="0.2",
                   TAMIYO_PLATEAU_EPOCHS="2", TAMIYO_REPORT_GRACE_S="0.3", TAMIYO_TICK_S="0.1",
                   TAMIYO_ACK_TIMEOUT_S="60", TAMIYO_CONSUMER_NAME="tamiyo-bad-input",
                   # the killed process's leases lapse soon
                   TAMIYO_LEASE_MS="1000",
                   # unsigned on purpose: the bad input here is content, not signatures
                   OONA_INSECURE="1")
        self.log = log
        with log.open("ab") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "tamiyo"], env=env,
                                            stdout=sink, stderr=subprocess.STDOUT)
        _wait(lambda: self.get("/readyz")[0] == 200, "not ready", self)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        assert self.process.poll() is None, f"tamiyo exited:\n{self.logs()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""  # not listening yet

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def _wait(condition: Callable[[], bool], what: str, tamiyo: Tamiyo,
          timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}:\n{tamiyo.logs()}"
        time.sleep(0.05)


@pytest.fixture
def started(private_redis_url: str, tmp_path: Path) -> Iterator[Callable[[], Tamiyo]]:
    processes: list[Tamiyo] = []

    def start() -> Tamiyo:
        processes.append(Tamiyo(private_redis_url, tmp_path / "tamiyo.log"))
        return processes[-1]

    yield start
    for tamiyo in processes:
        if tamiyo.process.poll() is None:
            tamiyo.process.kill()
            tamiyo.process.wait()


def _publish(url: str, messages: list[tuple[str, Message]]) -> None:
    async def body() -> None:
        async with open_bus(BusSettings.from_dsn(url)) as bus:
            await bus.publisher("kasmina-test").publish_many(messages)

    asyncio.run(body())


def _dead_letters(client: redis.Redis, stream: str) -> list:
    return [parse(i, f) for i, f in client.xrange(streams.dead_letters(stream))]


def _commands(client: redis.Redis, job: str) -> list[LifecycleCommand]:
    return [LifecycleCommand.FromString(Envelope.FromString(f[ENVELOPE_FIELD]).payload)
            for _, f in client.xrange(streams.commands(job))]


def test_bad_input_is_dead_lettered_and_tamiyo_stays_up_across_restarts(
        started, private_redis_url, report, epoch_ended):
    url = private_redis_url
    client = redis.Redis.from_url(url)
    tamiyo = started()
    metrics_before = len(tamiyo.get("/metrics")[1])

    # The report that made Tamiyo exit 1 (3 of 3, and again at every restart): its columns
    # are shorter than num_seeds, and deciding on it raised IndexError in the tick.
    short = report(job="job-bad", layer="fc1", epoch=0)
    del short.stage[1:], short.ready_for[1:]
    huge = report(job="x" * 200_000, layer="fc1")
    absurd = report(job="job-bad", layer="fc2")
    absurd.num_seeds = 3_000_000_000
    bad: list[tuple[str, Message]] = [
        (streams.TELEMETRY_SEED_HEALTH, short),
        (streams.TELEMETRY_SEED_HEALTH, report(job="job-bad", variance=[float("nan"), -2.0,
                                                                        1.0, 1.0])),
        (streams.TELEMETRY_SEED_HEALTH, report(job="job-bad", layer="../../fc3")),
        (streams.TELEMETRY_SEED_HEALTH, huge),
        (streams.TELEMETRY_SEED_HEALTH, absurd),
        (streams.EPOCH_EVENTS, epoch_ended(4_294_967_295, 0.5, job="job-bad")),
        (streams.CONTROL_ACKS, CommandAck(command_id="c{1}", job_id="job-bad")),
    ]
    _publish(url, [*bad, (streams.EPOCH_EVENTS, epoch_ended(0, 0.5, job="job-bad"))])
    dead = (streams.TELEMETRY_SEED_HEALTH, streams.EPOCH_EVENTS, streams.CONTROL_ACKS)
    _wait(lambda: sum(len(_dead_letters(client, s)) for s in dead) == len(bad),
          "not every bad message was dead-lettered", tamiyo)
    letters = [letter for s in dead for letter in _dead_letters(client, s)]
    assert {letter.reason for letter in letters} == {"rejected"}
    assert any("stage has 1 elements, num_seeds is 4" in letter.detail for letter in letters)
    assert any("chunk_variance[1] = -2.0" in letter.detail for letter in letters)
    assert any("num_seeds 3000000000" in letter.detail for letter in letters)
    time.sleep(0.6)  # past the report grace: the bad job's epoch 0 is decided on nothing
    assert tamiyo.process.poll() is None and tamiyo.get("/readyz")[0] == 200
    assert client.hkeys(job_key("job-bad")) == [b"state"], "no bad report saved"
    # The 200 KB id became no key and no label.
    assert not any(len(key) > 1000 for key in client.scan_iter(count=1000))
    metrics_text = tamiyo.get("/metrics")[1]
    # (new series appear as the bus is used: a few KB; the id alone would be 200 KB)
    assert "xxxxxxxx" not in metrics_text and len(metrics_text) < metrics_before + 20_000

    # A valid job afterwards is decided: a plateau germinates (Karn down: the default).
    for epoch in range(3):
        _publish(url, [*((streams.TELEMETRY_SEED_HEALTH, report(job="job-ok", layer=layer,
                                                                epoch=epoch))
                         for layer in LAYERS),
                       (streams.EPOCH_EVENTS, epoch_ended(epoch, 0.6, job="job-ok"))])
    _wait(lambda: len(_commands(client, "job-ok")) == 1, "the valid job was not decided", tamiyo)
    assert _commands(client, "job-ok")[0].WhichOneof("action") == "germinate"

    # A poison report already in the saved state (as an older Tamiyo saved it), then a kill -9
    # and a restart: it loads, skips the poison with a warning, and stays up.
    client.hset(job_key("job-ok"), "report:fc1", short.SerializeToString())
    tamiyo.process.send_signal(signal.SIGKILL)
    tamiyo.process.wait()
    tamiyo = started()
    time.sleep(1.0)  # several ticks and past the report grace, on the loaded state
    assert tamiyo.process.poll() is None and tamiyo.get("/readyz")[0] == 200
    assert b"report:fc1" not in client.hkeys(job_key("job-ok"))
    assert {m.decode() for m in client.smembers(JOBS_KEY)} == {"job-bad", "job-ok"}
    # It still decides: the germination acked and the seed reported GERMINATED at epoch 3,
    # it promotes the seed.
    germinate = _commands(client, "job-ok")[0]
    stages = [Stage.SEED_STAGE_DORMANT] * 4
    stages[germinate.seed_index] = Stage.SEED_STAGE_GERMINATED
    ack = CommandAck(command_id=germinate.command_id, job_id="job-ok", success=True,
                     reason=AckReason.ACK_REASON_OK, stage_before=Stage.SEED_STAGE_DORMANT,
                     stage_after=Stage.SEED_STAGE_GERMINATED, applied_epoch=3)
    _publish(url, [(streams.CONTROL_ACKS, ack), *((streams.TELEMETRY_SEED_HEALTH,
                      report(job="job-ok", layer=layer, epoch=3,
                             stages=stages if layer == germinate.layer_id else None))
                     for layer in LAYERS),
                   (streams.EPOCH_EVENTS, epoch_ended(3, 0.6, job="job-ok"))])
    _wait(lambda: len(_commands(client, "job-ok")) == 2, "not decided after the restart", tamiyo)
    assert _commands(client, "job-ok")[1].advance.target_stage == Stage.SEED_STAGE_TRAINING
    assert tamiyo.stop() == 0
    logs = tamiyo.logs()
    assert "skipping saved report:fc1" in logs and "Traceback" not in logs
