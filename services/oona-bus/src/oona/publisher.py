"""Publishing: envelope + protobuf, XADD with approximate MAXLEN, pipelined batches."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from google.protobuf.message import Message
from redis.asyncio import Redis

from oona import metrics, streams
from oona.envelope import ENVELOPE_FIELD, Outgoing, encode
from oona.settings import BusSettings

# One pipeline round trip carries at most this many messages; bigger batches are split so a
# single reply never holds an unbounded number of entries.
MAX_PIPELINE = 1000


class Publisher:
    """Writes messages to streams. Safe to share between tasks of one event loop.

    A publish that fails on a connection error may or may not have been written: consumers
    deduplicate by event_id, so callers simply publish again.
    """

    def __init__(self, redis: Redis, settings: BusSettings, sender_id: str) -> None:
        self._redis = redis
        self._settings = settings
        self.sender_id = sender_id

    def encode(self, stream: str, message: Message, *, trace_id: str = "",
               event_id: str | None = None) -> Outgoing:
        return encode(stream, message, self._settings, sender_id=self.sender_id,
                      trace_id=trace_id, event_id=event_id)

    async def publish(self, stream: str, message: Message, *, trace_id: str = "",
                      event_id: str | None = None) -> str:
        """Publish one message; returns its stream entry id. `event_id` defaults to a new UUID
        (commands pass their command_id so redeliveries deduplicate on it)."""
        outgoing = self.encode(stream, message, trace_id=trace_id, event_id=event_id)
        (entry_id,) = await self.send([outgoing])
        return entry_id

    async def publish_many(self, messages: Sequence[tuple[str, Message]], *,
                           trace_id: str = "") -> list[str]:
        """Publish (stream, message) pairs in pipelined round trips; returns entry ids in order."""
        return await self.send([self.encode(s, m, trace_id=trace_id) for s, m in messages])

    async def send(self, batch: Sequence[Outgoing]) -> list[str]:
        """Write already-encoded messages (blobs first, so a consumer never sees a dangling ref)."""
        ids: list[str] = []
        for start in range(0, len(batch), MAX_PIPELINE):
            chunk = batch[start:start + MAX_PIPELINE]
            async with self._redis.pipeline(transaction=False) as pipe:
                for out in chunk:
                    if out.blob is not None:
                        pipe.set(out.blob[0], out.blob[1], ex=self._settings.claim_check_ttl_s)
                    pipe.execute_command("XADD", out.stream, "MAXLEN", "~",
                                         self._settings.stream_maxlen, "*", ENVELOPE_FIELD,
                                         out.data)
                replies = await pipe.execute()
            # SET replies (True) sit between the XADD ids; XADD ids are bytes.
            ids += [r.decode() for r in replies if isinstance(r, bytes)]
            for family, count in Counter(streams.family(out.stream) for out in chunk).items():
                metrics.PUBLISHED.labels(family).inc(count)
        return ids
