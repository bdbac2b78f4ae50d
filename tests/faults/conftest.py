"""The bad-input corpus's fleet: one private embedded Redis and real processes of Karn
(`python -m karn`), Tamiyo (`python -m tamiyo`) and the runtime (`python -m kasmina serve`),
secure by default (a signing key and an API token each, as compose gives them), shared by the
whole directory so hypothesis runs its examples against processes that stay up between them.

`OONA_FAULTS_REDIS_URL=redis://127.0.0.1:6379/15` runs the corpus on that server instead (e.g.
the system's Redis 7). The corpus writes the fleet's fixed stream names, so the database must be
empty at the start (else the session is skipped, saying so: nothing of anyone else's is touched);
what the corpus wrote there is deleted at the end."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from oona import EmbeddedRedis
from oona.embedded import free_port

SIGNING_KEY = "faults-signing-key-0123456789abcdef0123456789abcdef"
TOKENS = {"kasmina": "faults-kasmina-token-0123456789", "karn": "faults-karn-token-0123456789",
          "tamiyo": "faults-tamiyo-token-0123456789"}
_SECRETS = ("OONA_SIGNING_KEY", "OONA_SIGNING_PREVIOUS_KEYS", "OONA_REDIS_PASSWORD",
            "KASMINA_API_TOKEN", "KARN_API_TOKEN", "TAMIYO_API_TOKEN", "OONA_INSECURE")
# The runtime imports torch: its start takes ~10 s on an idle 2-core machine, more when loaded.
_START_TIMEOUT_S = 120.0
EXTERNAL_URL = os.environ.get("OONA_FAULTS_REDIS_URL") or None


@dataclass(frozen=True)
class ExternalRedis:
    """A server the corpus does not own (OONA_FAULTS_REDIS_URL): used, never restarted."""

    url: str


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log: Path
    token: str = field(repr=False, default="")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def assert_up(self) -> None:
        """Still running and still serving its liveness endpoint."""
        assert self.alive(), f"{self.name} exited ({self.process.returncode}):\n{self.logs()}"
        assert self.get("/healthz")[0] == 200, self.logs()


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.removesuffix("_FILE") not in _SECRETS
           and not k.startswith(("OONA_", "KARN_", "TAMIYO_", "KASMINA_"))}
    env.update(OONA_REDIS_URL=url, OONA_SIGNING_KEY=SIGNING_KEY,
               KASMINA_API_TOKEN=TOKENS["kasmina"], KARN_API_TOKEN=TOKENS["karn"],
               TAMIYO_API_TOKEN=TOKENS["tamiyo"], **extra)
    return env


def _start(name: str, args: list[str], env: dict[str, str], log: Path) -> ServiceProcess:
    prefix = name.upper()
    http_port, grpc_port = free_port(), free_port()
    env = {**env, f"{prefix}_HTTP_PORT": str(http_port), f"{prefix}_GRPC_PORT": str(grpc_port),
           f"{prefix}_SHUTDOWN_GRACE_S": "5"}
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    service = ServiceProcess(name, process, http_port, grpc_port, log, TOKENS[name])
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        assert service.alive(), f"{name} exited at start:\n{service.logs()}"
        try:
            if service.get("/readyz")[0] == 200:
                return service
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"{name} not ready:\n{service.logs()}"
        time.sleep(0.1)


def _stop(service: ServiceProcess) -> None:
    if service.alive():
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(30)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()


@pytest.fixture(scope="session")
def fault_broker(tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[EmbeddedRedis | ExternalRedis]:
    """A private embedded Redis for the corpus (its dead letters must be ours alone), or the
    empty database OONA_FAULTS_REDIS_URL names."""
    if EXTERNAL_URL is None:
        with EmbeddedRedis(tmp_path_factory.mktemp("faults-redis"), port=0) as broker:
            yield broker
        return
    with redis.Redis.from_url(EXTERNAL_URL) as client:
        try:
            keys = client.dbsize()
        except redis.RedisError as exc:
            pytest.skip(f"OONA_FAULTS_REDIS_URL: {exc}")
        if keys:
            pytest.skip(f"OONA_FAULTS_REDIS_URL's database holds {keys} keys: the corpus writes "
                        "the fleet's stream names there, so it needs an empty one (e.g. /15)")
        yield ExternalRedis(EXTERNAL_URL)
        for key in client.scan_iter(count=1000):  # all ours: the database was empty
            client.unlink(key)


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """`start_service(name, args, url, **env)`: a fleet process (`python -m *args`) on the Redis
    at `url`, secure by default (signed with `signing_key`), ready; stopped at the test's end."""
    started: list[ServiceProcess] = []

    def start(name: str, args: list[str], url: str, **extra: str) -> ServiceProcess:
        started.append(_start(name, args, _env(url, **extra), tmp_path / f"{name}.log"))
        return started[-1]

    yield start
    for service in started:
        _stop(service)


@pytest.fixture
def signing_key() -> bytes:
    """The fleet's signing key in this directory: what a message must be signed with."""
    return SIGNING_KEY.encode()


