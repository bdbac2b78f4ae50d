"""Publishing: envelope + protobuf, XADD, batched, deduplicated; trimmed by the stream's kind:
telemetry with approximate MAXLEN, the streams that must not lose only past what every consumer
group is done with (oona.scripts, oona.streams.must_not_lose)."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence

from google.protobuf.message import Message

from oona import metrics, scripts, streams
from oona.connection import Client
from oona.envelope import Outgoing, encode
from oona.settings import BusSettings

log = logging.getLogger(__name__)

# One round trip carries at most this many messages: it bounds the reply and the time the
# publish script holds the server.
MAX_BATCH = 1000

# Entries kept beyond stream_maxlen per stream, as last seen by a publish of this process; the
# oona_stream_over_cap gauge is their sum per stream family.
_over_cap: dict[str, int] = {}
_over_cap_lock = threading.Lock()


def record_trim(stream: str, over: int, unread: int, maxlen: int) -> None:
    """Account for a trim's reply (oona.scripts.oona_trim): update the over-cap gauge, warn when
    a stream goes over its cap (a consumer group lags: the stream grows instead of losing
    entries) and when it is back, and count and warn about entries a stale group never read."""
    family = streams.family(stream)
    if unread:
        metrics.TRIMMED_UNREAD.labels(family).inc(unread)
        log.warning("%s: trimmed %d entries that a stale consumer group (every consumer idle "
                    "beyond stale_group_s) had not read; remove the group if it is gone for good "
                    "(XGROUP DESTROY)", stream, unread)
    with _over_cap_lock:
        before = _over_cap.get(stream, 0)
        if over == before:
            return
        if over:
            _over_cap[stream] = over
        else:
            _over_cap.pop(stream, None)
        metrics.OVER_CAP.labels(family).set(
            sum(v for s, v in _over_cap.items() if streams.family(s) == family))
    if over and not before:
        log.warning("%s holds %d entries beyond its cap of %d: a consumer group has not read or "
                    "acknowledged them, so they are kept (see `python -m oona streams`)",
                    stream, over, maxlen)
    elif before and not over:
        log.info("%s is back within its cap of %d", stream, maxlen)


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
                args=[self._settings.stream_maxlen, streams.trim_mode(stream),
                      int(self._settings.stale_group_s * 1000),
                      self._settings.dedupe_ttl_s if dedupe else 0,
                      scripts.dedupe_prefix(stream), "\n".join(chunk[i].event_id for i in indices),
                      *(chunk[i].data for i in indices)])
            *entry_ids, over, unread = reply
            record_trim(stream, int(over), int(unread), self._settings.stream_maxlen)
            for index, entry_id in zip(indices, entry_ids, strict=True):
                ids[index] = entry_id.decode() if entry_id is not None else None
            written = sum(1 for i in indices if ids[i] is not None)
            family = streams.family(stream)
            metrics.PUBLISHED.labels(family).inc(written)
            if written < len(indices):
                metrics.DUPLICATES.labels(family).inc(len(indices) - written)
        return ids
