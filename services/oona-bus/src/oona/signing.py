"""Optional HMAC-SHA256 signing of envelopes with the fleet's shared key.

The MAC covers canonical bytes built field by field (length-prefixed), not the protobuf
serialization, which is not guaranteed to be identical across libraries and versions.
"""

from __future__ import annotations

import hashlib
import hmac

from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope

_DOMAIN = b"oona.envelope.v1"


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def canonical_bytes(envelope: Envelope) -> bytes:
    """Everything a signature vouches for: fields 1-8 of the envelope."""
    parts = [
        _DOMAIN,
        envelope.event_id.encode(),
        envelope.sender_id.encode(),
        envelope.timestamp.seconds.to_bytes(8, "big", signed=True)
        + envelope.timestamp.nanos.to_bytes(4, "big", signed=True),
        envelope.trace_id.encode(),
        envelope.topic.encode(),
        envelope.schema.message_type.encode(),
        envelope.schema.version.to_bytes(4, "big"),
    ]
    body = envelope.WhichOneof("body")
    if body == "payload":
        parts += [b"payload", envelope.payload]
    elif body == "payload_ref":
        ref = envelope.payload_ref
        parts += [b"payload_ref", ref.key.encode(), ref.size.to_bytes(8, "big"), ref.sha256]
    else:
        parts.append(b"empty")
    return b"".join(_field(p) for p in parts)


def sign(envelope: Envelope, key: bytes) -> None:
    envelope.signature = hmac.digest(key, canonical_bytes(envelope), hashlib.sha256)


def verify(envelope: Envelope, key: bytes) -> bool:
    expected = hmac.digest(key, canonical_bytes(envelope), hashlib.sha256)
    return hmac.compare_digest(expected, envelope.signature)
