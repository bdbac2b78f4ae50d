"""Bad input never crashes a consumer: each kind goes to <stream>.dlq with its reason."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os

from oona import Delivery, open_bus
from oona.contracts import EpochEvent, FieldReport, Schema
from oona.envelope import ENVELOPE_FIELD, blob_key, encode
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope
from oona.settings import BusSettings

KEY = b"fleet-secret"


def _envelope_bytes(settings: BusSettings, stream: str, message, **changes) -> bytes:
    envelope = Envelope.FromString(encode(stream, message, settings, sender_id="t").data)
    for name, value in changes.items():
        if name == "schema":
            envelope.schema.CopyFrom(value)
        else:
            setattr(envelope, name, value)
    return envelope.SerializeToString()


def test_each_kind_of_bad_input_is_dead_lettered_with_its_reason(settings, stream, pump,
                                                                fast_config):
    signed = dataclasses.replace(settings, signing_key=KEY, max_payload_bytes=1 << 20,
                                 claim_check_bytes=1024)
    forger = dataclasses.replace(signed, signing_key=b"not-the-fleet-key")
    unsigned = dataclasses.replace(signed, signing_key=None)
    big = FieldReport(report_id="r", end_reason="x" * 4000)  # claim-checked at 1 KiB
    big_blob = encode(stream, big, signed, sender_id="t").blob
    assert big_blob is not None

    async def body() -> None:
        handled: list[int] = []

        async def on_epoch(msg: EpochEvent, _: Delivery) -> None:
            handled.append(msg.epoch)

        async def on_report(msg: FieldReport, _: Delivery) -> None:
            handled.append(-1)

        async with open_bus(signed) as bus:
            consumer = bus.consumer(stream, "g", "c", {EpochEvent: on_epoch,
                                                       FieldReport: on_report}, fast_config)
            await consumer.ensure_group()
            raw = bus.redis
            event = EpochEvent(job_id="j", epoch=1)
            cases = {
                "undecodable": {ENVELOPE_FIELD: os.urandom(3) + b"\xff\xff\xff"},
                "no envelope field": {b"other": b"x"},
                "unsigned": {ENVELOPE_FIELD: encode(stream, event, unsigned, sender_id="t").data},
                "bad_signature": {ENVELOPE_FIELD: encode(stream, event, forger,
                                                         sender_id="t").data},
                "unknown_schema": {ENVELOPE_FIELD: _envelope_bytes(
                    signed, stream, event, schema=Schema(message_type="x.v1.Nope", version=1))},
                "unsupported_version": {ENVELOPE_FIELD: _envelope_bytes(
                    signed, stream, event,
                    schema=Schema(message_type="kasmina.jobs.v1.EpochEvent", version=2))},
                "payload_undecodable": {ENVELOPE_FIELD: _envelope_bytes(
                    unsigned, stream, event, payload=b"\xff\xff\xff")},
                "claim_check_missing": {ENVELOPE_FIELD: encode(stream, big, signed,
                                                               sender_id="t").data},
            }
            # Re-sign the hand-made envelopes where the reason is not about the signature.
            from oona import signing
            for name in ("unknown_schema", "unsupported_version", "payload_undecodable"):
                envelope = Envelope.FromString(cases[name][ENVELOPE_FIELD])
                signing.sign(envelope, KEY)
                cases[name] = {ENVELOPE_FIELD: envelope.SerializeToString()}
            for fields in cases.values():
                await raw.xadd(stream, fields)
            # Oversize (the sender allowed more than this consumer does) and a corrupt blob.
            roomy = dataclasses.replace(signed, max_payload_bytes=1 << 24)
            await raw.xadd(stream, {ENVELOPE_FIELD: encode(
                stream, FieldReport(end_reason="y" * (2 << 20)), roomy, sender_id="t").data})
            corrupt = encode(stream, FieldReport(report_id="c", end_reason="z" * 4000), signed,
                             sender_id="t")
            assert corrupt.blob is not None
            await raw.set(corrupt.blob[0], corrupt.blob[1][:-1] + b"!")
            await raw.xadd(stream, {ENVELOPE_FIELD: corrupt.data})
            # And a good message after all of that.
            await bus.publisher("t").publish(stream, EpochEvent(epoch=7))

            async def all_dead() -> bool:
                return await raw.xlen(stream + ".dlq") == len(cases) + 2

            await pump(consumer, until=all_dead)
            await pump(consumer, until=lambda: handled == [7])
            reasons = [f[b"dlq.reason"].decode() for _, f in await raw.xrange(stream + ".dlq")]
            assert sorted(reasons) == sorted([
                "undecodable", "undecodable", "unsigned", "bad_signature", "unknown_schema",
                "unsupported_version", "payload_undecodable", "claim_check_missing", "oversize",
                "claim_check_corrupt"])
            assert (await raw.xpending(stream, "g"))["pending"] == 0
            await raw.delete(corrupt.blob[0])

    asyncio.run(body())


def test_claim_check_round_trip_of_5_mb_is_byte_identical(settings, stream, pump, fast_config):
    payload = os.urandom(5 * 1024 * 1024)
    # 5 MB of random bytes carried in a string field as latin-1 text (no wire message has a
    # bytes field); the round trip must reproduce every byte.
    message = FieldReport(report_id="big", end_reason=payload.decode("latin-1"))
    wire = message.SerializeToString()

    async def body() -> None:
        got: list[FieldReport] = []

        async def on_report(msg: FieldReport, delivery: Delivery) -> None:
            assert delivery.envelope.HasField("payload_ref")
            got.append(msg)

        async with open_bus(settings) as bus:
            consumer = bus.consumer(stream, "g", "c", {FieldReport: on_report}, fast_config)
            await consumer.ensure_group()
            await bus.publisher("karn-test").publish(stream, message)
            stored = await bus.redis.xrange(stream)
            assert len(stored[0][1][ENVELOPE_FIELD]) < 1024  # the stream holds only the ref
            await pump(consumer, until=lambda: len(got) == 1)
            assert got[0].SerializeToString() == wire
            assert got[0].end_reason.encode("latin-1") == payload
            key = blob_key(hashlib.sha256(wire).digest())
            assert 0 < await bus.redis.ttl(key) <= settings.claim_check_ttl_s
            await bus.redis.delete(key)

    asyncio.run(body())
