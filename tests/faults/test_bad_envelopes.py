"""Hypothesis-generated bad entries written raw (XADD, as anyone who reaches Redis can) onto every
stream a real `python -m tamiyo` and `python -m karn` consume: random bytes, truncated and
bit-flipped envelopes, no envelope field, unsigned, forged, wrong type and version, oversize,
missing and corrupt claim checks, undecodable payloads, genuine messages of another stream (a
signed topic that is not the stream), and payloads that parse but break the contract. Each ends
in `<stream>.dlq` with the reason its kind implies, nothing stays pending, and the process stays
up; a hostile field report Karn can store is either stored or refused."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import pytest
import redis
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oona import BusSettings, streams
from oona.contracts import (
    CommandAck,
    EpochEvent,
    EpochEventKind,
    FieldReport,
    LayerHealthReport,
    schema_of,
)
from oona.contracts import SeedStage as Stage
from oona.dead_letters import parse
from oona.envelope import ENVELOPE_FIELD, blob_key, encode
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope
from oona.signing import sign

pytestmark = pytest.mark.integration

KEY = b"faults-signing-key-0123456789abcdef0123456789abcdef"  # conftest.SIGNING_KEY
# BusSettings' default, which the services run with.
MAX_PAYLOAD = BusSettings().max_payload_bytes
# Far above a refusal's latency (milliseconds); what is not settled by then is a hang.
_SETTLE_S = 60.0
# Envelope-level damage that can land on any check before the handler, depending on where it
# falls (a flipped byte in the signature is a bad signature, in its tag an unsigned envelope).
_DAMAGED = frozenset({"undecodable", "unsigned", "bad_signature"})


@dataclass(frozen=True)
class BadEntry:
    kind: str
    fields: dict[bytes, bytes]
    reasons: frozenset[str]  # what the dead letter's reason may be; empty: may also be taken
    blob: tuple[str, bytes] | None = None


def _valid(message_class: type[Message]) -> Message:
    if message_class is LayerHealthReport:
        n = 2
        return LayerHealthReport(
            job_id="job-faults", layer_id="fc1", epoch=1, step=10, num_seeds=n,
            stage=[Stage.SEED_STAGE_DORMANT] * n, blueprint_id=[-1] * n,
            epochs_in_stage=[0] * n, strategy_id=[-1] * n, alpha=[0.0] * n,
            chunk_variance=[1.0] * n, dead_ratio=[0.0] * n, mean_abs_correlation=[0.1] * n,
            reconstruction_ratio=[1.0] * n, grad_norm=[1.0] * n, drift=[0.0] * n,
            contribution=[0.0] * n, ready_for=[Stage.SEED_STAGE_UNSPECIFIED] * n)
    if message_class is EpochEvent:
        return EpochEvent(job_id="job-faults", kind=EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED,
                          epoch=1, val_metric=0.5, val_metric_name="val_accuracy")
    if message_class is CommandAck:
        return CommandAck(command_id="cmd-1", job_id="job-faults",
                          stage_before=Stage.SEED_STAGE_DORMANT,
                          stage_after=Stage.SEED_STAGE_DORMANT, applied_epoch=1)
    return FieldReport(report_id="r-1", job_id="job-faults", layer_id="fc1", blueprint_id=2)


def _genuine(stream: str, message: Message, event_id: str, key: bytes | None = KEY) -> Envelope:
    data = encode(stream, message, BusSettings(signing_key=key), sender_id="faults",
                  event_id=event_id).data
    return Envelope.FromString(data)


def _entry(envelope: Envelope, key: bytes | None = KEY) -> dict[bytes, bytes]:
    if key is not None:
        sign(envelope, key)
    return {ENVELOPE_FIELD: envelope.SerializeToString()}


def _fails_to_parse(message_class: type[Message], payload: bytes) -> bool:
    try:
        message_class.FromString(payload)
    except DecodeError:
        return True
    return False


# Breaks of Tamiyo's contract (tamiyo.validation), one per example, on a valid message.
def _break_report(draw: st.DrawFn, report: LayerHealthReport) -> None:
    how = draw(st.sampled_from(["job_id", "layer_id", "epoch", "num_seeds", "length", "stage",
                                "ready_for", "blueprint_id", "float", "features"]))
    if how in ("job_id", "layer_id"):
        setattr(report, how, draw(_bad_id()))
    elif how == "epoch":
        report.epoch = draw(st.integers(10_000_001, 2**32 - 1))
    elif how == "num_seeds":
        report.num_seeds = draw(st.sampled_from([0, 65_537, 2**32 - 1]))
    elif how == "length":
        column = draw(st.sampled_from(["stage", "alpha", "dead_ratio", "ready_for"]))
        getattr(report, column).append(getattr(report, column)[0])
    elif how in ("stage", "ready_for"):
        getattr(report, how)[0] = draw(st.integers(12, 2**31 - 1) | st.integers(-2**31, -1))
    elif how == "blueprint_id":
        report.blueprint_id[0] = draw(st.integers(-2**31, -2))
    elif how == "float":
        column, value = draw(st.sampled_from([("alpha", 1.5), ("alpha", -0.1),
                                              ("dead_ratio", 2.0), ("chunk_variance", -1.0),
                                              ("grad_norm", -math.inf),
                                              ("mean_abs_correlation", math.inf)]))
        getattr(report, column)[1] = value
    else:
        report.features = 1  # < num_seeds 2


def _bad_id() -> st.SearchStrategy[str]:
    return st.sampled_from(["", "../x", "a/b", "{j}", "-x", ".x", "a b", "é", "a" * 129,
                            "x" * 200_000, "a\nb"])


def _break_event(draw: st.DrawFn, event: EpochEvent) -> None:
    how = draw(st.sampled_from(["job_id", "kind", "epoch", "val_metric_name"]))
    if how == "job_id":
        event.job_id = draw(_bad_id())
    elif how == "kind":
        event.kind = draw(st.sampled_from([0, 99, -1, 2**31 - 1]))
    elif how == "epoch":
        event.epoch = draw(st.integers(10_000_001, 2**32 - 1))
    else:
        event.val_metric_name = "m" * draw(st.integers(129, 100_000))


# SeedStage's wire values are 0 (unspecified) .. 11 (ROLLED_BACK): a break is outside them.
def _break_ack(draw: st.DrawFn, ack: CommandAck) -> None:
    how = draw(st.sampled_from(["job_id", "command_id", "stage_before", "stage_after",
                                "applied_epoch"]))
    if how in ("job_id", "command_id"):
        setattr(ack, how, draw(_bad_id()))
    elif how in ("stage_before", "stage_after"):
        setattr(ack, how, draw(st.integers(12, 2**31 - 1) | st.integers(-2**31, -1)))
    else:
        ack.applied_epoch = draw(st.integers(10_000_001, 2**32 - 1))


_BREAKS = {LayerHealthReport: _break_report, EpochEvent: _break_event, CommandAck: _break_ack}


KINDS = ("no_envelope_field", "random_bytes", "truncated", "bit_flip", "unsigned", "other_key",
         "wrong_type", "wrong_version", "bad_event_id", "oversize_ref", "missing_blob",
         "corrupt_blob", "payload_undecodable", "hostile_content", "wrong_topic")


@st.composite
def bad_entries(draw: st.DrawFn, stream: str, message_class: type[Message], kind: str,
                hostile) -> BadEntry:
    schema = schema_of(message_class)
    genuine = _genuine(stream, _valid(message_class), str(draw(st.uuids())))
    # Drawn, not the clock's: the example's bytes (and so its truncations) must replay exactly.
    genuine.timestamp.seconds = draw(st.integers(1_700_000_000, 1_900_000_000))
    genuine.timestamp.nanos = draw(st.integers(0, 999_999_999))
    sign(genuine, KEY)
    if kind == "no_envelope_field":
        name = draw(st.binary(min_size=1, max_size=20).filter(lambda b: b != ENVELOPE_FIELD))
        return BadEntry(kind, {name: draw(st.binary(max_size=200))}, frozenset({"undecodable"}))
    if kind == "random_bytes":
        return BadEntry(kind, {ENVELOPE_FIELD: draw(st.binary(max_size=2000))}, _DAMAGED)
    data = genuine.SerializeToString()
    if kind == "truncated":
        cut = draw(st.integers(0, len(data) - 1))
        return BadEntry(kind, {ENVELOPE_FIELD: data[:cut]}, _DAMAGED)
    if kind == "bit_flip":
        at, bit = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 7))
        flipped = bytearray(data)
        flipped[at] ^= 1 << bit
        return BadEntry(kind, {ENVELOPE_FIELD: bytes(flipped)}, _DAMAGED)
    if kind == "unsigned":
        genuine.ClearField("signature")
        return BadEntry(kind, _entry(genuine, None), frozenset({"unsigned"}))
    if kind == "other_key":
        other = draw(st.binary(min_size=1, max_size=64).filter(lambda k: k != KEY))
        return BadEntry(kind, _entry(genuine, other), frozenset({"bad_signature"}))
    if kind == "wrong_type":
        genuine.schema.message_type = draw(st.one_of(
            st.text(max_size=300), st.sampled_from([schema_of(c).message_type for c in
                                                    (*_BREAKS, FieldReport)])
        ).filter(lambda t: t != schema.message_type))
        return BadEntry(kind, _entry(genuine), frozenset({"unknown_schema"}))
    if kind == "wrong_topic":  # a genuine message of another stream, copied here
        genuine.topic = draw(st.one_of(
            st.sampled_from([streams.TELEMETRY_SEED_HEALTH, streams.EPOCH_EVENTS,
                             streams.CONTROL_ACKS, streams.FIELD_REPORTS,
                             streams.commands("job-faults"), stream + ".dlq"]),
            st.text(max_size=300)).filter(lambda t: t != stream))
        return BadEntry(kind, _entry(genuine), frozenset({"wrong_topic"}))
    if kind == "wrong_version":
        genuine.schema.version = draw(st.integers(0, 2**32 - 1).filter(
            lambda v: v != schema.version))
        return BadEntry(kind, _entry(genuine), frozenset({"unsupported_version"}))
    if kind == "bad_event_id":
        genuine.event_id = draw(st.one_of(st.just(""), st.text(min_size=129, max_size=2000),
                                          st.text(max_size=20).map(lambda t: t + "\n")))
        return BadEntry(kind, _entry(genuine), frozenset({"undecodable"}))
    if kind in ("oversize_ref", "missing_blob", "corrupt_blob"):
        payload = genuine.payload
        digest = hashlib.sha256(payload).digest()
        ref = genuine.payload_ref
        ref.key, ref.size, ref.sha256 = blob_key(digest), len(payload), digest
        blob = None
        if kind == "oversize_ref":
            ref.size = draw(st.integers(MAX_PAYLOAD + 1, 2**64 - 1))
            reasons = frozenset({"oversize"})
        elif kind == "missing_blob":
            # a key nothing stored (salted, so a real blob of this payload cannot answer it)
            ref.key = blob_key(hashlib.sha256(draw(st.binary(min_size=8, max_size=8))
                                              + b"missing").digest())
            reasons = frozenset({"claim_check_missing"})
        else:
            how = draw(st.sampled_from(["size", "sha256", "content"]))
            stored = payload
            if how == "size":
                ref.size = draw(st.integers(0, 10_000).filter(lambda s: s != len(payload)))
            elif how == "sha256":
                ref.sha256 = draw(st.binary(min_size=32, max_size=32).filter(
                    lambda d: d != digest))
            else:
                stored = bytes(b ^ 0xFF for b in payload)
            ref.key = blob_key(hashlib.sha256(stored + b"corrupt").digest())
            blob = (ref.key, stored)
            reasons = frozenset({"claim_check_corrupt"})
        return BadEntry(kind, _entry(genuine), reasons, blob)
    if kind == "payload_undecodable":
        genuine.payload = draw(st.binary(max_size=500).map(lambda b: b + b"\x0a\x7f").filter(
            lambda p: _fails_to_parse(message_class, p)))
        return BadEntry(kind, _entry(genuine), frozenset({"payload_undecodable"}))
    # hostile_content: a payload that parses
    if message_class in _BREAKS:
        message = _valid(message_class)
        _BREAKS[message_class](draw, message)
        reasons = frozenset({"rejected"})
    else:
        # Karn stores a report it can (non-finite numbers as NULL); whatever it cannot (ids
        # that are not ids, integers past a BIGINT) is refused, never retried.
        message = draw(hostile(message_class))
        reasons = frozenset()
    genuine.payload = message.SerializeToString()
    return BadEntry(kind, _entry(genuine), reasons)


def _pending(client: redis.Redis, stream: str, entry_id: bytes) -> bool:
    """Whether `entry_id` is pending in any group of `stream` (delivered, not acked)."""
    return any(client.xpending_range(stream, group["name"], min=entry_id, max=entry_id, count=1)
               for group in client.xinfo_groups(stream))


def _delivered_past(client: redis.Redis, stream: str, entry_id: bytes) -> bool:
    ms, seq = (int(p) for p in entry_id.split(b"-"))
    for group in client.xinfo_groups(stream):
        last = group["last-delivered-id"]
        lms, lseq = (int(p) for p in last.split(b"-"))
        if (lms, lseq) < (ms, seq):
            return False
    return True


def _settle(client: redis.Redis, stream: str, entry_id: bytes, dlq_from: bytes, service
            ) -> str | None:
    """The reason `entry_id` was dead-lettered with, or None when it was taken; waits until
    one of the two is certain (delivered to every group, nothing pending)."""
    deadline = time.monotonic() + _SETTLE_S
    while True:
        for dlq_id, fields in client.xrange(streams.dead_letters(stream), min=dlq_from):
            letter = parse(dlq_id, fields)
            if letter.original_id == entry_id.decode():
                assert letter.detail, f"dead letter without a detail: {letter}"
                _wait_not_pending(client, stream, entry_id, deadline, service)
                return letter.reason
        if _delivered_past(client, stream, entry_id) and not _pending(client, stream, entry_id):
            # taken: its dead letter, if any, is written before the ack (one script)
            entries = client.xrange(streams.dead_letters(stream), min=dlq_from)
            if not any(parse(i, f).original_id == entry_id.decode() for i, f in entries):
                return None
        service.assert_up()
        assert time.monotonic() < deadline, (f"{entry_id!r} neither dead-lettered nor taken "
                                             f"in {_SETTLE_S} s:\n{service.logs()[-4000:]}")
        time.sleep(0.01)


def _wait_not_pending(client, stream, entry_id, deadline, service) -> None:
    while _pending(client, stream, entry_id):
        assert time.monotonic() < deadline, f"entries left pending:\n{service.logs()[-4000:]}"
        time.sleep(0.01)


CONSUMED = [("tamiyo", streams.TELEMETRY_SEED_HEALTH, LayerHealthReport),
            ("tamiyo", streams.EPOCH_EVENTS, EpochEvent),
            ("tamiyo", streams.CONTROL_ACKS, CommandAck),
            ("karn", streams.FIELD_REPORTS, FieldReport)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("service_name", "stream", "message_class"), CONSUMED,
                         ids=[c[1] for c in CONSUMED])
def test_bad_entries_are_dead_lettered_with_their_reason_and_the_service_stays_up(
        service_name, stream, message_class, kind, fault_broker, fault_tamiyo, fault_karn,
        hostile) -> None:
    service = {"tamiyo": fault_tamiyo, "karn": fault_karn}[service_name]
    client = redis.Redis.from_url(fault_broker.url)

    # 4 streams x 15 kinds x 5 examples (20 of content that parses): 340 entries, ~10 ms each.
    @settings(max_examples=20 if kind == "hostile_content" else 5, deadline=None,
              database=None, suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large,
                                                    HealthCheck.filter_too_much])
    @given(entry=bad_entries(stream, message_class, kind, hostile))
    def check(entry: BadEntry) -> None:
        if entry.blob is not None:
            client.set(*entry.blob, ex=600)
        last = client.xrevrange(streams.dead_letters(stream), count=1)
        dlq_from = b"(" + last[0][0] if last else b"-"
        entry_id = client.xadd(stream, entry.fields)
        reason = _settle(client, stream, entry_id, dlq_from, service)
        if entry.reasons:
            assert reason in entry.reasons, (entry.kind, reason, entry.reasons)
        else:
            assert reason in (None, "rejected"), (entry.kind, reason)

    try:
        check()
    finally:
        client.close()
    service.assert_up()
    assert service.get("/readyz")[0] == 200, service.logs()[-4000:]


def test_a_report_sqlite_cannot_store_is_refused_at_once(fault_broker, fault_karn) -> None:
    client = redis.Redis.from_url(fault_broker.url)
    stream = streams.FIELD_REPORTS
    genuine = _genuine(stream, FieldReport(report_id="r-overflow", job_id="job-faults",
                                           parameters_added=2**64 - 2), "overflow-1")
    last = client.xrevrange(streams.dead_letters(stream), count=1)
    entry_id = client.xadd(stream, _entry(genuine))
    reason = _settle(client, stream, entry_id, b"(" + last[0][0] if last else b"-", fault_karn)
    client.close()
    assert reason == "rejected"


@pytest.mark.parametrize("field", ["report_id", "job_id", "layer_id"])
def test_a_field_report_whose_ids_are_not_ids_is_refused(field, fault_broker,
                                                         fault_karn) -> None:
    client = redis.Redis.from_url(fault_broker.url)
    stream = streams.FIELD_REPORTS
    report = FieldReport(report_id=f"r-ids-{field}", job_id="job-faults", layer_id="fc1")
    setattr(report, field, "../" + "x" * 20_000)  # inline: below claim_check_bytes
    last = client.xrevrange(streams.dead_letters(stream), count=1)
    entry_id = client.xadd(stream, _entry(_genuine(stream, report, f"ids-{field}")))
    reason = _settle(client, stream, entry_id, b"(" + last[0][0] if last else b"-", fault_karn)
    client.close()
    assert reason == "rejected"
