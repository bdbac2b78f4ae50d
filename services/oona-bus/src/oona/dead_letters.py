"""Dead-letter records (`<stream>.dlq`): writing, listing and replaying them.

A dead letter is the original entry's fields, verbatim, plus `dlq.*` fields saying why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from oona import scripts, streams
from oona.connection import Client, atomic_across
from oona.settings import BusSettings
from oona.trimming import record_trim_reply

_PREFIX = b"dlq."
Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry as redis-py returns it (bytes mode)
_DETAIL_LIMIT = 2000


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str
    stream: str
    original_id: str
    reason: str
    detail: str
    deliveries: int
    group: str
    consumer: str
    dead_at_ms: int
    original_fields: dict[bytes, bytes]


def record(fields: Mapping[bytes, bytes] | None, *, stream: str, original_id: str, reason: str,
           detail: str, deliveries: int, group: str, consumer: str) -> dict[bytes, bytes | str]:
    out: dict[bytes, bytes | str] = dict(fields or {})
    out.update({
        b"dlq.stream": stream,
        b"dlq.original_id": original_id,
        b"dlq.reason": reason,
        b"dlq.detail": detail[:_DETAIL_LIMIT],
        b"dlq.deliveries": str(deliveries),
        b"dlq.group": group,
        b"dlq.consumer": consumer,
        b"dlq.dead_at_ms": str(time.time_ns() // 1_000_000),
    })
    return out


def parse(entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> DeadLetter:
    def text(name: str) -> str:
        return fields.get(_PREFIX + name.encode(), b"").decode(errors="replace")

    return DeadLetter(
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        stream=text("stream"), original_id=text("original_id"), reason=text("reason"),
        detail=text("detail"), deliveries=int(text("deliveries") or 0), group=text("group"),
        consumer=text("consumer"), dead_at_ms=int(text("dead_at_ms") or 0),
        original_fields={k: v for k, v in fields.items() if not k.startswith(_PREFIX)},
    )


async def list_dead_letters(redis: Client, stream: str, count: int = 100,
                            start: str = "-") -> list[DeadLetter]:
    entries = cast(list[Entry], await redis.xrange(streams.dead_letters(stream), min=start,
                                                   count=count))
    return [parse(entry_id, fields) for entry_id, fields in entries]


async def get_dead_letter(redis: Client, stream: str, entry_id: str) -> DeadLetter | None:
    entries = cast(list[Entry], await redis.xrange(streams.dead_letters(stream), min=entry_id,
                                                   max=entry_id))
    return parse(*entries[0]) if entries else None


async def replay(redis: Client, stream: str, entry_ids: Sequence[str],
                 settings: BusSettings | None = None) -> list[str]:
    """Re-publish dead letters to their stream verbatim (same event_id) and remove them from the
    DLQ, atomically per letter (in a Redis Cluster where both share a slot); returns the new
    entry ids. The stream is trimmed as a publish trims it (`settings.stream_maxlen`,
    oona.streams.trim_mode; default settings: BusSettings()). Fix the cause first: a letter
    that fails again comes back after max_deliveries."""
    new_ids = []
    dlq = streams.dead_letters(stream)
    settings = settings or BusSettings()
    trim = [settings.stream_maxlen, streams.trim_mode(stream), int(settings.stale_group_s * 1000)]
    for entry_id in entry_ids:
        letter = await get_dead_letter(redis, stream, entry_id)
        if letter is None:
            raise KeyError(f"no dead letter {entry_id} in {dlq}")
        if atomic_across(redis, stream, dlq):
            new_id, *trimmed = await redis.register_script(scripts.REPLAY)(
                keys=[stream, dlq],
                args=[entry_id, *trim, *(part for pair in letter.original_fields.items()
                                         for part in pair)])
        else:
            # A global stream and its DLQ on two cluster slots: stream first, so dying in
            # between leaves the letter in the DLQ (replayed twice at worst, never lost).
            new_id = await redis.xadd(stream, letter.original_fields)  # type: ignore[arg-type]
            await redis.xdel(dlq, entry_id)
            trimmed = await redis.register_script(scripts.TRIM)(keys=[stream], args=trim)
        record_trim_reply(stream, trimmed, settings.stream_maxlen)
        new_ids.append(new_id.decode())
    return new_ids
