"""Running an outbox for synchronous code: the drain lives on a private event loop in a thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import Self

from google.protobuf.message import Message

from oona.bus import open_bus
from oona.outbox import Outbox, OutboxConfig
from oona.settings import BusSettings

log = logging.getLogger(__name__)


class OutboxThread:
    """`with OutboxThread(settings, "kasmina-job7") as outbox: outbox.put_telemetry(...)`.

    `put_telemetry` never blocks the training thread; `put` applies backpressure (see Outbox).
    The thread rides out every Redis error (see Outbox.drain); `healthy` is False while it
    cannot publish (or if it died). `close` publishes what is queued, waiting at most `timeout`
    seconds, and returns how many messages were never published.
    """

    def __init__(self, settings: BusSettings, sender_id: str,
                 config: OutboxConfig | None = None, connect_timeout_s: float = 30.0) -> None:
        self.outbox = Outbox(settings, sender_id, config)
        self._settings = settings
        self._sender_id = sender_id
        self._connect_timeout_s = connect_timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"oona-outbox-{sender_id}",
                                        daemon=True)

    def start(self) -> Self:
        self._thread.start()
        if not self._ready.wait(self._connect_timeout_s):
            self.outbox.abandon()
            raise TimeoutError(f"outbox not connected after {self._connect_timeout_s}s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() or logged; the thread must not die mute
            self._error = exc
            log.exception("outbox thread failed")
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        async with open_bus(self._settings) as bus:
            self._ready.set()
            await self.outbox.drain(bus.publisher(self._sender_id))

    @property
    def healthy(self) -> bool:
        """The thread runs and its last publish succeeded: what a readiness check reads."""
        return self._thread.is_alive() and self._error is None and self.outbox.healthy

    @property
    def last_error(self) -> str | None:
        """Why it is not healthy: the last publish error, or the error that ended the thread."""
        if self._error is not None:
            return f"outbox thread died: {type(self._error).__name__}: {self._error}"
        if self.outbox.last_error is None and not self._thread.is_alive():
            return "outbox thread not running"
        return self.outbox.last_error

    @property
    def unsent(self) -> int:
        """Messages queued or in flight right now."""
        return self.outbox.depth

    def put_telemetry(self, stream: str, message: Message, *, trace_id: str = "") -> None:
        self.outbox.put_telemetry(stream, message, trace_id=trace_id)

    def put(self, stream: str, message: Message, *, trace_id: str = "",
            event_id: str | None = None, timeout: float | None = 30.0) -> None:
        self.outbox.put(stream, message, trace_id=trace_id, event_id=event_id, timeout=timeout)

    def flush(self, timeout: float | None = None) -> bool:
        return self.outbox.flush(timeout)

    def close(self, timeout: float = 10.0) -> int:
        """Publish what is queued and stop; returns how many messages were never published
        (those still queued after `timeout`, or left by a thread that died), logged as an error
        and counted in `oona_unsent_total` when not zero."""
        self.outbox.close()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Let the publish in hand finish (bounded by the socket timeout), then count.
            self.outbox.interrupt()
            self._thread.join()
        return self.outbox.abandon()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
