"""Secure by default: secrets from variables or files, the start-up rule, key rotation, the
freshness window on commands (also through a real consumer on a real Redis), and bearer tokens
on a real gRPC server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc
import pytest
import redis
from oona import Consumer, DeadLetterReason, Delivery, streams
from oona.connection import connect
from oona.contracts import FieldReport, LifecycleCommand
from oona.envelope import ENVELOPE_FIELD, decode_envelope, encode
from oona.errors import InvalidMessage
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as karn_pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as karn_grpc
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as runtime_pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as runtime_grpc
from oona.service import start_grpc_server
from oona.settings import (
    BusSettings,
    MissingSecret,
    read_secret,
    require_secrets,
)
from oona.signing import Keys, authenticated_channel, sign, with_token

OLD, NEW = b"old-fleet-key-0123456789abcdef", b"new-fleet-key-0123456789abcdef"
HOUR = 3600.0


def _encoded(topic: str, key: bytes | None, message=None, previous: tuple[bytes, ...] = ()
             ) -> bytes:
    settings = BusSettings(signing_key=key, previous_signing_keys=previous)
    return encode(topic, message or LifecycleCommand(command_id="c-1", job_id="j"), settings,
                  sender_id="tamiyo").data


def _refused(data: bytes, keys: Keys | bytes | None, now_s: float | None = None) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as refused:
        decode_envelope(data, keys, now_s)
    return refused.value


# --- secrets from variables or files ---

def test_a_secret_comes_from_its_variable_or_from_the_file_its_FILE_variant_names(tmp_path):
    path = tmp_path / "key"
    path.write_text("  from-a-file\n")
    assert read_secret("S", {"S": "inline"}) == "inline"
    assert read_secret("S", {"S_FILE": str(path)}) == "from-a-file"
    assert read_secret("S", {}) is None and read_secret("S", {"S": ""}) is None
    for env, words in (({"S": "a", "S_FILE": str(path)}, "not both"),
                       ({"S_FILE": str(tmp_path / "missing")}, "cannot read"),
                       ({"S_FILE": str(tmp_path)}, "cannot read")):
        with pytest.raises(ValueError, match=words):
            read_secret("S", env)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="S_FILE=.*empty"):
        read_secret("S", {"S_FILE": str(tmp_path / "empty")})


def test_bus_settings_read_keys_rotation_window_and_opt_out_and_never_print_them(tmp_path):
    (tmp_path / "key").write_text(NEW.decode() + "\n")
    (tmp_path / "previous").write_text(f"{OLD.decode()}\nolder-key-0123456789abcdef\n")
    (tmp_path / "pw").write_text("redis-pass\n")
    s = BusSettings.from_env({"OONA_SIGNING_KEY_FILE": str(tmp_path / "key"),
                              "OONA_SIGNING_PREVIOUS_KEYS_FILE": str(tmp_path / "previous"),
                              "OONA_REDIS_URL": "redis://h:1/0",
                              "OONA_REDIS_PASSWORD_FILE": str(tmp_path / "pw"),
                              "OONA_MAX_COMMAND_AGE_S": "60", "OONA_MAX_CLOCK_SKEW_S": "5"})
    assert (s.signing_key, s.previous_signing_keys, s.password, s.insecure) == (
        NEW, (OLD, b"older-key-0123456789abcdef"), "redis-pass", False)
    assert s.signing_keys == Keys(NEW, (OLD, b"older-key-0123456789abcdef"), 60.0, 5.0)
    for secret in ("redis-pass", NEW.decode(), OLD.decode()):
        assert secret not in repr(s) and secret not in repr(s.signing_keys)
    inline = BusSettings.from_env({"OONA_SIGNING_KEY": "k1", "OONA_INSECURE": "1",
                                   "OONA_SIGNING_PREVIOUS_KEYS": "k0, k-1"})
    assert (inline.previous_signing_keys, inline.insecure) == ((b"k0", b"k-1"), True)
    assert BusSettings.from_env({}).signing_keys is None
    with pytest.raises(ValueError, match="needs OONA_SIGNING_KEY"):
        BusSettings.from_env({"OONA_SIGNING_PREVIOUS_KEYS": "k0"})
    with pytest.raises(ValueError, match=">= 0"):
        BusSettings(signing_key=NEW, max_command_age_s=-1)


def test_an_empty_previous_keys_file_is_no_rotation_and_dedupe_keys_always_expire(tmp_path):
    """Compose mounts the previous-keys secret always, empty outside a rotation: that must start
    the service with no previous key (an empty signing key file is still refused)."""
    (tmp_path / "key").write_text(NEW.decode())
    (tmp_path / "previous").write_text("\n")
    s = BusSettings.from_env({"OONA_SIGNING_KEY_FILE": str(tmp_path / "key"),
                              "OONA_SIGNING_PREVIOUS_KEYS_FILE": str(tmp_path / "previous"),
                              "OONA_DEDUPE_TTL_S": "600"})
    assert (s.signing_key, s.previous_signing_keys, s.dedupe_ttl_s) == (NEW, (), 600)
    (tmp_path / "key").write_text("")
    with pytest.raises(ValueError, match="OONA_SIGNING_KEY_FILE=.*empty"):
        BusSettings.from_env({"OONA_SIGNING_KEY_FILE": str(tmp_path / "key")})
    # 0 would turn deduplication off inside the publish script: never a silent "no expiry".
    with pytest.raises(ValueError, match="dedupe_ttl_s"):
        BusSettings(dedupe_ttl_s=0)


def test_a_service_refuses_to_start_without_its_secrets_unless_opted_out(caplog):
    require_secrets("karn", {"OONA_SIGNING_KEY": NEW, "KARN_API_TOKEN": "t"}, insecure=False)
    with pytest.raises(MissingSecret) as refused:
        require_secrets("karn", {"OONA_SIGNING_KEY": None, "KARN_API_TOKEN": "t"},
                        insecure=False)
    message = str(refused.value)
    assert "\n" not in message and "OONA_SIGNING_KEY" in message
    assert "OONA_SIGNING_KEY_FILE" in message and "KARN_API_TOKEN" not in message
    assert "OONA_INSECURE=1" in message and isinstance(refused.value, ValueError)
    with caplog.at_level(logging.WARNING, logger="oona.settings"):
        require_secrets("karn", {"OONA_SIGNING_KEY": None, "KARN_API_TOKEN": None},
                        insecure=True)
    (line,) = caplog.records
    assert line.levelno == logging.WARNING and "OONA_SIGNING_KEY, KARN_API_TOKEN" in line.message


# --- signatures, rotation, freshness ---

def test_rotation_accepts_the_previous_key_while_signing_with_the_current_one():
    command_stream = streams.commands("j")
    signed_old = _encoded(command_stream, OLD)
    assert decode_envelope(signed_old, Keys(NEW, (OLD,))).event_id
    refused = _refused(signed_old, Keys(NEW))
    assert refused.reason == DeadLetterReason.BAD_SIGNATURE
    signed_new = _encoded(command_stream, NEW, previous=(OLD,))
    assert decode_envelope(signed_new, Keys(NEW)).event_id  # current signs, never previous
    assert _refused(signed_new, Keys(OLD)).reason == DeadLetterReason.BAD_SIGNATURE
    assert _refused(_encoded(command_stream, None), Keys(NEW)).reason == DeadLetterReason.UNSIGNED


@pytest.mark.parametrize(("offset_s", "fresh"), [(-299, True), (-301, False), (29, True),
                                                  (31, False)])
def test_a_command_outside_its_freshness_window_is_refused_saying_why(offset_s, fresh):
    data = _encoded(streams.commands("j"), NEW)
    sent = Envelope.FromString(data).timestamp.seconds
    now = sent - offset_s  # the clock the consumer judges by, `offset_s` away from the sender's
    keys = Keys(NEW, max_command_age_s=300, max_clock_skew_s=30)
    if fresh:
        assert decode_envelope(data, keys, now).event_id
    else:
        refused = _refused(data, keys, now)
        assert refused.reason == DeadLetterReason.STALE and "stale envelope" in refused.detail
        assert ("future" in refused.detail) == (offset_s > 0)


def test_only_commands_are_aged_and_a_zero_window_turns_the_age_limit_off():
    report = _encoded(streams.FIELD_REPORTS, NEW, FieldReport(report_id="r"))
    assert decode_envelope(report, Keys(NEW), now_s=1e12).event_id  # a year late: still taken
    command = _encoded(streams.commands("j"), NEW)
    assert decode_envelope(command, Keys(NEW, max_command_age_s=0), now_s=1e12).event_id
    # The default window (what BusSettings.signing_keys carries unless set) ages it.
    assert _refused(command, Keys(NEW), now_s=1e12).reason == DeadLetterReason.STALE


def _replayed(data: bytes, key: bytes, age_s: float) -> bytes:
    """A signed envelope as it was `age_s` ago: what an attacker recorded and writes again."""
    envelope = Envelope.FromString(data)
    envelope.timestamp.seconds -= int(age_s)
    sign(envelope, key)
    return envelope.SerializeToString()


def test_a_consumer_dead_letters_a_replayed_old_command_and_takes_the_fresh_one(
        settings, redis_url, pump, fast_config):
    job = f"sec-{id(settings):x}"
    stream = streams.commands(job)
    signed = dataclasses.replace(settings, signing_key=NEW)
    fresh = encode(stream, LifecycleCommand(command_id="fresh", job_id=job), signed,
                   sender_id="tamiyo")
    old = encode(stream, LifecycleCommand(command_id="old", job_id=job), signed,
                 sender_id="tamiyo")
    seen: list[str] = []

    async def handle(command: LifecycleCommand, _delivery: Delivery) -> None:
        seen.append(command.command_id)

    async def body() -> None:
        client = await connect(signed)
        try:
            await client.xadd(stream, {ENVELOPE_FIELD: _replayed(old.data, NEW, 2 * HOUR)})
            await client.xadd(stream, {ENVELOPE_FIELD: fresh.data})
            consumer = Consumer(client, signed, stream=stream, group="g", name="c",
                                handlers={LifecycleCommand: handle}, config=fast_config)
            await consumer.ensure_group()
            await pump(consumer, until=lambda: seen == ["fresh"])
        finally:
            await client.aclose()

    try:
        asyncio.run(body())
        with redis.Redis.from_url(redis_url) as client:
            (_, letter), = client.xrange(streams.dead_letters(stream))
        assert letter[b"dlq.reason"] == b"stale"
        assert b"stale envelope" in letter[b"dlq.detail"] and b"ago" in letter[b"dlq.detail"]
    finally:
        with redis.Redis.from_url(redis_url) as client:
            client.delete(stream, streams.dead_letters(stream))


@pytest.mark.parametrize("key", [NEW, None], ids=["signed", "signing-off"])
def test_a_message_copied_to_another_stream_is_dead_lettered_as_wrong_topic(
        settings, redis_url, pump, fast_config, key):
    """A genuine command of one job written to another job's command stream: its signature
    holds (the topic is signed, not changed), so only the topic check stops it."""
    victim, other = f"topic-{id(settings):x}-{key is None}", f"other-{id(settings):x}"
    stream = streams.commands(victim)
    signed = dataclasses.replace(settings, signing_key=key)
    copied = encode(streams.commands(other), LifecycleCommand(command_id="copied", job_id=other),
                    signed, sender_id="tamiyo")
    genuine = encode(stream, LifecycleCommand(command_id="genuine", job_id=victim), signed,
                     sender_id="tamiyo")
    seen: list[str] = []

    async def handle(command: LifecycleCommand, _delivery: Delivery) -> None:
        seen.append(command.command_id)

    async def body() -> None:
        client = await connect(signed)
        try:
            await client.xadd(stream, {ENVELOPE_FIELD: copied.data})
            await client.xadd(stream, {ENVELOPE_FIELD: genuine.data})
            consumer = Consumer(client, signed, stream=stream, group="g", name="c",
                                handlers={LifecycleCommand: handle}, config=fast_config)
            await consumer.ensure_group()
            await pump(consumer, until=lambda: seen == ["genuine"])
        finally:
            await client.aclose()

    try:
        asyncio.run(body())
        with redis.Redis.from_url(redis_url) as client:
            (_, letter), = client.xrange(streams.dead_letters(stream))
            assert client.xpending(stream, "g")["pending"] == 0
        assert letter[b"dlq.reason"] == DeadLetterReason.WRONG_TOPIC.value.encode()
        assert streams.commands(other).encode() in letter[b"dlq.detail"]
        assert letter[ENVELOPE_FIELD] == copied.data  # kept verbatim
    finally:
        with redis.Redis.from_url(redis_url) as client:
            client.delete(stream, streams.dead_letters(stream))


def test_decoding_checks_the_topic_only_when_told_the_stream():
    out = _encoded(streams.FIELD_REPORTS, NEW)
    assert decode_envelope(out, Keys(NEW), stream=streams.FIELD_REPORTS).topic
    assert decode_envelope(out, Keys(NEW)).topic  # no stream given: no check
    with pytest.raises(InvalidMessage) as refused:
        decode_envelope(out, Keys(NEW), stream=streams.EPOCH_EVENTS)
    assert refused.value.reason is DeadLetterReason.WRONG_TOPIC
    # A forged one is still a bad signature first: the topic is only trusted once verified.
    with pytest.raises(InvalidMessage) as refused:
        decode_envelope(out, Keys(OLD), stream=streams.EPOCH_EVENTS)
    assert refused.value.reason is DeadLetterReason.BAD_SIGNATURE


# --- bearer tokens on gRPC ---

class _Karn(karn_grpc.KarnServicer):
    def ListBlueprints(self, request, context):  # noqa: N802
        return karn_pb.ListBlueprintsResponse()


class _Runtime(runtime_grpc.KasminaRuntimeServicer):
    def WatchJob(self, request, context):  # noqa: N802
        yield runtime_pb.JobUpdate(job_id=request.job_id)


@pytest.fixture
def guarded_servers():
    started = []
    for add, servicer in ((karn_grpc.add_KarnServicer_to_server, _Karn()),
                          (runtime_grpc.add_KasminaRuntimeServicer_to_server, _Runtime())):
        started.append(start_grpc_server(with_token(add, "right-token"), servicer,
                                         "127.0.0.1", 0, name="test"))
    yield [port for _, port in started]
    for server, _ in started:
        server.stop(None)


@pytest.mark.parametrize("token", [None, "wrong-token", "right-token "])
def test_a_call_without_the_right_token_is_unauthenticated(guarded_servers, token):
    karn_port, runtime_port = guarded_servers
    with authenticated_channel(f"127.0.0.1:{karn_port}", token) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            karn_grpc.KarnStub(channel).ListBlueprints(karn_pb.ListBlueprintsRequest(),
                                                       timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with authenticated_channel(f"127.0.0.1:{runtime_port}", token) as channel:
        with pytest.raises(grpc.RpcError) as refused:  # a streaming method is guarded too
            list(runtime_grpc.KasminaRuntimeStub(channel).WatchJob(
                runtime_pb.WatchJobRequest(job_id="j"), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_call_with_the_token_is_served_and_unknown_methods_stay_unimplemented(
        guarded_servers):
    karn_port, runtime_port = guarded_servers
    with authenticated_channel(f"127.0.0.1:{karn_port}", "right-token") as channel:
        karn = karn_grpc.KarnStub(channel)
        assert karn.ListBlueprints(karn_pb.ListBlueprintsRequest(), timeout=10) == (
            karn_pb.ListBlueprintsResponse())
        with pytest.raises(grpc.RpcError) as missing:  # not implemented by the servicer
            karn.Recommend(karn_pb.RecommendRequest(), timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with authenticated_channel(f"127.0.0.1:{runtime_port}", "right-token") as channel:
        updates = list(runtime_grpc.KasminaRuntimeStub(channel).WatchJob(
            runtime_pb.WatchJobRequest(job_id="j"), timeout=10))
    assert [u.job_id for u in updates] == ["j"]


def test_no_token_means_no_check():
    server, port = start_grpc_server(with_token(karn_grpc.add_KarnServicer_to_server, None),
                                     _Karn(), "127.0.0.1", 0, name="test")
    try:
        with authenticated_channel(f"127.0.0.1:{port}", None) as channel:
            karn_grpc.KarnStub(channel).ListBlueprints(karn_pb.ListBlueprintsRequest(),
                                                       timeout=10)
    finally:
        server.stop(None)
