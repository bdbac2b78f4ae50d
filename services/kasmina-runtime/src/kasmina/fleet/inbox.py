"""`CommandInbox`: a job's command stream read in its consumer group, each delivery acked on the
bus only after the training thread has applied or refused it (DESIGN §4: one at-least-once
mechanism). A runtime that dies with commands in hand leaves them pending in the group; the
next runtime of the job takes them over at start (one job runs in one runtime at a time, so
everything pending is a dead incarnation's) and the training thread gets them again.

A job's stream lives as long as the job: a job that ends with every delivery answered and acked
deletes it (`close(delete=True)`), group and all, so a job id used again starts from an empty
stream and inherits no command of the old job; the stream's dedupe keys expire on their own
(BusSettings.dedupe_ttl_s). A job that ends with deliveries unacked keeps it, for its next
runtime. A group lost while reading (NOGROUP) is made again after the last entry the group had
delivered, so what was written meanwhile is read and nothing answered is read again.

The reader runs on a private event loop in a thread; the training thread only touches `take`
(a lock-free deque) and `ack` (a thread-safe queue)."""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from typing import NamedTuple, cast

import oona
from oona import dead_letters, metrics, scripts, streams
from oona.connection import TRANSIENT_ERRORS, Client
from oona.contracts import LifecycleCommand, schema_of
from oona.envelope import ENVELOPE_FIELD, open_envelope, parse_payload, verify_blob
from oona.errors import DeadLetterReason, InvalidMessage
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)
_SCHEMA = schema_of(LifecycleCommand)
_BLOCK_MS = 500  # XREADGROUP block: also the longest a bus ack waits to be sent
# A command still pending after this many runtimes took it has outlived every one of them.
MAX_DELIVERIES = 5
_TAKEOVER_PAGE = 100


def delete_command_streams(settings: oona.BusSettings, job_ids: list[str]) -> None:
    """Delete the command streams of jobs that ended without their runtime (a runtime killed,
    its jobs reported failed at the next start): what is pending there is for a job no runtime
    will run. A Redis error is logged: the streams then stay, as before."""
    async def body() -> None:
        async with oona.open_bus(settings) as bus:
            for job_id in job_ids:  # one by one: in a Redis Cluster each job is its own slot
                await bus.redis.unlink(streams.commands(job_id))

    if not job_ids:
        return
    try:
        asyncio.run(body())
    except (RedisError, oona.BusUnavailable) as exc:
        log.warning("command streams of %d failed jobs not deleted: %s", len(job_ids), exc)


class Incoming(NamedTuple):
    entry_id: str
    command: LifecycleCommand


