"""Envelope codec: message -> stream entry bytes (publish side), and back, with every check a
consumer needs (decode, signature, schema, size, claim-check integrity)."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from oona import signing
from oona.contracts import schema_of
from oona.errors import DeadLetterReason, InvalidMessage, PayloadTooLarge
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope, PayloadRef, Schema
from oona.settings import BusSettings

# The one field of a stream entry. Keeping everything inside the envelope makes an entry
# self-describing and lets a dead letter carry it verbatim.
ENVELOPE_FIELD = b"envelope"
_BLOB_PREFIX = "oona:blob:"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An encoded message, ready for XADD (and a SET of its blob when claim-checked)."""

    stream: str
    event_id: str
    data: bytes
    blob: tuple[str, bytes] | None = None


def blob_key(sha256: bytes) -> str:
    """Content-addressed: identical payloads share one blob, and the key names its own check."""
    return _BLOB_PREFIX + sha256.hex()


def encode(stream: str, message: Message, settings: BusSettings, *, sender_id: str,
           trace_id: str = "", event_id: str | None = None) -> Outgoing:
    payload = message.SerializeToString()
    if len(payload) > settings.max_payload_bytes:
        raise PayloadTooLarge(f"{type(message).__name__} payload of {len(payload)} bytes exceeds "
                              f"max_payload_bytes={settings.max_payload_bytes}")
    now_ns = time.time_ns()
    envelope = Envelope(
        event_id=event_id or str(uuid.uuid4()),
        sender_id=sender_id,
        timestamp=Timestamp(seconds=now_ns // 1_000_000_000, nanos=now_ns % 1_000_000_000),
        trace_id=trace_id,
        topic=stream,
        schema=schema_of(type(message)),
    )
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
    return Outgoing(stream, envelope.event_id, envelope.SerializeToString(), blob)


def decode_envelope(data: bytes | None, signing_key: bytes | None) -> Envelope:
    """Parse and authenticate an entry's envelope; InvalidMessage when it cannot be trusted."""
    if data is None:
        raise InvalidMessage(DeadLetterReason.UNDECODABLE, "entry has no envelope field")
    try:
        envelope = Envelope.FromString(data)
    except DecodeError as exc:
        raise InvalidMessage(DeadLetterReason.UNDECODABLE, f"envelope: {exc}") from None
    if not envelope.event_id or not envelope.HasField("schema"):
        raise InvalidMessage(DeadLetterReason.UNDECODABLE, "envelope lacks event_id or schema")
    if signing_key is not None:
        if not envelope.signature:
            raise InvalidMessage(DeadLetterReason.UNSIGNED, "signature required, none present")
        if not signing.verify(envelope, signing_key):
            raise InvalidMessage(DeadLetterReason.BAD_SIGNATURE, "HMAC does not match")
    return envelope


def check_schema(envelope: Envelope, known: dict[str, Schema]) -> Schema:
    """The registered schema for the envelope's message type, or InvalidMessage."""
    schema = known.get(envelope.schema.message_type)
    if schema is None:
        raise InvalidMessage(DeadLetterReason.UNKNOWN_SCHEMA,
                             f"no handler for {envelope.schema.message_type!r}")
    if envelope.schema.version != schema.version:
        raise InvalidMessage(DeadLetterReason.UNSUPPORTED_VERSION,
                             f"{schema.message_type} v{envelope.schema.version}, "
                             f"this consumer reads v{schema.version}")
    return schema


def check_size(envelope: Envelope, max_payload_bytes: int) -> None:
    size = (envelope.payload_ref.size if envelope.HasField("payload_ref")
            else len(envelope.payload))
    if size > max_payload_bytes:
        raise InvalidMessage(DeadLetterReason.OVERSIZE,
                             f"payload of {size} bytes exceeds {max_payload_bytes}")


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
