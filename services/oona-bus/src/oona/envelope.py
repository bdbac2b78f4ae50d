"""Envelope codec: message -> stream entry bytes (publish side), and back, with every check a
consumer needs (decode, signature, freshness, schema, size, claim-check integrity)."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Mapping
from typing import NamedTuple

from google.protobuf.message import DecodeError, Message

from oona import signing
from oona.contracts import schema_of
from oona.errors import DeadLetterReason, InvalidMessage, PayloadTooLarge
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope, PayloadRef
from oona.settings import BusSettings
from oona.signing import Keys

# The one field of a stream entry (also spelled out in oona.scripts.PUBLISH). Keeping everything
# inside the envelope makes an entry self-describing and lets a dead letter carry it verbatim.
ENVELOPE_FIELD = b"envelope"
_BLOB_PREFIX = "oona:blob:"


# Event ids travel '\n'-joined to the consumer's Lua scripts (oona.scripts).
_MAX_EVENT_ID = 128


class Outgoing(NamedTuple):
    """An encoded message, ready for XADD (and a SET of its blob when claim-checked)."""

    stream: str
    event_id: str
    data: bytes
    blob: tuple[str, bytes] | None = None
    # Write at most once per event id (oona.publisher.Publisher).
    dedupe: bool = True


def new_event_id() -> str:
    """A random (version 4) UUID string. Drawn from `random` rather than `uuid.uuid4()`, whose
    os.urandom call costs ~6 µs per message; ids need uniqueness, not secrecy, and `random` is
    seeded from os.urandom and reseeded in forked children."""
    h = f"{random.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def valid_event_id(event_id: str) -> bool:
    return 0 < len(event_id) <= _MAX_EVENT_ID and "\n" not in event_id


def blob_key(sha256: bytes) -> str:
    """Content-addressed: identical payloads share one blob, and the key names its own check."""
    return _BLOB_PREFIX + sha256.hex()


def encode(stream: str, message: Message, settings: BusSettings, *, sender_id: str,
           trace_id: str = "", event_id: str | None = None, dedupe: bool = True) -> Outgoing:
    payload = message.SerializeToString()
    if len(payload) > settings.max_payload_bytes:
        raise PayloadTooLarge(f"{type(message).__name__} payload of {len(payload)} bytes exceeds "
                              f"max_payload_bytes={settings.max_payload_bytes}")
    if event_id is None:
        event_id = new_event_id()
    elif not valid_event_id(event_id):
        raise ValueError(f"event_id must be 1-{_MAX_EVENT_ID} characters without a newline, "
                         f"got {event_id!r}")
    envelope = Envelope(event_id=event_id, sender_id=sender_id, trace_id=trace_id, topic=stream,
                        schema=schema_of(type(message)))
    envelope.timestamp.seconds, envelope.timestamp.nanos = divmod(time.time_ns(), 1_000_000_000)
    blob = None
    if len(payload) > settings.claim_check_bytes:
        digest = hashlib.sha256(payload).digest()
        key = blob_key(digest)
        envelope.payload_ref.CopyFrom(PayloadRef(key=key, size=len(payload), sha256=digest))
        blob = (key, payload)
    else:
        envelope.payload = payload
    if settings.signing_key is not None:
        signing.sign(envelope, settings.signing_key)
    return Outgoing(stream, event_id, envelope.SerializeToString(), blob, dedupe)


def decode_envelope(data: bytes | None, keys: Keys | None,
                    now_s: float | None = None, *, stream: str | None = None) -> Envelope:
    """Parse and authenticate an entry's envelope; InvalidMessage when it cannot be trusted.

    `keys`: BusSettings.signing_keys (None: signing off); `now_s`: the clock freshness is
    judged by (time.time()); `stream`: the stream the entry was read from, which must be the
    envelope's topic (the topic is signed, so a genuine message copied to another stream is
    refused; None: not checked)."""
    if data is None:
        raise InvalidMessage(DeadLetterReason.UNDECODABLE, "entry has no envelope field")
    envelope = Envelope()
    try:
        envelope.ParseFromString(data)
    except DecodeError as exc:
        raise InvalidMessage(DeadLetterReason.UNDECODABLE, f"envelope: {exc}") from None
    if not valid_event_id(envelope.event_id):
        raise InvalidMessage(DeadLetterReason.UNDECODABLE,
                             f"invalid event_id {envelope.event_id[:40]!r}")
    if keys is None:
        _check_topic(envelope, stream)
        return envelope
    if not envelope.signature:
        raise InvalidMessage(DeadLetterReason.UNSIGNED, "signature required, none present")
    if not keys.verify(envelope):
        raise InvalidMessage(DeadLetterReason.BAD_SIGNATURE,
                             "HMAC matches none of the fleet's keys (forged, corrupted, or "
                             "signed with a key this consumer does not have)")
    # Where it was read before how old it is: a copy on another stream is wrong_topic at any age
    # (an old command copied onto the epoch stream is not a stale epoch event).
    _check_topic(envelope, stream)
    stale = keys.staleness(envelope, time.time() if now_s is None else now_s)
    if stale is not None:
        raise InvalidMessage(DeadLetterReason.STALE, f"stale envelope: {stale}")
    return envelope


def _check_topic(envelope: Envelope, stream: str | None) -> None:
    if stream is not None and envelope.topic != stream:
        raise InvalidMessage(DeadLetterReason.WRONG_TOPIC,
                             f"envelope topic {envelope.topic[:200]!r} read from {stream!r} "
                             "(a message copied from another stream)")


class Opened(NamedTuple):
    envelope: Envelope
    message_type: str
    # The inline payload; None when it is claim-checked (envelope.payload_ref).
    payload: bytes | None


def open_envelope(data: bytes | None, keys: Keys | bytes | None, known: Mapping[str, int],
                  max_payload_bytes: int, *, stream: str | None = None) -> Opened:
    """decode_envelope (`stream`: the stream read, see there), then check the schema against
    `known` (message type -> version) and the payload's size. Fields are read once each: upb
    builds a Python object per access."""
    envelope = decode_envelope(data, keys, stream=stream)
    schema = envelope.schema
    message_type = schema.message_type
    version = known.get(message_type)
    if version is None:
        raise InvalidMessage(DeadLetterReason.UNKNOWN_SCHEMA, f"no handler for {message_type!r}")
    if schema.version != version:
        raise InvalidMessage(DeadLetterReason.UNSUPPORTED_VERSION,
                             f"{message_type} v{schema.version}, this consumer reads v{version}")
    payload: bytes | None = None
    if envelope.WhichOneof("body") == "payload_ref":
        size = envelope.payload_ref.size
    else:
        payload = envelope.payload
        size = len(payload)
    if size > max_payload_bytes:
        raise InvalidMessage(DeadLetterReason.OVERSIZE,
                             f"payload of {size} bytes exceeds {max_payload_bytes}")
    return Opened(envelope, message_type, payload)


def verify_blob(ref: PayloadRef, blob: bytes | None) -> bytes:
    """The claim-checked payload after checking it is there and is what the sender stored."""
    if blob is None:
        raise InvalidMessage(DeadLetterReason.CLAIM_CHECK_MISSING,
                             f"blob {ref.key} is missing (expired or never stored)")
    if len(blob) != ref.size:
        raise InvalidMessage(DeadLetterReason.CLAIM_CHECK_CORRUPT,
                             f"blob {ref.key} has {len(blob)} bytes, expected {ref.size}")
    if hashlib.sha256(blob).digest() != ref.sha256:
        raise InvalidMessage(DeadLetterReason.CLAIM_CHECK_CORRUPT,
                             f"blob {ref.key} does not match its sha256")
    return blob


def parse_payload(message_class: type[Message], payload: bytes) -> Message:
    try:
        return message_class.FromString(payload)
    except DecodeError as exc:
        raise InvalidMessage(DeadLetterReason.PAYLOAD_UNDECODABLE,
                             f"{message_class.DESCRIPTOR.full_name}: {exc}") from None
