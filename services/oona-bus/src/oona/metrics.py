"""Prometheus metrics of the bus. Labels are bounded: `stream` is a stream *family*
(oona.streams.family), `reason` a DeadLetterReason, `lane` an outbox lane."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from oona.errors import DeadLetterReason

if TYPE_CHECKING:
    from oona.flags import FlagDefinition

PUBLISHED = Counter("oona_published", "Messages written to a stream.", ["stream"])
CONSUMED = Counter("oona_consumed", "Messages handed to a handler.", ["stream"])
ACKED = Counter("oona_acked", "Messages acknowledged after their handler succeeded.", ["stream"])
DUPLICATES = Counter("oona_duplicates",
                     "Publishes not written: their event_id was already published.", ["stream"])
REDELIVERED = Counter("oona_redelivered",
                      "Deliveries after the first: retries and reclaimed messages.", ["stream"])
DEAD_LETTERED = Counter("oona_dead_lettered", "Messages moved to the dead-letter stream.",
                        ["stream", "reason"])
DROPPED = Counter("oona_dropped", "Telemetry dropped by a full outbox (oldest first).",
                  ["stream"])
DROPPED.labels("telemetry.seed.health")  # at 0 from the start: the first drop is an increase


def dead_letter_series(family: str) -> None:
    """Every reason's dead-letter series of a stream family at 0 (alerts see the first one)."""
    for reason in DeadLetterReason:
        DEAD_LETTERED.labels(family, reason.value)
OUTBOX_DEPTH = Gauge("oona_outbox_depth", "Messages waiting in outboxes.", ["lane"])
# `error` is the redis-py exception class (OutOfMemoryError, ConnectionError, ReadOnlyError, ...).
PUBLISH_FAILURES = Counter("oona_publish_failures",
                           "Outbox publish attempts that failed; the batch is kept and retried.",
                           ["error"])
OUTBOXES_FAILING = Gauge("oona_outboxes_failing",
                         "Outboxes of this process whose last publish attempt failed.")
UNSENT = Counter("oona_unsent", "Messages never published: still queued when an outbox stopped.",
                 ["lane"])
TRIMMED_UNREAD = Counter("oona_trimmed_unread",
                         "Entries of a must-not-lose stream trimmed before a stale consumer group "
                         "(all its consumers idle, or none and an entry unread, beyond "
                         "stale_group_s) was delivered them.", ["stream"])
TRIM_FAILURES = Counter("oona_trim_failures",
                        "Trims of a must-not-lose stream that failed after the publish was written "
                        "(typically a Redis user without XINFO/XPENDING/XRANGE/XTRIM).", ["stream"])
OVER_CAP = Gauge("oona_stream_over_cap",
                 "Entries a must-not-lose stream holds beyond stream_maxlen because a consumer "
                 "group has not read or acknowledged them (seen at the last publish).", ["stream"])


class BatchHistogram(Collector):
    """A labelled histogram that takes a batch of observations at once.

    prometheus_client's Histogram.observe takes two locks per value (2.3 µs per message on the
    reference machine, 13% of a consumer's time at 30k msg/s); this one takes one lock per batch.
    Exposed exactly like a Histogram (`_bucket`, `_sum`, `_count`).
    """

    def __init__(self, name: str, documentation: str, label: str,
                 buckets: Sequence[float]) -> None:
        self._name, self._documentation, self._label = name, documentation, label
        self._bounds = sorted(buckets)
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}  # label value -> per-bucket counts (+Inf last)
        self._sums: dict[str, float] = {}
        REGISTRY.register(self)

    def observe_many(self, label_value: str, values: Iterable[float]) -> None:
        values = list(values)
        if not values:
            return
        with self._lock:
            counts = self._counts.setdefault(label_value, [0] * (len(self._bounds) + 1))
            for value in values:
                counts[bisect.bisect_left(self._bounds, value)] += 1
            self._sums[label_value] = self._sums.get(label_value, 0.0) + sum(values)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        with self._lock:
            for label_value, counts in self._counts.items():
                cumulative, buckets = 0, []
                for bound, count in zip([*map(str, self._bounds), "+Inf"], counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                family.add_metric([label_value], buckets, self._sums[label_value])
        yield family


HANDLER_SECONDS = BatchHistogram(
    "oona_handler_seconds", "Handler run time per message.", "stream",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)


def flag_families(definitions: Mapping[str, FlagDefinition], ramp_states: Mapping[str, str]
                  ) -> list[GaugeMetricFamily]:
    """The feature flags' state (oona.flags) as gauges, for the process that watches the
    rollout to export (Karn: karn.metrics.RolloutMetrics): `flag` is a flag key, `state` one of
    oona.flags.RAMP_STATES."""
    from oona.flags import RAMP_STATES

    percent = GaugeMetricFamily(
        "oona_flag_rollout_percent", "Percentage of jobs served the flag's rollout variant "
        "(0 while the kill switch is on).", labels=["flag"])
    killed = GaugeMetricFamily("oona_flag_killed", "1 while the flag's kill switch is on.",
                               labels=["flag"])
    ramp = GaugeMetricFamily("oona_flag_ramp_state", "What the flag's last ramp did (1: this "
                             "state): idle, ramping, halted (its guard failed, the flag was "
                             "killed or changed by hand), completed.", labels=["flag", "state"])
    for flag, definition in sorted(definitions.items()):
        served = definition.rollout_percent if definition.rollout_variant else 0.0
        percent.add_metric([flag], 0.0 if definition.killed else served)
        killed.add_metric([flag], 1.0 if definition.killed else 0.0)
        for state in RAMP_STATES:
            ramp.add_metric([flag, state], 1.0 if ramp_states.get(flag, "idle") == state else 0.0)
    return [percent, killed, ramp]