@pytest.fixture(scope="session")
def fault_karn(fault_broker: EmbeddedRedis,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("faults-karn")
    karn = _start("karn", ["karn"], _env(fault_broker.url,
                                          KARN_DATABASE_URL=f"sqlite:///{work / 'karn.db'}",
                                          KARN_CONSUMER_NAME="karn-faults"),
                  work / "karn.log")
    yield karn
    _stop(karn)


@pytest.fixture(scope="session")
def fault_tamiyo(fault_broker: EmbeddedRedis, fault_karn: ServiceProcess,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("faults-tamiyo")
    tamiyo = _start("tamiyo", ["tamiyo"], _env(
        fault_broker.url, TAMIYO_KARN_ADDRESS=f"127.0.0.1:{fault_karn.grpc_port}",
        TAMIYO_CONSUMER_NAME="tamiyo-faults", TAMIYO_KARN_TIMEOUT_S="2"), work / "tamiyo.log")
    yield tamiyo
    _stop(tamiyo)


@pytest.fixture(scope="session")
def fault_runtime(fault_broker: EmbeddedRedis,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("faults-kasmina")
    runtime = _start("kasmina", ["kasmina", "serve"], _env(
        fault_broker.url, KASMINA_CHECKPOINT_DIR=str(work / "checkpoints")),
        work / "kasmina.log")
    yield runtime
    _stop(runtime)


# --- hostile protobuf messages, built from the descriptors (every field of every message) -----

_INT_RANGES = {FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1),
               FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
               FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1),
               FieldDescriptor.TYPE_ENUM: (-2**31, 2**31 - 1),  # proto3 enums are open
               FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
               FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
               FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
               FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1),
               FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
               FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
               FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1)}
# Strings that have broken ids, paths, keys, logs or labels somewhere.
HOSTILE_TEXT = ("", " ", "../../x", "/etc/passwd", "a/b", "{job}", "}{", "\n", "a\nb", "\x00",
                "\r\n\r\n", "-rf", ".hidden", "é", "\U0001f600", "' OR 1=1 --", "%00", "*",
                "a" * 129, "x" * 200_000)


def _text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=40),
                     st.integers(1_000, 300_000).map(lambda n: "z" * n))


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    if fd.type in _INT_RANGES:
        low, high = _INT_RANGES[fd.type]
        edges = [v for v in (0, 1, -1, 2, high, low, high - 1, 10**7 + 1, 65_537)
                 if low <= v <= high]
        known = ([v.number for v in fd.enum_type.values] if fd.enum_type is not None else [])
        return st.one_of(st.sampled_from(edges + known), st.integers(low, high))
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width = 64 if fd.type == FieldDescriptor.TYPE_DOUBLE else 32
        return st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1.0, 1e308
                                          if width == 64 else 3e38]),
                         st.floats(width=width))
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type == FieldDescriptor.TYPE_STRING:
        return _text()
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.integers(1_000, 300_000).map(bytes))
    raise AssertionError(f"no strategy for field type {fd.type} ({fd.full_name})")


def hostile_message(cls: type[Message], depth: int = 2) -> st.SearchStrategy[Message]:
    """A `cls` with any subset of its fields set to hostile values (huge, negative, NaN, out of
    range, unknown enum numbers, path-like or control-character strings); nested messages to
    `depth` levels, repeated fields up to 4 elements, maps up to 3 entries."""
    fields = {}
    for fd in cls.DESCRIPTOR.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key_fd, value_fd = (fd.message_type.fields_by_name[n] for n in ("key", "value"))
            if value_fd.message_type is not None:
                continue  # no map of messages in the contracts
            fields[fd.name] = st.dictionaries(_scalar(key_fd), _scalar(value_fd), max_size=3)
        elif fd.message_type is not None:
            if depth == 0:
                continue
            inner = hostile_message(_message_class(fd), depth - 1)
            fields[fd.name] = st.lists(inner, max_size=3) if fd.is_repeated else inner
        else:
            fields[fd.name] = (st.lists(_scalar(fd), max_size=4) if fd.is_repeated
                               else _scalar(fd))

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        chosen = draw(st.sets(st.sampled_from(sorted(fields)), max_size=len(fields))
                      if fields else st.just(set()))
        for name in sorted(chosen):
            value = draw(fields[name])
            target = getattr(message, name)
            fd = cls.DESCRIPTOR.fields_by_name[name]
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                target.update(value)
            elif fd.message_type is not None and fd.is_repeated:
                for item in value:
                    target.add().CopyFrom(item)
            elif fd.message_type is not None:
                target.CopyFrom(value)
            elif fd.is_repeated:
                target.extend(value)
            else:
                setattr(message, name, value)
        return message

    return build()


def _message_class(fd: FieldDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(fd.message_type)


@pytest.fixture(scope="session")
def hostile() -> Callable[..., st.SearchStrategy[Message]]:
    """`hostile(MessageClass)`: the strategy above (a fixture: test modules here do not import
    each other under --import-mode=importlib)."""
    return hostile_message