class CommandInbox:
    def __init__(self, settings: oona.BusSettings, job_id: str, consumer: str) -> None:
        self.settings, self.stream = settings, streams.commands(job_id)
        self.group, self.consumer = f"kasmina-{job_id}", consumer
        self._family = streams.family(self.stream)  # the bus's own metrics, as its Consumer
        metrics.dead_letter_series(self._family)
        self.received: collections.deque[Incoming] = collections.deque()
        # Seconds from each command's publication to its arrival here.
        self.lags: collections.deque[float] = collections.deque(maxlen=10_000)
        self._acks: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._held: set[str] = set()  # entries handed to the training thread, not yet acked
        # The newest entry the group delivered (to us, or before we joined): where a group lost
        # to NOGROUP is made again.
        self._last_read: str | None = None
        self._delete = False
        self._stopping = threading.Event()
        self._stop_reading, self._not_reading = threading.Event(), threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"kasmina-commands-{job_id}",
                                        daemon=True)

    def start(self, timeout: float = 30.0) -> CommandInbox:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise oona.BusUnavailable(f"the command reader did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def ack(self, entry_ids: list[str]) -> None:
        """Acknowledge deliveries the training thread has applied or refused."""
        for entry_id in entry_ids:
            self._acks.put(entry_id)

    def stop_reading(self, timeout: float = 10.0) -> None:
        """Read no more entries; returns once a read in progress has ended, so `received`
        holds every delivery this consumer will get (a job's close answers them all)."""
        self._stop_reading.set()
        if self._thread.is_alive():
            self._not_reading.wait(timeout)

    def close(self, timeout: float = 10.0, *, delete: bool = False) -> None:
        """Send the acks queued so far, then stop. Unacked deliveries stay pending; with
        `delete` (the job ended, everything answered) the stream is deleted once every
        delivery is acked."""
        self._delete = delete
        self._stopping.set()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- the reader thread
    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() or logged; never a silent death
            self._error = exc
            log.exception("%s: command reader failed", self.stream)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        async with oona.open_bus(self.settings) as bus:
            redis = bus.redis
            self._dead_letter_script = redis.register_script(scripts.DEAD_LETTER)
            await self._ensure_group(redis)
            self._last_read = await self._delivered_up_to(redis)
            await self._take_over(redis)
            self._ready.set()
            backoff, reread = 0.05, False
            while not self._stopping.is_set():
                try:
                    await self._send_acks(redis)
                    if self._stop_reading.is_set():
                        self._not_reading.set()
                        await asyncio.sleep(0.01)
                        continue
                    if reread:  # an error may have cut a batch short: those are ours, pending
                        await self._read(redis, "0")
                        reread = False
                    await self._read(redis, ">")
                    backoff = 0.05
                except ResponseError as exc:
                    reread = True
                    if "NOGROUP" not in str(exc):  # e.g. OOM or a script error: wait, retry
                        log.warning("%s: %s; retrying in %.2f s", self.stream, exc, backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 5.0)
                        continue
                    # The stream was deleted, or Redis lost it: again from the last entry read.
                    await self._ensure_group(redis, self._last_read or "0")
                except (*TRANSIENT_ERRORS, RedisError) as exc:
                    reread = True
                    log.warning("%s: redis unavailable (%s); retrying in %.2f s", self.stream,
                                exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            try:
                await self._send_acks(redis)
                if self._delete:
                    await self._delete_if_done(redis)
            except RedisError as exc:  # left pending: the next runtime redelivers them
                log.warning("%s: acks not sent at close (%s)", self.stream, exc)

    async def _delivered_up_to(self, redis: Client) -> str | None:
        """The group's last-delivered id (where a NOGROUP recreate resumes); None if missing."""
        for group in await redis.xinfo_groups(self.stream):
            if group["name"].decode() == self.group:
                return str(group["last-delivered-id"].decode())
        return None

    async def _delete_if_done(self, redis: Client) -> None:
        """Delete the stream (and with it the group) unless a delivery is still unacked. What
        came after the last read was meant for a job that has ended (the controller lets the
        job go at its JOB_FINISHED/FAILED), so it goes too."""
        try:
            pending = (await redis.xpending(self.stream, self.group))["pending"]
        except ResponseError:  # no stream or no group: nothing to keep
            return
        if pending:
            log.info("%s: kept at the job's end: %d deliveries not acked", self.stream, pending)
            return
        await redis.unlink(self.stream)

    async def _read(self, redis: Client, start: str) -> None:
        """New entries (">"), or the ones this consumer already holds from `start` ("0")."""
        while True:
            reply = cast(list | None, await redis.xreadgroup(
                self.group, self.consumer, {self.stream: start}, count=100,
                block=_BLOCK_MS if start == ">" else None))
            entries = [e for _stream, page in reply or () for e in page]
            if start == ">" and entries:
                self._last_read = entries[-1][0].decode()
            for raw_id, fields in entries:
                if fields:  # an own pending entry trimmed meanwhile comes back empty
                    await self._receive(redis, raw_id.decode(), fields, 1)
            if start == ">" or not entries:
                return
            start = entries[-1][0].decode()

    async def _ensure_group(self, redis: Client, start: str = "0") -> None:
        try:  # "0": commands published before the job started are its first commands
            await redis.xgroup_create(self.stream, self.group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _take_over(self, redis: Client) -> None:
        """Claim what earlier runtimes of this job left pending, oldest first."""
        start = "-"
        while True:
            rows = await redis.xpending_range(self.stream, self.group, start, "+",
                                              _TAKEOVER_PAGE)
            if not rows:
                return
            ids = [row["message_id"] for row in rows]
            counts = {row["message_id"].decode(): row["times_delivered"] + 1 for row in rows}
            claimed = await redis.xclaim(self.stream, self.group, self.consumer, 0, ids)
            present = {i.decode(): f for i, f in claimed if i is not None and f is not None}
            gone = [i for i in counts if i not in present]
            if gone:  # trimmed before anyone handled them: nothing left to apply
                log.warning("%s: %d pending commands were trimmed unread", self.stream,
                            len(gone))
                await redis.xack(self.stream, self.group, *gone)
            for entry_id, fields in present.items():
                await self._receive(redis, entry_id, fields, counts[entry_id])
            if len(rows) < _TAKEOVER_PAGE:
                return
            start = "(" + rows[-1]["message_id"].decode()

    async def _receive(self, redis: Client, entry_id: str, fields: dict[bytes, bytes],
                       deliveries: int) -> None:
        if entry_id in self._held:
            return
        try:
            if deliveries > MAX_DELIVERIES:
                raise InvalidMessage(DeadLetterReason.MAX_DELIVERIES,
                                     f"pending across {deliveries - 1} runtimes of the job")
            opened = open_envelope(fields.get(ENVELOPE_FIELD), self.settings.signing_keys,
                                   {_SCHEMA.message_type: _SCHEMA.version},
                                   self.settings.max_payload_bytes, stream=self.stream)
            payload = opened.payload
            if payload is None:
                ref = opened.envelope.payload_ref
                payload = verify_blob(ref, cast(bytes | None, await redis.get(ref.key)))
            command = cast(LifecycleCommand, parse_payload(LifecycleCommand, payload))
        except InvalidMessage as exc:
            letter = dead_letters.record(fields, stream=self.stream, original_id=entry_id,
                                         reason=exc.reason, detail=exc.detail,
                                         deliveries=deliveries, group=self.group,
                                         consumer=self.consumer)
            await self._dead_letter_script(  # the stream and its DLQ share the job's hash tag
                keys=[streams.dead_letters(self.stream), self.stream],
                args=[self.settings.stream_maxlen, self.group, entry_id,
                      *(part for pair in letter.items() for part in pair)])
            metrics.DEAD_LETTERED.labels(self._family, exc.reason.value).inc()
            log.warning("%s %s dead-lettered (%s: %s)", self.stream, entry_id, exc.reason,
                        exc.detail)
            return
        metrics.CONSUMED.labels(self._family).inc()
        if deliveries > 1:
            metrics.REDELIVERED.labels(self._family).inc()
        self.lags.append(time.time() - opened.envelope.timestamp.ToNanoseconds() / 1e9)
        self._held.add(entry_id)
        self.received.append(Incoming(entry_id, command))

    async def _send_acks(self, redis: Client) -> None:
        ids = []
        while not self._acks.empty():
            ids.append(self._acks.get_nowait())
        if not ids:
            return
        try:
            await redis.xack(self.stream, self.group, *ids)
        except RedisError:
            for entry_id in ids:  # sent again on the next round
                self._acks.put(entry_id)
            raise
        self._held.difference_update(ids)
        metrics.ACKED.labels(self._family).inc(len(ids))
