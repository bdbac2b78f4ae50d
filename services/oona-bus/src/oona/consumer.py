"""Consuming a stream in a consumer group: at least once, retried, dead-lettered.

Per batch: XREADGROUP -> decode and check each entry (bad ones go straight to the DLQ) -> fetch
claim-checked payloads -> run the handler -> acknowledge the successes in one call. A handler
that raises is retried after a delay (`Retry(delay_s)` chooses it); after `max_deliveries` the
message is dead-lettered. Entries left pending by a dead consumer are reclaimed with XAUTOCLAIM
and handed to the handler. Duplicates are stopped where they arise, at publish (an event id is
written once, see oona.publisher); what remains is at-least-once: a consumer that dies after its
handler succeeded but before the ack gets that message redelivered, so handlers are idempotent.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from google.protobuf.message import Message
from redis.exceptions import ResponseError

from oona import dead_letters, metrics, scripts, streams
from oona.connection import TRANSIENT_ERRORS, Client, atomic_across
from oona.contracts import schema_of
from oona.envelope import ENVELOPE_FIELD, open_envelope, parse_payload, verify_blob
from oona.errors import DeadLetterReason, InvalidMessage, Reject, Retry
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope
from oona.settings import BusSettings

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]
_RECLAIM_PAGES = 10  # bounded reclaim work per round, so reading new messages never starves


class Delivery(NamedTuple):
    """Where a handled message came from; `delivery_count` is 1 on the first delivery.
    (A NamedTuple: one is built per message, at a third of a frozen dataclass's cost.)"""

    stream: str
    entry_id: str
    envelope: Envelope
    delivery_count: int


Handler = Callable[[Any, Delivery], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerConfig:
    batch_size: int = 100
    # Must stay below the client's socket timeout (BusSettings.socket_timeout_s).
    block_ms: int = 1000
    max_deliveries: int = 5
    # Redelivery delay after a handler error (not Retry): doubles per delivery, capped.
    retry_delay_s: float = 0.5
    retry_delay_max_s: float = 30.0
    # A message pending this long on any consumer is presumed abandoned and reclaimed.
    reclaim_idle_ms: int = 30_000
    reclaim_interval_s: float = 5.0
    shutdown_grace_s: float = 10.0
    # Where a new group starts: "0" = all retained history, "$" = only new messages.
    start_id: str = "0"
    reconnect_backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= scripts.MAX_ACK_BATCH:
            raise ValueError(f"batch_size must be in 1..{scripts.MAX_ACK_BATCH}")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be >= 1")


class Consumer:
    def __init__(self, redis: Client, settings: BusSettings, *, stream: str, group: str,
                 name: str, handlers: Mapping[type[Message], Handler],
                 config: ConsumerConfig | None = None) -> None:
        self.config = config or ConsumerConfig()
        if self.config.block_ms >= settings.socket_timeout_s * 1000:
            raise ValueError("block_ms must be below settings.socket_timeout_s")
        self._redis = redis
        self._settings = settings
        self.stream, self.group, self.name = stream, group, name
        family = streams.family(stream)
        self._family = family
        metrics.dead_letter_series(family)
        # Labelled children resolved once: labels() costs microseconds per call.
        self._consumed = metrics.CONSUMED.labels(family)
        self._acked = metrics.ACKED.labels(family)
        self._versions = {schema_of(cls).message_type: schema_of(cls).version for cls in handlers}
        self._handlers = {schema_of(cls).message_type: (cls, h) for cls, h in handlers.items()}
        self._ack_script = redis.register_script(scripts.ACK)
        self._autoclaim_ids = redis.register_script(scripts.AUTOCLAIM_IDS)
        self._dead_letter_script = redis.register_script(scripts.DEAD_LETTER)
        self._retry_heap: list[tuple[float, str]] = []
        self._retrying: set[str] = set()
        self._next_reclaim = 0.0
        # The newest entry id the group delivered to us (or had delivered when we joined): where
        # a group lost to NOGROUP is made again, so nothing read is read twice.
        self._last_read: str | None = None
        self._stopping = False
        self._stop_event: asyncio.Event | None = None

    async def ensure_group(self, start_id: str | None = None) -> None:
        """Create the group (and the stream) unless it exists, at `start_id` (default
        config.start_id); safe to call from every member."""
        try:
            await self._redis.xgroup_create(self.stream, self.group,
                                            id=start_id or self.config.start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _delivered_up_to(self) -> str | None:
        for info in cast(list[dict[str, Any]], await self._redis.xinfo_groups(self.stream)):
            if info["name"] in (self.group, self.group.encode()):
                last = info["last-delivered-id"]
                return last.decode() if isinstance(last, bytes) else str(last)
        return None

    def stop(self) -> None:
        """Stop taking messages (call from the consumer's event loop, e.g. a SIGTERM handler)."""
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def run(self) -> None:
        """Consume until `stop()`; then finish the batch in hand within `shutdown_grace_s`.
        Whatever is still unacknowledged stays pending and is reclaimed by another member."""
        self._stop_event = asyncio.Event()
        if self._stopping:
            return
        await self.ensure_group()
        self._last_read = await self._delivered_up_to()
        loop_task = asyncio.create_task(self._loop())
        stop_task = asyncio.create_task(self._stop_event.wait())
        try:
            await asyncio.wait({loop_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not loop_task.done():
                try:
                    await asyncio.wait_for(loop_task, self.config.shutdown_grace_s)
                except TimeoutError:
                    log.warning("%s: shutdown grace over; unacknowledged messages stay pending "
                                "for reclaim", self.name)
            else:
                loop_task.result()
        finally:
            stop_task.cancel()
            loop_task.cancel()

    async def _loop(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                await self.poll()
                backoff = 0.05
            except TRANSIENT_ERRORS as exc:
                log.warning("%s: redis unavailable (%s); retrying in %.2fs", self.name, exc,
                            backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.reconnect_backoff_max_s)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group vanished (deleted, or a server restarted without data):
                # made again after the last entry read, so entries written since are read and
                # none is read twice (start_id "0" would replay all the stream retains).
                log.warning("%s: group %s missing on %s; recreating after %s", self.name,
                            self.group, self.stream, self._last_read or self.config.start_id)
                await self.ensure_group(self._last_read)

    async def poll(self, block_ms: int | None = None) -> int:
        """One round: reclaim if due, redeliver due retries, read one batch. Returns how many
        entries were processed (handled or dead-lettered)."""
        processed = 0
        if time.monotonic() >= self._next_reclaim:
            processed += await self._reclaim()
            self._next_reclaim = time.monotonic() + self.config.reclaim_interval_s
        processed += await self._redeliver_due()
        block = self.config.block_ms if block_ms is None else block_ms
        if self._retry_heap:
            block = min(block, max(1, int((self._retry_heap[0][0] - time.monotonic()) * 1000)))
        reply = cast(list[tuple[bytes, list[Entry]]] | None, await self._redis.xreadgroup(
            self.group, self.name, {self.stream: ">"}, count=self.config.batch_size,
            block=block or None))
        for _stream, entries in reply or ():
            if entries:
                self._last_read = entries[-1][0].decode()
            await self._process(entries, counts=None)
            processed += len(entries)
        return processed

    async def _process(self, entries: Sequence[Entry], counts: Mapping[str, int] | None) -> None:
        acks: list[str] = []
        durations: list[float] = []
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            count = counts[entry_id] if counts else 1
            if count > self.config.max_deliveries:
                await self._dead_letter(entry_id, fields, DeadLetterReason.MAX_DELIVERIES,
                                        f"delivered {count} times without success", count)
                continue
            try:
                opened = open_envelope(fields.get(ENVELOPE_FIELD), self._settings.signing_keys,
                                       self._versions, self._settings.max_payload_bytes,
                                       stream=self.stream)
                cls, handler = self._handlers[opened.message_type]
                payload = opened.payload
                if payload is None:  # claim-checked: fetched one by one, they can be megabytes
                    ref = opened.envelope.payload_ref
                    payload = verify_blob(ref, cast(bytes | None, await self._redis.get(ref.key)))
                message = parse_payload(cls, payload)
            except InvalidMessage as exc:
                await self._dead_letter(entry_id, fields, exc.reason, exc.detail, count)
                continue
            delivery = Delivery(self.stream, entry_id, opened.envelope, count)
            started = time.perf_counter()
            try:
                await handler(message, delivery)
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the consumer
                durations.append(time.perf_counter() - started)
                await self._handler_failed(exc, delivery, fields)
                continue
            durations.append(time.perf_counter() - started)
            acks.append(entry_id)
        self._consumed.inc(len(durations))
        metrics.HANDLER_SECONDS.observe_many(self._family, durations)
        if acks:
            await self._ack_script(keys=[self.stream], args=[self.group, "\n".join(acks)])
            self._acked.inc(len(acks))

    async def _handler_failed(self, exc: Exception, delivery: Delivery,
                              fields: dict[bytes, bytes]) -> None:
        if isinstance(exc, Reject):
            log.warning("%s: handler rejected %s: %s", self.name, delivery.entry_id, exc)
            await self._dead_letter(delivery.entry_id, fields, DeadLetterReason.REJECTED,
                                    str(exc) or type(exc).__name__, delivery.delivery_count)
            return
        if isinstance(exc, Retry):
            delay, error = exc.delay_s, str(exc)
        else:
            log.warning("%s: handler failed on %s (delivery %d)", self.name, delivery.entry_id,
                        delivery.delivery_count, exc_info=exc)
            delay = min(self.config.retry_delay_s * 2 ** (delivery.delivery_count - 1),
                        self.config.retry_delay_max_s)
            error = repr(exc)
        if delivery.delivery_count >= self.config.max_deliveries:
            await self._dead_letter(delivery.entry_id, fields, DeadLetterReason.MAX_DELIVERIES,
                                    f"after {delivery.delivery_count} deliveries: {error}",
                                    delivery.delivery_count)
        else:
            heapq.heappush(self._retry_heap, (time.monotonic() + delay, delivery.entry_id))
            self._retrying.add(delivery.entry_id)

    async def _dead_letter(self, entry_id: str, fields: Mapping[bytes, bytes] | None,
                           reason: DeadLetterReason, detail: str, deliveries: int) -> None:
        letter = dead_letters.record(fields, stream=self.stream, original_id=entry_id,
                                     reason=reason, detail=detail, deliveries=deliveries,
                                     group=self.group, consumer=self.name)
        dlq = streams.dead_letters(self.stream)
        if atomic_across(self._redis, dlq, self.stream):
            await self._dead_letter_script(
                keys=[dlq, self.stream],
                args=[self._settings.stream_maxlen, self.group, entry_id,
                      *(part for pair in letter.items() for part in pair)])
        else:
            # A global stream and its DLQ on two cluster slots: no one call spans them. DLQ
            # first, then ack, so this stays at least once: dying in between leaves the entry
            # pending, it is reclaimed and dead-lettered again (a second letter, never a loss).
            await self._redis.xadd(dlq, letter,  # type: ignore[arg-type]
                                   maxlen=self._settings.stream_maxlen, approximate=True)
            await self._redis.xack(self.stream, self.group, entry_id)
        metrics.DEAD_LETTERED.labels(self._family, reason.value).inc()
        log.warning("%s: %s %s -> %s (%s: %s)", self.name, self.stream, entry_id, dlq,
                    reason.value, detail)

    async def _redeliver_due(self) -> int:
        now = time.monotonic()
        due: list[str] = []
        while self._retry_heap and self._retry_heap[0][0] <= now:
            _, entry_id = heapq.heappop(self._retry_heap)
            if entry_id in self._retrying:
                self._retrying.discard(entry_id)
                due.append(entry_id)
        return await self._claim_and_process(due) if due else 0

    async def _reclaim(self) -> int:
        """Take over entries idle longer than reclaim_idle_ms on any member (ourselves included)."""
        processed, cursor = 0, "0-0"
        for _ in range(_RECLAIM_PAGES):
            reply = await self._autoclaim_ids(
                keys=[self.stream],
                args=[self.group, self.name, self.config.reclaim_idle_ms, cursor,
                      self.config.batch_size])
            page = scripts.parse_autoclaim_reply(reply)
            if page.deleted:
                log.warning("%s: %d pending entries of %s were trimmed before being handled",
                            self.name, len(page.deleted), self.stream)
            if page.claimed:
                self._retrying.difference_update(page.claimed)
                processed += await self._claim_and_process(page.claimed)
            cursor = page.cursor
            if cursor == "0-0":
                break
        return processed

    async def _claim_and_process(self, entry_ids: list[str]) -> int:
        # XCLAIM bumps each entry's delivery counter once; XPENDING then reads it.
        claimed = cast(list[tuple[bytes | None, dict[bytes, bytes] | None]],
                       await self._redis.xclaim(self.stream, self.group, self.name, 0,
                                                list[Any](entry_ids)))
        present: list[Entry] = [(i, f) for i, f in claimed if i is not None and f is not None]
        gone = set(entry_ids) - {i.decode() for i, _ in present}
        if gone:
            # Redis 6.2 keeps deleted (trimmed) entries pending forever: nothing left to handle.
            log.warning("%s: %d pending entries of %s were trimmed before being handled",
                        self.name, len(gone), self.stream)
            await self._redis.xack(self.stream, self.group, *gone)
        if not present:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in present:
                pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
            pending = await pipe.execute()
        counts = {rows[0]["message_id"].decode(): rows[0]["times_delivered"]
                  for rows in pending if rows}
        still_ours = [(i, f) for i, f in present if i.decode() in counts]
        metrics.REDELIVERED.labels(self._family).inc(len(still_ours))
        await self._process(still_ours, counts)
        return len(still_ours)
