"""Publishing: envelope + protobuf, XADD, batched, deduplicated; trimmed by the stream's kind:
telemetry with approximate MAXLEN, the streams that must not lose only past what every consumer
group is done with (oona.scripts, oona.streams.must_not_lose)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import Message
from redis.exceptions import OutOfMemoryError, RedisError

from oona import dead_letters, metrics, scripts, streams
from oona.connection import Client
from oona.envelope import ENVELOPE_FIELD, Outgoing, encode
from oona.errors import DeadLetterReason
from oona.settings import BusSettings
from oona.trimming import over_cap, record_trim, record_trim_reply

log = logging.getLogger(__name__)

# One round trip carries at most this many messages: it bounds the reply and the time the
# publish script holds the server.
MAX_BATCH = 1000
# What a publish can fail with: every redis-py error (a connection problem, or the server refusing
# the write: OOM at maxmemory, READONLY, NOPERM, BUSY, WRONGTYPE) and socket errors that escape
# redis-py.
PUBLISH_ERRORS = (RedisError, OSError)

# Re-exported: they used to live here.
__all__ = ["MAX_BATCH", "PUBLISH_ERRORS", "Publisher", "StreamSend", "is_out_of_memory",
           "over_cap", "record_trim", "record_trim_reply"]


def is_out_of_memory(error: BaseException) -> bool:
    """The server refused a write at maxmemory (a script's refusal is a plain ResponseError on
    Redis 6.2)."""
    return isinstance(error, OutOfMemoryError) or "OOM command not allowed" in str(error)


@dataclass(frozen=True)
class StreamSend:
    """What `Publisher.send_by_stream` did with the messages of one stream (and dedupe mode):
    `indices` into the batch; `entry_ids` (None where already published) when written, or the
    `error` that kept them from being written (nothing of them was)."""

    stream: str
    indices: list[int]
    entry_ids: list[str | None] | None
    error: BaseException | None = None


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
        self._trim_script = redis.register_script(scripts.TRIM)
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
        consumer never sees a dangling claim-check reference. Raises the first error after
        trying every stream (`send_by_stream` says which were written)."""
        ids: list[str | None] = [None] * len(batch)
        for sent in await self.send_by_stream(batch):
            if sent.error is not None:
                raise sent.error
            assert sent.entry_ids is not None
            for index, entry_id in zip(sent.indices, sent.entry_ids, strict=True):
                ids[index] = entry_id
        return ids

    async def send_by_stream(self, batch: Sequence[Outgoing]) -> list[StreamSend]:
        """Write encoded messages stream by stream, each on its own: one stream that fails does
        not keep the others from being written. One result per stream and dedupe mode (and per
        MAX_BATCH chunk), in order; a stream that failed is not tried again in a later chunk, so
        its messages stay in order. Only PUBLISH_ERRORS are caught."""
        results: list[StreamSend] = []
        failed: dict[tuple[str, bool], BaseException] = {}
        for start in range(0, len(batch), MAX_BATCH):
            chunk = batch[start:start + MAX_BATCH]
            groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
            for index, out in enumerate(chunk, start):
                groups[(out.stream, out.dedupe)].append(index)
            blob_error = await self._write_blobs([out.blob for out in chunk
                                                  if out.blob is not None])
            for key, indices in groups.items():
                error = failed.get(key) or blob_error
                if error is None:
                    try:
                        results.append(StreamSend(key[0], indices,
                                                  await self._publish_stream(key[0], [
                                                      batch[i] for i in indices])))
                        continue
                    except PUBLISH_ERRORS as exc:
                        error = exc
                failed[key] = error
                results.append(StreamSend(key[0], indices, None, error))
        return results

    async def dead_letter(self, messages: Sequence[Outgoing], error: BaseException) -> None:
        """Write messages the server refused for good to their stream's dead letters (reason
        publish_refused, the envelope verbatim: `python -m oona dlq replay` publishes them once
        the cause is fixed), logged and counted. The messages share one stream (one DLQ key, so
        one cluster slot)."""
        by_dlq: dict[str, list[Outgoing]] = defaultdict(list)
        for out in messages:
            by_dlq[streams.dead_letters(out.stream)].append(out)
        for dlq, outs in by_dlq.items():
            stream = outs[0].stream
            async with self._redis.pipeline(transaction=False) as pipe:
                for out in outs:
                    pipe.xadd(dlq, dead_letters.record(  # type: ignore[arg-type]
                        {ENVELOPE_FIELD: out.data}, stream=stream, original_id="",
                        reason=DeadLetterReason.PUBLISH_REFUSED, detail=str(error), deliveries=0,
                        group="", consumer=self.sender_id),
                        maxlen=self._settings.stream_maxlen, approximate=True)
                await pipe.execute()
            metrics.DEAD_LETTERED.labels(streams.family(stream),
                                         DeadLetterReason.PUBLISH_REFUSED).inc(len(outs))
            log.error("%s refused %d messages for good (%s); they are in %s (replay with "
                      "`python -m oona dlq replay` once fixed)", stream, len(outs), error, dlq)

    async def _write_blobs(self, blobs: list[tuple[str, bytes]]) -> BaseException | None:
        if not blobs:
            return None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, blob in blobs:
                    pipe.set(key, blob, ex=self._settings.claim_check_ttl_s)
                await pipe.execute()
        except PUBLISH_ERRORS as exc:
            return exc
        return None

    async def _publish_stream(self, stream: str, messages: list[Outgoing]) -> list[str | None]:
        args = [self._settings.stream_maxlen, streams.trim_mode(stream),
                int(self._settings.stale_group_s * 1000)]
        publish_args = [*args, self._settings.dedupe_ttl_s if messages[0].dedupe else 0,
                        scripts.dedupe_prefix(stream), "\n".join(m.event_id for m in messages),
                        *(m.data for m in messages)]
        try:
            # Direct EVALSHA, not in a pipeline: a pipeline re-checks SCRIPT EXISTS each time.
            reply = await self._publish_script(keys=[stream], args=publish_args)
        except PUBLISH_ERRORS as exc:
            # At maxmemory the script is refused before it writes, so its trim never runs: a
            # stream that grew over its cap while a group lagged would stay full after the group
            # caught up. Trim alone (XTRIM is allowed at maxmemory), making room for this batch,
            # and retry once if that freed anything.
            if not (is_out_of_memory(exc) and streams.must_not_lose(stream)):
                raise
            room = max(0, self._settings.stream_maxlen - len(messages))
            length = await self._redis.xlen(stream)
            trimmed = await self._trim_script(keys=[stream], args=[room, *args[1:]])
            # Its over-cap count is against `room`: the publish below reports the stream's own.
            record_trim_reply(stream, (over_cap(stream), *trimmed[1:]),
                              self._settings.stream_maxlen)
            if trimmed[3] is not None or await self._redis.xlen(stream) >= length:
                raise
            log.info("%s: at maxmemory; trimmed what every group is done with, publishing again",
                     stream)
            reply = await self._publish_script(keys=[stream], args=publish_args)
        *entry_ids, over, unread, group, error = reply
        record_trim_reply(stream, (over, unread, group, error), self._settings.stream_maxlen)
        ids = [entry_id.decode() if entry_id is not None else None for entry_id in entry_ids]
        written = sum(1 for entry_id in ids if entry_id is not None)
        family = streams.family(stream)
        metrics.PUBLISHED.labels(family).inc(written)
        if written < len(ids):
            metrics.DUPLICATES.labels(family).inc(len(ids) - written)
        return ids
