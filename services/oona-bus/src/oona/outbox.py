"""A bounded outbox so a training step never waits on Redis.

Producers (any thread, typically a synchronous training loop) `put` messages; one async task
`drain`s them to Redis in pipelined batches. Two lanes:
- telemetry (`put_telemetry`): never blocks; when full the oldest message is dropped and counted;
- reliable (`put`, for commands and field reports): never dropped; when full the caller waits up
  to `timeout` and then gets OutboxFull.
Messages are encoded at `put`, so the caller may reuse or mutate its message object afterwards.

The drain survives every Redis error (out of memory, connection lost, READONLY replica, timeout,
NOPERM): what failed of the batch in hand is kept and retried with bounded exponential backoff,
and the outbox reports itself unhealthy (`healthy`, `last_error`, `publishing_problems()`) until
a publish succeeds again. Each stream is published on its own, so one failing stream does not
hold the others back; messages a server refuses for good (WRONGTYPE: the key is not a stream)
go to the stream's dead letters (reason `publish_refused`, replayable once fixed). What it never
published is counted (`unsent`, `oona_unsent_total`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message
from redis.exceptions import ResponseError

from oona import metrics, streams
from oona.envelope import Outgoing, encode
from oona.errors import OutboxFull
from oona.publisher import PUBLISH_ERRORS, Publisher
from oona.settings import BusSettings

log = logging.getLogger(__name__)
_IDLE_CHECK_S = 1.0
_WARN_INTERVAL_S = 60.0
# Error replies that a wait can cure (the server full, a replica, busy, loading, a cluster
# resharding) or an operator (NOPERM: an ACL to fix; dead-lettering would need the same rights).
# On Redis 6.2 an error inside a script arrives as a plain ResponseError with the code inside, and
# an ACL refusal there has no code at all ("The user executing the script can't ...").
_TRANSIENT_CODES = re.compile(r"\b(OOM|READONLY|BUSY|LOADING|MASTERDOWN|TRYAGAIN|CLUSTERDOWN|"
                              r"NOPERM|NOAUTH|MISCONF|NOREPLICAS|NOSCRIPT|MOVED|ASK)\b|"
                              r"user executing the script can't")


def refused_for_good(error: BaseException) -> bool:
    """Whether the server refused a publish for a reason no retry changes (WRONGTYPE: the key is
    not a stream, a script error): the outbox dead-letters such messages instead of holding
    every other stream back behind them."""
    return isinstance(error, ResponseError) and not _TRANSIENT_CODES.search(str(error))

# Outboxes of this process whose last publish failed: sender id -> the error (for readiness).
_failing: dict[int, tuple[str, str]] = {}
_failing_lock = threading.Lock()


def publishing_problems() -> dict[str, str]:
    """Sender id -> last error, for every outbox of this process that cannot publish right now.
    Empty when all can: a service's readiness check fails while it is not."""
    with _failing_lock:
        return dict(_failing.values())


