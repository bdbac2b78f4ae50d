"""Accounting for trims of streams that must not lose (oona.scripts.oona_try_trim's reply): the
over-cap gauge, the stale-group and trim-failure counters, and their warnings. Used by the
publisher and by dead-letter replay."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from oona import metrics, streams

log = logging.getLogger("oona.publisher")  # where operators have always found these warnings
_WARN_INTERVAL_S = 60.0

# Entries kept beyond stream_maxlen per stream, as last seen by a publish of this process; the
# oona_stream_over_cap gauge is their sum per stream family.
_over_cap: dict[str, int] = {}
_over_cap_lock = threading.Lock()
# Per stream, when a failing trim may be logged again (one warning a minute, not one a publish).
_trim_warned: dict[str, float] = {}


def over_cap(stream: str) -> int:
    """Entries `stream` holds beyond stream_maxlen because a consumer group still needs them, as
    the last trim of this process saw it (0: within the cap, or not seen)."""
    with _over_cap_lock:
        return _over_cap.get(stream, 0)


def record_trim(stream: str, over: int, unread: int, maxlen: int, *, group: str | None = None,
                error: str | None = None) -> None:
    """Account for a trim's reply (oona.scripts.oona_try_trim): update the over-cap gauge, warn
    when a stream goes over its cap (`group`, a consumer group, lags: the stream grows instead of
    losing entries) and when it is back, count and warn about entries a stale group was never
    delivered, and count and warn about a trim that failed (`error`; what was written stays)."""
    family = streams.family(stream)
    if error:
        metrics.TRIM_FAILURES.labels(family).inc()
        now = time.monotonic()
        with _over_cap_lock:
            due = now >= _trim_warned.get(stream, 0.0)
            if due:
                _trim_warned[stream] = now + _WARN_INTERVAL_S
        if due:
            log.warning("%s: trimming failed (%s); the publish itself succeeded. A Redis user "
                        "needs the commands the oona README lists (ACL)", stream, error)
        return
    if unread:
        metrics.TRIMMED_UNREAD.labels(family).inc(unread)
        log.warning("%s: trimmed %d entries that a stale consumer group (every consumer idle, or "
                    "no consumer and an entry unread, beyond stale_group_s) was never delivered; "
                    "remove the group if it is gone for good (XGROUP DESTROY)", stream, unread)
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
        log.warning("%s holds %d entries beyond its cap of %d: %s has not read or acknowledged "
                    "them, so they are kept (see `python -m oona streams`)", stream, over, maxlen,
                    f"consumer group {group}" if group else "a consumer group")
    elif before and not over:
        log.info("%s is back within its cap of %d", stream, maxlen)


def _text(value: bytes | str | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def record_trim_reply(stream: str, reply: Sequence[Any], maxlen: int) -> None:
    """record_trim for the four values oona_try_trim returns."""
    over, unread, group, error = reply
    record_trim(stream, int(over), int(unread), maxlen, group=_text(group), error=_text(error))


