"""A fuzz target for the envelope decoder, in-process: whatever bytes an entry holds (random,
or a genuine signed envelope truncated, bit-flipped, spliced or extended), `decode_envelope`,
`open_envelope`, `verify_blob` and `parse_payload` either return or raise `InvalidMessage` with
one of the DeadLetterReasons; nothing else escapes (no DecodeError, UnicodeError, ValueError,
OverflowError), with or without signing keys."""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oona import BusSettings, streams
from oona.contracts import (
    CommandAck,
    EpochEvent,
    FieldReport,
    LayerHealthReport,
    LifecycleCommand,
    schema_of,
)
from oona.envelope import decode_envelope, encode, open_envelope, parse_payload, verify_blob
from oona.errors import DeadLetterReason, InvalidMessage
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope, PayloadRef
from oona.signing import Keys, sign

KEY = b"fuzz-key-0123456789abcdef"
MESSAGES = (LayerHealthReport, EpochEvent, CommandAck, FieldReport, LifecycleCommand)
KNOWN = {schema_of(c).message_type: schema_of(c).version for c in MESSAGES}
_REASONS = frozenset(DeadLetterReason)
FUZZ = settings(max_examples=2000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _genuine(message_class, job: str, event_id: str, sent_s: int) -> bytes:
    stream = streams.commands(job) if message_class is LifecycleCommand else "fuzz"
    message = message_class()
    for name in ("job_id", "command_id", "report_id"):
        if name in message_class.DESCRIPTOR.fields_by_name:
            setattr(message, name, job)
    envelope = Envelope.FromString(encode(stream, message, BusSettings(signing_key=KEY),
                                          sender_id="fuzz", event_id=event_id).data)
    # the example's, not the clock's: its bytes (and so its mutations) must replay exactly
    envelope.timestamp.seconds, envelope.timestamp.nanos = sent_s, 0
    sign(envelope, KEY)
    return envelope.SerializeToString()


@st.composite
def entry_bytes(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["random", "truncate", "flip", "splice", "extend"]))
    if how == "random":
        return draw(st.binary(max_size=4096))
    data = _genuine(draw(st.sampled_from(MESSAGES)), "job-1", str(draw(st.uuids())),
                    draw(st.integers(-2**40, 2**40)))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data)))]
    if how == "flip":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            flipped[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(flipped)
    at = draw(st.integers(0, len(data)))
    chunk = draw(st.binary(min_size=1, max_size=512))
    return data[:at] + chunk + (data[at:] if how == "splice" else b"")


def _only_typed(call) -> None:
    try:
        call()
    except InvalidMessage as exc:
        assert exc.reason in _REASONS and exc.detail
    # anything else propagates and fails the example


@FUZZ
@given(data=st.one_of(st.none(), entry_bytes()),
       keys=st.sampled_from([None, Keys(KEY), Keys(b"other", (KEY,))]),
       now_s=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       max_payload=st.integers(0, 2**64))
def test_the_decoder_raises_only_its_typed_error(data, keys, now_s, max_payload) -> None:
    _only_typed(lambda: decode_envelope(data, keys, now_s))
    _only_typed(lambda: open_envelope(data, keys, KNOWN, max_payload))


@FUZZ
@given(message_class=st.sampled_from(MESSAGES), payload=st.binary(max_size=4096))
def test_a_payload_parses_or_raises_payload_undecodable(message_class, payload) -> None:
    try:
        parse_payload(message_class, payload)
    except InvalidMessage as exc:
        assert exc.reason is DeadLetterReason.PAYLOAD_UNDECODABLE


@FUZZ
@given(size=st.integers(0, 2**64 - 1), sha256=st.binary(max_size=64),
       blob=st.one_of(st.none(), st.binary(max_size=256)))
def test_a_claim_check_is_verified_or_refused_with_a_claim_check_reason(size, sha256,
                                                                         blob) -> None:
    ref = PayloadRef(key="oona:blob:x", size=size, sha256=sha256)
    try:
        assert verify_blob(ref, blob) == blob
        assert len(blob) == size and hashlib.sha256(blob).digest() == sha256
    except InvalidMessage as exc:
        assert exc.reason in (DeadLetterReason.CLAIM_CHECK_MISSING,
                              DeadLetterReason.CLAIM_CHECK_CORRUPT)
