"""Prometheus metrics of the bus. Labels are bounded: `stream` is a stream *family*
(oona.streams.family), `reason` a DeadLetterReason, `lane` an outbox lane."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PUBLISHED = Counter("oona_published", "Messages written to a stream.", ["stream"])
CONSUMED = Counter("oona_consumed", "Messages handed to a handler.", ["stream"])
ACKED = Counter("oona_acked", "Messages acknowledged after their handler succeeded.", ["stream"])
DUPLICATES = Counter("oona_duplicates",
                     "Messages acknowledged without handling: event_id already handled.",
                     ["stream"])
REDELIVERED = Counter("oona_redelivered",
                      "Deliveries after the first: retries and reclaimed messages.", ["stream"])
DEAD_LETTERED = Counter("oona_dead_lettered", "Messages moved to the dead-letter stream.",
                        ["stream", "reason"])
DROPPED = Counter("oona_dropped", "Telemetry dropped by a full outbox (oldest first).",
                  ["stream"])
OUTBOX_DEPTH = Gauge("oona_outbox_depth", "Messages waiting in outboxes.", ["lane"])
HANDLER_SECONDS = Histogram(
    "oona_handler_seconds", "Handler run time per message.", ["stream"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
