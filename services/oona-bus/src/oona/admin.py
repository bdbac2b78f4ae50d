"""What operators look at: streams, groups, lag, pending entries, dead letters, trimming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError

from oona import contracts  # noqa: F401 - registers every wire message for `describe_entry`
from oona.connection import Client
from oona.envelope import ENVELOPE_FIELD
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope

LAG_COUNT_LIMIT = 10_000


@dataclass(frozen=True)
class GroupInfo:
    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    # Entries not yet delivered to the group; None if unknown. Counted by XRANGE on Redis 6.2
    # (which lacks XINFO's lag), up to LAG_COUNT_LIMIT.
    lag: int | None


@dataclass(frozen=True)
class StreamInfo:
    name: str
    length: int
    groups: list[GroupInfo]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _lag(redis: Client, stream: str, group: dict[str, Any]) -> int | None:
    if "lag" in group:  # Redis >= 7.0
        return None if group["lag"] is None else int(group["lag"])
    after = await redis.xrange(stream, min=f"({_text(group['last-delivered-id'])}",
                               count=LAG_COUNT_LIMIT)
    return len(after or ())


async def stream_info(redis: Client, stream: str) -> StreamInfo:
    groups = []
    for group in await redis.xinfo_groups(stream):
        groups.append(GroupInfo(
            name=_text(group["name"]), consumers=int(group["consumers"]),
            pending=int(group["pending"]), last_delivered_id=_text(group["last-delivered-id"]),
            lag=await _lag(redis, stream, group)))
    return StreamInfo(stream, int(await redis.xlen(stream)), groups)


async def list_streams(redis: Client, pattern: str = "*") -> list[StreamInfo]:
    names = sorted({_text(k) async for k in redis.scan_iter(match=pattern, _type="STREAM")})
    return [await stream_info(redis, name) for name in names]


async def pending_entries(redis: Client, stream: str, group: str,
                          count: int = 100) -> list[dict[str, Any]]:
    rows = await redis.xpending_range(stream, group, "-", "+", count)
    return [{"id": _text(r["message_id"]), "consumer": _text(r["consumer"]),
             "idle_ms": int(r["time_since_delivered"]), "deliveries": int(r["times_delivered"])}
            for r in rows]


async def trim(redis: Client, stream: str, maxlen: int, exact: bool = False) -> int:
    """Trim to about (or, with exact, exactly) maxlen entries; returns how many were removed."""
    return int(await redis.xtrim(stream, maxlen=maxlen, approximate=not exact))


def describe_entry(fields: dict[bytes, bytes]) -> str:
    """A readable rendering of a stream entry: its envelope and, when known, its payload."""
    try:
        envelope = Envelope.FromString(fields.get(ENVELOPE_FIELD, b""))
    except DecodeError as exc:
        return f"<undecodable envelope: {exc}>"
    shown = Envelope()
    shown.CopyFrom(envelope)
    shown.ClearField("payload")
    out: str = text_format.MessageToString(shown)
    if envelope.WhichOneof("body") != "payload":
        return out
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(
            envelope.schema.message_type)
        payload = message_factory.GetMessageClass(descriptor).FromString(envelope.payload)
    except (KeyError, DecodeError) as exc:
        return out + f"payload: <{len(envelope.payload)} bytes, not decodable: {exc}>\n"
    shown_payload: str = text_format.MessageToString(payload, indent=2)
    return out + "payload {\n" + shown_payload + "}\n"
