"""Errors of the bus, split into what a caller retries and what it must not."""

from __future__ import annotations

from enum import StrEnum


class Retry(Exception):
    """Raise from a handler to have the message redelivered after `delay_s` seconds.

    It still counts as a delivery: after `max_deliveries` the message goes to the dead letters.
    """

    def __init__(self, delay_s: float = 1.0, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay_s}s")
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        self.delay_s = delay_s


class Reject(Exception):
    """Raise from a handler for a message that is sound on the wire but that this consumer can
    never take (its content breaks a rule no retry will change): it goes to the dead letters at
    once, with reason `rejected` and this exception's text, instead of being redelivered
    `max_deliveries` times."""


class BusUnavailable(ConnectionError):
    """Redis could not be reached within the bounded connect retries (recoverable later)."""


class IncompatibleServer(RuntimeError):
    """The Redis server is too old for the bus (fatal: XAUTOCLAIM needs Redis >= 6.2)."""


class PayloadTooLarge(ValueError):
    """A payload exceeds `max_payload_bytes`; refused at publish time."""


class OutboxFull(RuntimeError):
    """A message that must not be dropped found the outbox full for longer than its timeout."""


class DeadLetterReason(StrEnum):
    """Why a message went to `<stream>.dlq`; stored in the dead letter's `dlq.reason` field."""

    UNDECODABLE = "undecodable"  # the entry or its envelope is not a valid protobuf Envelope
    UNSIGNED = "unsigned"  # the consumer requires signatures and there is none
    BAD_SIGNATURE = "bad_signature"  # the HMAC does not match: forged or corrupted
    UNKNOWN_SCHEMA = "unknown_schema"  # no handler for the payload's message type
    UNSUPPORTED_VERSION = "unsupported_version"  # the payload's major version is not ours
    OVERSIZE = "oversize"  # the payload exceeds max_payload_bytes
    CLAIM_CHECK_MISSING = "claim_check_missing"  # the claim-checked blob expired or never existed
    CLAIM_CHECK_CORRUPT = "claim_check_corrupt"  # the blob's size or SHA-256 does not match
    PAYLOAD_UNDECODABLE = "payload_undecodable"  # the payload does not parse as its schema
    MAX_DELIVERIES = "max_deliveries"  # the handler did not succeed within max_deliveries
    REJECTED = "rejected"  # the handler raised Reject: its content can never be taken
    STALE = "stale"  # a command older than the freshness window, or from the future
    # The envelope's (signed) topic is not the stream it was read from: a genuine message copied
    # to another stream.
    WRONG_TOPIC = "wrong_topic"
    # The outbox could not publish it: the server refused it for good (WRONGTYPE: the stream key
    # holds another type). Never consumed; replay it once the cause is fixed.
    PUBLISH_REFUSED = "publish_refused"


class InvalidMessage(Exception):
    """An inbound message that no retry can fix; it goes straight to the dead letters."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