@dataclass(frozen=True)
class OutboxConfig:
    telemetry_capacity: int = 10_000
    reliable_capacity: int = 10_000
    batch_size: int = 500
    # Backoff while Redis refuses or cannot be reached; the batch in hand is retried, never
    # dropped.
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
        self.publish_failures = 0
        # The last publish error, None once a publish succeeds again.
        self.last_error: str | None = None
        self._reported_depth = {"telemetry": 0, "reliable": 0}
        self._next_warning = 0.0
        # Set by a running drain: wakes it, from any thread. Only called when the drain said it
        # is idle, so a busy producer pays no cross-thread call per message.
        self._wake: Callable[[], object] | None = None
        self._drain_idle = False

    @property
    def depth(self) -> int:
        """Messages queued or in flight: what would be lost if the process died now."""
        with self._lock:
            return len(self._telemetry) + len(self._reliable) + len(self._in_flight)

    @property
    def healthy(self) -> bool:
        """False from a failed publish until the next one succeeds."""
        return self.last_error is None

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
                                 f"{timeout}s; last publish error: {self.last_error}")
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

    def interrupt(self) -> None:
        """Make `drain` return at its next step (after the publish in hand), queue untouched."""
        self._abandoned = True
        self.close()

    def abandon(self) -> int:
        """Make `drain` return now and discard what is queued; returns (logs and counts in
        `oona_unsent_total`) how many messages were never published. A batch in flight counts
        as unsent: it was not confirmed."""
        self.interrupt()
        with self._lock:
            lanes = {"telemetry": len(self._telemetry),
                     "reliable": len(self._reliable) + len(self._in_flight)}
            self._telemetry.clear()
            self._reliable.clear()
            self._in_flight.clear()
            self._update_gauges()
            self._changed.notify_all()
        for lane, count in lanes.items():
            metrics.UNSENT.labels(lane).inc(count)
        unsent = sum(lanes.values())
        if unsent:
            log.error("outbox %s stopped with %d unpublished messages (%d reliable); last "
                      "publish error: %s", self._sender_id, unsent, lanes["reliable"],
                      self.last_error)
        return unsent

    def _take(self) -> list[Outgoing]:
        """The batch to publish: what failed last time (in hand, first, in order), then queued
        messages up to batch_size, so streams that publish are not held behind one that fails."""
        with self._lock:
            room = self.config.batch_size - len(self._in_flight)
            taken = 0
            while self._reliable and taken < room:
                self._in_flight.append(self._reliable.popleft())
                taken += 1
            while self._telemetry and taken < room:
                self._in_flight.append(self._telemetry.popleft())
                taken += 1
            if taken:
                self._changed.notify_all()
            self._update_gauges()
            return list(self._in_flight)

    def _published(self, sent: list[Outgoing]) -> None:
        done = {id(out) for out in sent}
        with self._changed:
            self._in_flight = [out for out in self._in_flight if id(out) not in done]
            self._update_gauges()
            self._changed.notify_all()

    def _update_gauges(self) -> None:
        # Several outboxes share the gauge (one per job in a runtime): each adds its change.
        depth = {"telemetry": len(self._telemetry),
                 "reliable": len(self._reliable) + len(self._in_flight)}
        for lane, value in depth.items():
            metrics.OUTBOX_DEPTH.labels(lane).inc(value - self._reported_depth[lane])
        self._reported_depth = depth

    def _set_health(self, error: BaseException | None) -> None:
        if error is None:
            if self.last_error is not None:
                log.info("outbox %s: publishing again", self._sender_id)
            self.last_error = None
        else:
            self.publish_failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
            metrics.PUBLISH_FAILURES.labels(type(error).__name__).inc()
        self._report_failing(self.last_error is not None)

    def _report_failing(self, failing: bool) -> None:
        with _failing_lock:
            if failing:
                _failing[id(self)] = (self._sender_id, self.last_error or "")
            else:
                _failing.pop(id(self), None)
            metrics.OUTBOXES_FAILING.set(len(_failing))

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
                error = await self._publish(publisher, batch)
                if error is not None:
                    self._set_health(error)
                    # One warning per minute of an outage, not one per retry.
                    if time.monotonic() >= self._next_warning:
                        self._next_warning = time.monotonic() + _WARN_INTERVAL_S
                        log.warning("outbox: publishing %d messages of %s failed (%s); "
                                    "retrying with backoff up to %.1fs, %d queued",
                                    len(self._in_flight), self._sender_id, self.last_error,
                                    self.config.retry_backoff_max_s, self.depth)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.config.retry_backoff_max_s)
                    continue
                backoff = self.config.retry_backoff_min_s
                self._next_warning = 0.0
        finally:
            self._wake = None
            # A stopped drain no longer holds readiness down; its leftovers are `depth`.
            self._report_failing(False)

    async def _publish(self, publisher: Publisher, batch: list[Outgoing]) -> BaseException | None:
        """Publish the batch stream by stream; what was written (or dead-lettered) leaves the
        batch in hand, the rest stays for the retry (telemetry has no dedupe: nothing written is
        written twice). Returns the first error that a retry may cure, None if none."""
        retry: BaseException | None = None
        done: list[Outgoing] = []
        for sent in await publisher.send_by_stream(batch):
            messages = [batch[i] for i in sent.indices]
            error = sent.error
            if error is not None and refused_for_good(error):
                try:
                    await publisher.dead_letter(messages, error)
                    error = None
                except PUBLISH_ERRORS as exc:
                    error = exc
            if error is None:
                done += messages
            elif retry is None:
                retry = error
        if retry is None:
            # Healthy before the batch leaves: a flush() that returns sees a healthy outbox.
            self._set_health(None)
        self._published(done)
        return retry

    def _queued(self) -> bool:
        return bool(self._telemetry or self._reliable or self._closed)
