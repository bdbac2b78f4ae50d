"""Publishing: envelope + protobuf, XADD with approximate MAXLEN, batched, deduplicated."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from google.protobuf.message import Message

from oona import metrics, scripts, streams
from oona.connection import Client
from oona.envelope import Outgoing, encode
from oona.settings import BusSettings

# One round trip carries at most this many messages: it bounds the reply and the time the
# publish script holds the server.
MAX_BATCH = 1000


class Publisher:
    """Writes messages to streams. Safe to share between tasks of one event loop.

    With `dedupe` (the default) an event id is written to a stream at most once within
    `settings.dedupe_ttl_s`: a publish that failed on a connection error can simply be retried,
    and a command re-sent under its command_id is not applied twice. Telemetry, which is
    droppable and high-volume, is published without (it would cost one key per message).
    """

    def __init__(self, redis: Client, settings: BusSettings, sender_id: str) -> None:
        self._redis = redis
        self._settings = settings
        self._publish_script = redis.register_script(scripts.PUBLISH)
        self.sender_id = sender_id

    def encode(self, stream: str, message: Message, *, trace_id: str = "",
               event_id: str | None = None, dedupe: bool = True) -> Outgoing:
        return encode(stream, message, self._settings, sender_id=self.sender_id,
                      trace_id=trace_id, event_id=event_id, dedupe=dedupe)

    async def publish(self, stream: str, message: Message, *, trace_id: str = "",
                      event_id: str | None = None, dedupe: bool = True) -> str | None:
        """Publish one message; returns its stream entry id, or None when `event_id` was already
        published (nothing written). `event_id` defaults to a new UUID; commands pass their
        command_id."""
        (entry_id,) = await self.send([self.encode(stream, message, trace_id=trace_id,
                                                   event_id=event_id, dedupe=dedupe)])
        return entry_id

    async def publish_many(self, messages: Sequence[tuple[str, Message]], *,
                           trace_id: str = "", dedupe: bool = True) -> list[str | None]:
        """Publish (stream, message) pairs in one round trip per MAX_BATCH; entry ids in order."""
        return await self.send([self.encode(s, m, trace_id=trace_id, dedupe=dedupe)
                                for s, m in messages])

    async def send(self, batch: Sequence[Outgoing]) -> list[str | None]:
        """Write encoded messages: one script call per stream and dedupe mode, blobs first so a
        consumer never sees a dangling claim-check reference."""
        ids: list[str | None] = []
        for start in range(0, len(batch), MAX_BATCH):
            ids += await self._send_chunk(batch[start:start + MAX_BATCH])
        return ids

    async def _send_chunk(self, chunk: Sequence[Outgoing]) -> list[str | None]:
        blobs = [out.blob for out in chunk if out.blob is not None]
        if blobs:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, blob in blobs:
                    pipe.set(key, blob, ex=self._settings.claim_check_ttl_s)
                await pipe.execute()
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for index, out in enumerate(chunk):
            groups[(out.stream, out.dedupe)].append(index)
        ids: list[str | None] = [None] * len(chunk)
        for (stream, dedupe), indices in groups.items():
            # Direct EVALSHA, not in a pipeline: a pipeline re-checks SCRIPT EXISTS each time.
            reply = await self._publish_script(
                keys=[stream],
                args=[self._settings.stream_maxlen, self._settings.dedupe_ttl_s if dedupe else 0,
                      scripts.dedupe_prefix(stream), "\n".join(chunk[i].event_id for i in indices),
                      *(chunk[i].data for i in indices)])
            for index, entry_id in zip(indices, reply, strict=True):
                ids[index] = entry_id.decode() if entry_id is not None else None
            written = sum(1 for i in indices if ids[i] is not None)
            family = streams.family(stream)
            metrics.PUBLISHED.labels(family).inc(written)
            if written < len(indices):
                metrics.DUPLICATES.labels(family).inc(len(indices) - written)
        return ids
