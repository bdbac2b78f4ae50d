"""A bounded outbox so a training step never waits on Redis.

Producers (any thread, typically a synchronous training loop) `put` messages; one async task
`drain`s them to Redis in pipelined batches. Two lanes:
- telemetry (`put_telemetry`): never blocks; when full the oldest message is dropped and counted;
- reliable (`put`, for commands and field reports): never dropped; when full the caller waits up
  to `timeout` and then gets OutboxFull.
Messages are encoded at `put`, so the caller may reuse or mutate its message object afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message

from oona import metrics, streams
from oona.connection import TRANSIENT_ERRORS
from oona.envelope import Outgoing, encode
from oona.errors import OutboxFull
from oona.publisher import Publisher
from oona.settings import BusSettings

log = logging.getLogger(__name__)
_IDLE_CHECK_S = 1.0


@dataclass(frozen=True)
class OutboxConfig:
    telemetry_capacity: int = 10_000
    reliable_capacity: int = 10_000
    batch_size: int = 500
    # Backoff while Redis is unreachable; the batch in hand is retried, never dropped.
    retry_backoff_min_s: float = 0.05
    retry_backoff_max_s: float = 2.0


class Outbox:
    def __init__(self, settings: BusSettings, sender_id: str,
                 config: OutboxConfig | None = None) -> None:
        self.config = config or OutboxConfig()
        self._settings = settings
        self._sender_id = sender_id
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # space freed or a batch published
        self._telemetry: collections.deque[Outgoing] = collections.deque()
        self._reliable: collections.deque[Outgoing] = collections.deque()
        self._in_flight: list[Outgoing] = []
        self._closed = False
        self._abandoned = False
        self.dropped = 0
        # Set by a running drain: wakes it, from any thread. Only called when the drain said it
        # is idle, so a busy producer pays no cross-thread call per message.
        self._wake: Callable[[], object] | None = None
        self._drain_idle = False

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._telemetry) + len(self._reliable) + len(self._in_flight)

    def _encode(self, stream: str, message: Message, trace_id: str, event_id: str | None,
                dedupe: bool) -> Outgoing:
        if self._closed:
            raise RuntimeError("outbox is closed")
        return encode(stream, message, self._settings, sender_id=self._sender_id,
                      trace_id=trace_id, event_id=event_id, dedupe=dedupe)

    def put_telemetry(self, stream: str, message: Message, *, trace_id: str = "") -> None:
        """Queue droppable telemetry; never blocks. When full, the oldest queued telemetry goes.
        Published without deduplication (see oona.publisher.Publisher)."""
        outgoing = self._encode(stream, message, trace_id, None, dedupe=False)
        with self._lock:
            if len(self._telemetry) >= self.config.telemetry_capacity:
                lost = self._telemetry.popleft()
                self.dropped += 1
                metrics.DROPPED.labels(streams.family(lost.stream)).inc()
            self._telemetry.append(outgoing)
        self._notify()

    def put(self, stream: str, message: Message, *, trace_id: str = "",
            event_id: str | None = None, timeout: float | None = 30.0) -> None:
        """Queue a message that must not be lost; waits while the lane is full (backpressure),
        raising OutboxFull after `timeout` seconds (None: wait forever)."""
        outgoing = self._encode(stream, message, trace_id, event_id, dedupe=True)
        with self._changed:
            has_room = self._changed.wait_for(
                lambda: len(self._reliable) < self.config.reliable_capacity, timeout)
            if not has_room:
                raise OutboxFull(f"reliable lane full ({self.config.reliable_capacity}) for "
                                 f"{timeout}s: is Redis reachable?")
            self._reliable.append(outgoing)
        self._notify()

    def _notify(self) -> None:
        # Pairs with drain(): it sets _drain_idle and then looks for work, we add work and then
        # read _drain_idle, so one of the two always sees the other (no lost wake-up).
        wake = self._wake
        if wake is not None and self._drain_idle:
            self._drain_idle = False
            wake()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is published; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not (self._telemetry or self._reliable or self._in_flight), timeout)

    def close(self) -> None:
        """Refuse new messages; `drain` returns once everything queued is published."""
        self._closed = True
        self._notify()

    def abandon(self) -> int:
        """Make `drain` return now; returns (and logs) how many messages were never published."""
        self._abandoned = True
        self.close()
        with self._lock:
            unsent = len(self._telemetry) + len(self._reliable) + len(self._in_flight)
        if unsent:
            log.error("outbox abandoned with %d unpublished messages", unsent)
        return unsent

    def _take(self) -> list[Outgoing]:
        with self._lock:
            if not self._in_flight:
                room = self.config.batch_size
                while self._reliable and room:
                    self._in_flight.append(self._reliable.popleft())
                    room -= 1
                while self._telemetry and room:
                    self._in_flight.append(self._telemetry.popleft())
                    room -= 1
                if self._in_flight:
                    self._changed.notify_all()
            self._update_gauges()
            return list(self._in_flight)

    def _published(self) -> None:
        with self._changed:
            self._in_flight.clear()
            self._update_gauges()
            self._changed.notify_all()

    def _update_gauges(self) -> None:
        metrics.OUTBOX_DEPTH.labels("telemetry").set(len(self._telemetry))
        metrics.OUTBOX_DEPTH.labels("reliable").set(len(self._reliable) + len(self._in_flight))

    async def drain(self, publisher: Publisher) -> None:
        """Publish queued messages until `close()` and empty (or `abandon()`). One drain per
        outbox at a time."""
        loop = asyncio.get_running_loop()
        work = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(work.set)
        backoff = self.config.retry_backoff_min_s
        try:
            while not self._abandoned:
                batch = self._take()
                if not batch:
                    if self._closed:
                        return
                    work.clear()
                    self._drain_idle = True
                    if not self._queued():
                        # The timeout only bounds how late an abandon() is noticed.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(work.wait(), _IDLE_CHECK_S)
                    self._drain_idle = False
                    continue
                try:
                    await publisher.send(batch)
                except TRANSIENT_ERRORS as exc:
                    log.warning("outbox: publishing %d messages failed (%s); retrying in %.2fs",
                                len(batch), exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.config.retry_backoff_max_s)
                    continue
                backoff = self.config.retry_backoff_min_s
                self._published()
        finally:
            self._wake = None

    def _queued(self) -> bool:
        return bool(self._telemetry or self._reliable or self._closed)
