"""The worker: field reports from the bus into the store, each acknowledged only after its
commit (oona acks when the handler returns)."""

from __future__ import annotations

import asyncio
import logging
import time

from oona import Bus, Consumer, ConsumerConfig, Delivery, Reject, Retry, ids, streams
from oona.contracts import FieldReport
from sqlalchemy.exc import DBAPIError

from karn import metrics
from karn.store import FieldReportStore, is_transient, stage_name

log = logging.getLogger(__name__)

CONSUMER_GROUP = "karn"
_RETRY_DELAY_S = 0.5
_RETRY_DELAY_MAX_S = 30.0


class FieldReportWorker:
    def __init__(self, bus: Bus, store: FieldReportStore, consumer_name: str,
                 config: ConsumerConfig | None = None, *,
                 stream: str = streams.FIELD_REPORTS) -> None:
        self._store = store
        self.consumer: Consumer = bus.consumer(stream, CONSUMER_GROUP, consumer_name,
                                               {FieldReport: self.handle}, config)
        # A report waiting out its retry back-off is idle in the group: the back-off stays below
        # half the reclaim idle time, so a live replica never takes over another's retries.
        self._retry_max_s = min(_RETRY_DELAY_MAX_S, self.consumer.config.reclaim_idle_ms / 2e3)

    async def run(self) -> None:
        """Consume until `stop()`, then finish the batch in hand (bounded by the consumer's
        shutdown grace)."""
        await self.consumer.run()

    def stop(self) -> None:
        self.consumer.stop()

    async def handle(self, report: FieldReport, delivery: Delivery) -> None:
        if not report.report_id:
            # The envelope's event_id is the bus's own idempotency key, so redeliveries of this
            # entry still collapse to one row.
            log.warning("field report without report_id in %s; keyed by event_id %s",
                        delivery.entry_id, delivery.envelope.event_id)
            report.report_id = delivery.envelope.event_id
        problem = _refusal(report)
        if problem:  # never storable: dead-lettered at once, not retried
            raise Reject(problem)
        started = time.perf_counter()
        try:
            # The store is synchronous (and may wait on a lock or the network): off the loop.
            inserted = await asyncio.to_thread(self._store.record, report)
        except DBAPIError as exc:
            if not is_transient(exc):  # this report breaks a rule of the schema: never storable
                raise Reject(f"the database refused it: {exc.orig}") from exc
            metrics.STORE_ERRORS.inc()
            delay = min(_RETRY_DELAY_S * 2 ** (delivery.delivery_count - 1), self._retry_max_s)
            log.warning("database unavailable storing %s (delivery %d): %s; retrying in %.1fs",
                        report.report_id, delivery.delivery_count, exc.orig, delay)
            raise Retry(delay, f"database unavailable: {exc.orig}") from exc
        metrics.STORE_SECONDS.observe(time.perf_counter() - started)
        if inserted:
            outcome = metrics.outcome_label(stage_name(report.final_stage))
            metrics.REPORTS_STORED.labels(outcome).inc()
            metrics.REPORTS_BY_PATH.labels(
                metrics.path_label(report.execution_path or "chunked"), outcome).inc()
        else:
            metrics.REPORT_DUPLICATES.inc()


_MAX_REPORT_ID = 256  # the column's width
_MAX_INT64 = 2**63 - 1  # what a database BIGINT holds (the wire's uint64 goes further)


def _refusal(report: FieldReport) -> str | None:
    """Why a report can never be stored, or None: ids that are not ids (oona.ids for the job and
    layer; the report id, which Kasmina builds as job/layer/seed/epoch, bounded and printable)
    and integers past a BIGINT."""
    for what, value in (("job_id", report.job_id), ("layer_id", report.layer_id)):
        if not ids.is_valid_id(value):
            return f"{what} is not a valid id: {value[:60]!r}"
    rid = report.report_id
    if len(rid) > _MAX_REPORT_ID or not rid.isprintable():
        return f"report_id must be 1..{_MAX_REPORT_ID} printable characters: {rid[:60]!r}"
    big = [name for name, value in (("parameters_added", report.parameters_added),
                                    ("memory_cost_bytes", report.memory_cost_bytes))
           if value > _MAX_INT64]
    big += [f"history[{i}].entered_step" for i, visit in enumerate(report.history)
            if visit.entered_step > _MAX_INT64]
    return f"{', '.join(big)} above {_MAX_INT64}" if big else None
