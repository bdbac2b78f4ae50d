"""Running an outbox for synchronous code: the drain lives on a private event loop in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

from google.protobuf.message import Message

from oona.bus import open_bus
from oona.outbox import Outbox, OutboxConfig
from oona.settings import BusSettings

log = logging.getLogger(__name__)
# How long close() waits for the drain to end once it has been cancelled: closing the bus
# connection (and stopping an embedded broker) after an interrupted publish.
CANCEL_GRACE_S = 2.0


class OutboxThread:
    """`with OutboxThread(settings, "kasmina-job7") as outbox: outbox.put_telemetry(...)`.

    `put_telemetry` never blocks the training thread; `put` applies backpressure (see Outbox).
    The thread rides out every Redis error (see Outbox.drain); `healthy` is False while it
    cannot publish (or if it died). `close` publishes what is queued, returns within `timeout` +
    CANCEL_GRACE_S seconds, and returns how many messages were never published.
    """

    def __init__(self, settings: BusSettings, sender_id: str,
                 config: OutboxConfig | None = None, connect_timeout_s: float = 30.0) -> None:
        self.outbox = Outbox(settings, sender_id, config)
        self._settings = settings
        self._sender_id = sender_id
        self._connect_timeout_s = connect_timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._cancel: Callable[[], object] | None = None  # cancels the drain, from any thread
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

    async def _serve(self) -> None:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        self._cancel = lambda: loop.call_soon_threadsafe(task.cancel)
        async with open_bus(self._settings) as bus:
            self._ready.set()
            await self.outbox.drain(bus.publisher(self._sender_id))

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except asyncio.CancelledError:
            pass  # close() gave up waiting for a publish: what it held is counted as unsent
        except BaseException as exc:  # reported to start() or logged; the thread must not die mute
            self._error = exc
            log.exception("outbox thread failed")
        finally:
            self._cancel = None
            self._ready.set()

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
        """Publish what is queued and stop, within `timeout` + CANCEL_GRACE_S seconds; returns how
        many messages were never published (those still queued after `timeout`, those of a
        publish cancelled then, since unconfirmed, or left by a thread that died), logged as an
        error and counted in `oona_unsent_total` when not zero."""
        self.outbox.close()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # A publish in hand can take redis-py's retries times the socket timeout (20 s and
            # more with the defaults): cancel it rather than wait.
            self.outbox.interrupt()
            cancel = self._cancel
            if cancel is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    cancel()
            self._thread.join(CANCEL_GRACE_S)
            if self._thread.is_alive():
                log.warning("outbox %s: its thread did not stop within %.1fs of being cancelled; "
                            "left to end on its own (daemon)", self._sender_id, CANCEL_GRACE_S)
        return self.outbox.abandon()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
