"""The worker: bridges the bus to the Controller.

Consumes (group `tamiyo`) health reports, epoch events and acks; publishes commands on
`control.kasmina.commands.{job}`; saves each job's state in Redis before a message is
acknowledged, so a restarted Tamiyo resumes from what the bus last confirmed.

When to decide: the three streams are consumed independently, so an epoch's end event may
arrive before or after its layers' health reports. A job's epoch is decided as soon as its
end event is in and every layer the job has reported before has reported that epoch, or, for
layers that stay silent (dropped telemetry, a first epoch with unknown layers), `report_grace_s`
after the end event, on whatever reports are in by then.
"""

from __future__ import annotations

import asyncio
import logging
import time

from oona import Bus, ConsumerConfig, Delivery, streams
from oona.contracts import (
    CommandAck,
    EpochEvent,
    EpochEventKind,
    LayerHealthReport,
    LifecycleCommand,
)

from tamiyo import metrics
from tamiyo.controller import Controller, Retry
from tamiyo.store import StateStore
from tamiyo.view import JobView

log = logging.getLogger(__name__)

CONSUMER_GROUP = "tamiyo"
_JOB_ENDS = (EpochEventKind.EPOCH_EVENT_KIND_JOB_FINISHED,
             EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED)


class ControllerWorker:
    def __init__(self, bus: Bus, store: StateStore, controller: Controller, consumer_name: str,
                 *, report_grace_s: float, tick_s: float,
                 config: ConsumerConfig | None = None) -> None:
        self._store = store
        self._controller = controller
        self._publisher = bus.publisher(sender_id=consumer_name)
        self._report_grace_s = report_grace_s
        self._tick_s = tick_s
        self.consumers = [
            bus.consumer(stream, CONSUMER_GROUP, consumer_name, {message: handler}, config)
            for stream, message, handler in (
                (streams.TELEMETRY_SEED_HEALTH, LayerHealthReport, self.handle_report),
                (streams.EPOCH_EVENTS, EpochEvent, self.handle_epoch_event),
                (streams.CONTROL_ACKS, CommandAck, self.handle_ack))]
        self.views: dict[str, JobView] = {}
        # Handlers of the three consumers and the tick interleave on the loop; each holds this
        # while it reads and changes a view (a decision runs in a thread, still under it).
        self._lock = asyncio.Lock()
        self._stopping = False
        # Set once the saved state is loaded: deciding before that could repeat decisions.
        self.resumed = asyncio.Event()

    async def run(self) -> None:
        """Resume the running jobs saved in Redis, then consume until `stop()`."""
        self.views = await self._store.load_running()
        metrics.JOBS.set(len(self.views))
        log.info("resumed %d running jobs from Redis", len(self.views))
        self.resumed.set()
        async with asyncio.TaskGroup() as tasks:
            for consumer in self.consumers:
                tasks.create_task(consumer.run())
            tasks.create_task(self._tick_loop())

    def stop(self) -> None:
        self._stopping = True
        for consumer in self.consumers:
            consumer.stop()

    # -- handlers (idempotent: the bus delivers at least once) ----------------------------

    async def handle_report(self, report: LayerHealthReport, delivery: Delivery) -> None:
        async with self._lock:
            view = await self._view(report.job_id)
            if view.finished or not view.record_report(report):
                return
            await self._store.save_report(view.job_id, report)
            if view.awaiting_decision and view.all_layers_reported():
                await self._decide(view)

    async def handle_epoch_event(self, event: EpochEvent, delivery: Delivery) -> None:
        async with self._lock:
            view = await self._view(event.job_id)
            if view.finished:
                return
            if event.kind in _JOB_ENDS:
                self._controller.finish(view)
                await self._store.save_state(view)
                del self.views[view.job_id]
                metrics.JOBS.set(len(self.views))
                log.info("job %s ended (%s)", view.job_id, EpochEventKind.Name(event.kind))
            elif event.kind == EpochEventKind.EPOCH_EVENT_KIND_JOB_STARTED:
                had_reports = bool(view.reports)
                if view.record_job_start(event, delivery.envelope.event_id):
                    if had_reports and not view.reports:  # rewound to an older checkpoint
                        await self._store.drop_reports(view.job_id)
                    await self._store.save_state(view)
                    log.info("job %s started at epoch %d", view.job_id, event.epoch)
            elif event.kind == EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED:
                if not view.record_epoch_end(event, time.time()):
                    return
                await self._store.save_state(view)
                if view.all_layers_reported():
                    await self._decide(view)

    async def handle_ack(self, ack: CommandAck, delivery: Delivery) -> None:
        async with self._lock:
            view = self.views.get(ack.job_id)
            if view is None or self._controller.on_ack(view, ack) is None:
                return  # not ours, or already resolved (a redelivered ack)
            await self._store.save_state(view)

    # -- deciding and (re)sending ---------------------------------------------------------

    async def tick(self, now: float) -> None:
        """Decide epochs whose report grace is over, and re-send overdue commands."""
        async with self._lock:
            for view in list(self.views.values()):
                if view.awaiting_decision and now >= view.epoch_ended_at + self._report_grace_s:
                    log.info("job %s epoch %s: deciding on %d layer reports after the grace "
                             "period", view.job_id, view.epoch, len(view.reports))
                    await self._decide(view)
                retries = self._controller.due_retries(view, now)
                if retries:
                    await self._store.save_state(view)
                    await self._send(view.job_id, retries)

    async def _tick_loop(self) -> None:
        while not self._stopping:
            await self.tick(time.time())
            await asyncio.sleep(self._tick_s)

    async def _decide(self, view: JobView) -> None:
        # The policy may wait on Karn (bounded by its timeout): off the event loop.
        commands = await asyncio.to_thread(self._controller.decide, view, time.time())
        if commands:
            await self._send(view.job_id, commands)
            for command in commands:
                log.info("job %s epoch %s: %s %s[%d]: %s", view.job_id, view.epoch,
                         command.WhichOneof("action"), command.layer_id, command.seed_index,
                         command.rationale)
        # Saved after publishing, so saved state never claims a decision nobody received. A
        # crash in between decides the epoch again on restart, with the same command ids, which
        # the publisher writes only once.
        await self._store.save_state(view)

    async def _send(self, job_id: str, commands: list[LifecycleCommand] | list[Retry]) -> None:
        stream = streams.commands(job_id)
        batch = []
        for item in commands:
            if isinstance(item, Retry):
                # A new event id, or the bus would drop it as a duplicate of the first send;
                # the runtime deduplicates by the unchanged command_id.
                event_id = f"{item.command.command_id}#{item.attempt}"
                batch.append(self._publisher.encode(stream, item.command, event_id=event_id))
            else:
                batch.append(self._publisher.encode(stream, item, event_id=item.command_id))
        await self._publisher.send(batch)

    async def _view(self, job_id: str) -> JobView:
        view = self.views.get(job_id)
        if view is None:
            # A job finished before a restart is still in the store (until its TTL), so late
            # messages for it are ignored rather than starting it afresh.
            view = await self._store.load(job_id) or JobView(job_id)
            if view.finished:
                return view
            self.views[job_id] = view
            await self._store.save_state(view)
            metrics.JOBS.set(len(self.views))
        return view
