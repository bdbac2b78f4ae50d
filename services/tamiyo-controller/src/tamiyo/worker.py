"""The worker: bridges the bus to the Controller.

Consumes (group `tamiyo`) health reports, epoch events and acks; publishes commands on
`control.kasmina.commands.{job}`; saves each job's state in Redis before a message is
acknowledged, so a restarted Tamiyo resumes from what the bus last confirmed.

When to decide: the three streams are consumed independently, so an epoch's end event may
arrive before or after its layers' health reports. A job's epoch is decided as soon as its
end event is in and every layer the job has reported before has reported that epoch, or, for
layers that stay silent (dropped telemetry, a first epoch with unknown layers), `report_grace_s`
after the end event, on whatever reports are in by then.

Replicas (DESIGN §5): each job is decided by the one replica holding its lease (tamiyo.lease).
Each replica reads the three streams through a consumer group of its own, `tamiyo.<name>`,
rather than one shared group: in a shared group a job's reports, epoch events and acks would be
split between replicas, and the owner would need the others to forward theirs. With a group
each, every replica keeps every job's view (cheap: the newest report per layer) and a replica
taking a job over already has everything the bus said; only the decision state (what was
decided, sent and acknowledged) comes from the store, which only the owner writes. Only the
owner saves, decides and publishes; the others just follow.

Bad input and bounds: every message is checked (tamiyo.validation) before it touches a view; one
that fails, or that would make Tamiyo track more than `JobLimits` allows (jobs, layers per job),
raises an `oona.Reject` and is dead-lettered with the reason. A job with no message for the
retention period (a shorter one for a job that sent no epoch event: `JobLimits`) is let go at
the next tick: by every replica from its memory, and from the store by the lease holder alone.

Redis outages: the consumers ride them out (oona.Consumer); so do the tick and the lease
renewal, which log, back off and carry on. A decision whose commands cannot be published is
published once Redis is back (the publish is retried, under the lock, until it succeeds or
Tamiyo stops), so an outage that hits a decision neither loses it nor stops the tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from oona import Bus, ConsumerConfig, Delivery, streams
from oona.connection import TRANSIENT_ERRORS
from oona.contracts import (
    CommandAck,
    EpochEvent,
    EpochEventKind,
    LayerHealthReport,
    LifecycleCommand,
)

from tamiyo import metrics
from tamiyo.controller import Controller, Retry
from tamiyo.lease import JobLeases
from tamiyo.store import StateStore
from tamiyo.validation import (
    JobLimits,
    OverLimit,
    check_ack,
    check_epoch_event,
    check_report,
)
from tamiyo.view import JobView

log = logging.getLogger(__name__)

CONSUMER_GROUP = "tamiyo"
# Back-off of the tick, the lease renewal and a decision's publish while Redis is unreachable.
_OUTAGE_BACKOFF_S = (0.05, 2.0)
_JOB_ENDS = (EpochEventKind.EPOCH_EVENT_KIND_JOB_FINISHED,
             EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED)


class ControllerWorker:
    def __init__(self, bus: Bus, store: StateStore, controller: Controller, consumer_name: str,
                 *, leases: JobLeases, report_grace_s: float, tick_s: float,
                 config: ConsumerConfig | None = None, limits: JobLimits | None = None) -> None:
        self._store = store
        self._limits = limits or JobLimits()
        self._controller = controller
        self.leases = leases
        self._publisher = bus.publisher(sender_id=consumer_name)
        group = f"{CONSUMER_GROUP}.{consumer_name}"
        self._report_grace_s = report_grace_s
        self._tick_s = tick_s
        self.consumers = [
            bus.consumer(stream, group, consumer_name, {message: handler}, config)
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
        self.views, unreadable = await self._store.load_running()
        for job_id in unreadable:  # listed with no state to resume: unlisted under its lease
            if await self.leases.acquire(job_id):
                await self._store.unlist(job_id)
                await self.leases.release(job_id)
        now = time.time()
        for view in self.views.values():
            view.last_message_at = now
        metrics.JOBS.set(len(self.views))
        log.info("resumed %d running jobs from Redis", len(self.views))
        self.resumed.set()
        drained = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            # Renewed until the consumers have drained: a handler may still decide until then.
            tasks.create_task(self._renew_loop(drained))
            try:
                async with asyncio.TaskGroup() as consuming:
                    for consumer in self.consumers:
                        consuming.create_task(consumer.run())
                    consuming.create_task(self._tick_loop())
            finally:
                drained.set()
        # Handed over at once rather than after the lease time: the others take over at their
        # next tick.
        await self.leases.release_all()

    def stop(self) -> None:
        self._stopping = True
        for consumer in self.consumers:
            consumer.stop()

    # -- handlers (idempotent: the bus delivers at least once) ----------------------------

    async def handle_report(self, report: LayerHealthReport, delivery: Delivery) -> None:
        check_report(report)
        async with self._lock:
            view = await self._view(report.job_id)
            if view is None or view.finished:
                return
            if (report.layer_id not in view.reports
                    and len(view.reports) >= self._limits.max_layers_per_job):
                raise OverLimit(f"job {view.job_id} already has {len(view.reports)} layers "
                                "(TAMIYO_MAX_LAYERS_PER_JOB)")
            view.last_message_at = time.time()
            if not view.record_report(report) or not await self._own(view):
                return
            await self._store.save_report(view.job_id, report)
            if view.awaiting_decision and view.all_layers_reported():
                await self._decide(view)

    async def handle_epoch_event(self, event: EpochEvent, delivery: Delivery) -> None:
        check_epoch_event(event)
        async with self._lock:
            # The end of a job Tamiyo knows nothing of changes nothing: no state for it.
            view = await self._view(event.job_id, create=event.kind not in _JOB_ENDS)
            if view is None or view.finished:
                return
            view.last_message_at = time.time()
            if event.kind in _JOB_ENDS:
                # Taken if free: the end must be saved by someone, or the job stays listed as
                # running; if another replica owns the job, it saves the end itself.
                owned = await self._own(view)
                self._controller.finish(view)
                if owned:
                    await self._store.save_state(view)
                    await self.leases.release(view.job_id)
                self.views.pop(view.job_id, None)  # _own drops a job the last owner ended
                metrics.JOBS.set(len(self.views))
                log.info("job %s ended (%s)", view.job_id, EpochEventKind.Name(event.kind))
            elif event.kind == EpochEventKind.EPOCH_EVENT_KIND_JOB_STARTED:
                had_reports = bool(view.reports)
                if view.record_job_start(event, delivery.envelope.event_id):
                    log.info("job %s started at epoch %d", view.job_id, event.epoch)
                    if not await self._own(view):
                        return
                    if had_reports and not view.reports:  # rewound to an older checkpoint
                        await self._store.drop_reports(view.job_id)
                    await self._store.save_state(view)
            elif event.kind == EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED:
                if not view.record_epoch_end(event, time.time()) or not await self._own(view):
                    return
                await self._store.save_state(view)
                if view.all_layers_reported():
                    await self._decide(view)

    async def handle_ack(self, ack: CommandAck, delivery: Delivery) -> None:
        check_ack(ack)
        async with self._lock:
            view = self.views.get(ack.job_id)
            if view is None:
                return  # not a running job
            view.last_message_at = time.time()
            if not self.leases.held(view.job_id):
                # Kept for when this replica takes the job over (see _take_over).
                view.remember_ack(ack)
                return
            if self._controller.on_ack(view, ack) is None:
                return  # already resolved (a redelivered ack)
            await self._store.save_state(view)

    # -- deciding and (re)sending ---------------------------------------------------------

    async def tick(self, now: float) -> None:
        """Let go of silent jobs, decide epochs whose report grace is over, and re-send overdue
        commands."""
        async with self._lock:
            for view in list(self.views.values()):
                if now - view.last_message_at > self._limits.retention_for(view.started):
                    await self._evict(view)
                    continue
                if not await self._own(view):
                    continue
                if view.awaiting_decision and now >= view.epoch_ended_at + self._report_grace_s:
                    log.info("job %s epoch %s: deciding on %d layer reports after the grace "
                             "period", view.job_id, view.epoch, len(view.reports))
                    await self._decide(view)
                retries = self._controller.due_retries(view, now)
                if retries:
                    await self._store.save_state(view)
                    await self._send(view.job_id, retries)

    async def _tick_loop(self) -> None:
        backoff = _OUTAGE_BACKOFF_S[0]
        while not self._stopping:
            try:
                await self.tick(time.time())
                backoff = _OUTAGE_BACKOFF_S[0]
            except TRANSIENT_ERRORS as exc:  # what was not done is done at a later tick
                log.warning("tick: redis unavailable (%s); again in %.2f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _OUTAGE_BACKOFF_S[1])
                continue
            await asyncio.sleep(self._tick_s)

    async def _renew_loop(self, drained: asyncio.Event) -> None:
        # Apart from the tick and not under the lock: a decision waiting on Karn must not let
        # the leases lapse.
        while not drained.is_set():
            try:
                for job_id in self.leases.jobs:
                    if not await self.leases.renew(job_id):
                        log.warning("job %s: lease lost to another replica", job_id)
            except TRANSIENT_ERRORS as exc:  # a lease that lapses meanwhile is taken again
                log.warning("lease renewal: redis unavailable (%s)", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), self.leases.ttl_ms / 3000)

    async def _own(self, view: JobView) -> bool:
        """Whether this replica decides the job: it holds the lease, or has just taken it."""
        if self.leases.held(view.job_id):
            return True
        if not await self.leases.acquire(view.job_id):
            return False
        await self._take_over(view)
        if view.finished:  # it ended while another replica owned it
            del self.views[view.job_id]
            metrics.JOBS.set(len(self.views))
            await self.leases.release(view.job_id)
            return False
        return True

    async def _take_over(self, view: JobView) -> None:
        """Continue from the decision state the last owner saved. The view's own observations
        (reports, epochs, metrics, acks) are complete, read through this replica's groups."""
        saved = await self._store.load(view.job_id, repair=True)
        seen_acks = list(view.early_acks.values())
        if saved is not None and saved.run_id == view.run_id:
            view.last_decided_epoch = saved.last_decided_epoch
            view.last_germination_epoch = saved.last_germination_epoch
            view.pending, view.applied = saved.pending, saved.applied
            view.early_acks = saved.early_acks
            view.finished = view.finished or saved.finished
        # Another saved run: either this view has read a newer start than the last owner
        # saved, and so the owner decided nothing in that run (it saves a start before it acks
        # it), or this replica lags behind a start the owner saved; reading it, the view
        # rewinds and decides that run's epochs again, with the same command ids.
        for ack in seen_acks:  # acks read while another replica owned the job
            self._controller.on_ack(view, ack)
        for report in list(view.reports.values()):
            view.record_report(report)  # drops applied commands its reports are newer than
            await self._store.save_report(view.job_id, report)
        await self._store.save_state(view)
        log.info("job %s: lease taken by replica %s (decided up to epoch %d)", view.job_id,
                 self.leases.replica_id, view.last_decided_epoch)

    async def _decide(self, view: JobView) -> None:
        # The policy may wait on Karn (bounded by its timeout): off the event loop.
        commands = await asyncio.to_thread(self._controller.decide, view, time.time())
        if not self.leases.held(view.job_id):
            # Lost while deciding: the new owner decides from the saved state (same command
            # ids), so this decision is neither sent nor saved.
            log.warning("job %s epoch %s: lease lost while deciding; not sent", view.job_id,
                        view.epoch)
            return
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
        backoff = _OUTAGE_BACKOFF_S[0]
        while True:
            try:  # the same event ids every time: written once however often it is tried
                await self._publisher.send(batch)
                return
            except TRANSIENT_ERRORS as exc:
                if self._stopping:  # decided again, same ids, by whoever runs next
                    raise
                log.warning("job %s: %d commands not published, redis unavailable (%s); "
                            "again in %.2f s", job_id, len(batch), exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _OUTAGE_BACKOFF_S[1])

    async def _view(self, job_id: str, *, create: bool = True) -> JobView | None:
        """The job's view: followed, saved, or (if `create`) new; None for an unknown job when
        not `create`. OverLimit past max_jobs."""
        view = self.views.get(job_id)
        if view is None:
            # A job finished before a restart is still in the store (until its TTL), so late
            # messages for it are ignored rather than starting it afresh.
            view = await self._store.load(job_id)
            if view is not None and view.finished:
                return view
            if view is None and not create:
                return None
            if len(self.views) >= self._limits.max_jobs:
                raise OverLimit(f"already following {len(self.views)} jobs (TAMIYO_MAX_JOBS); "
                                f"job {job_id} refused")
            view = self.views[job_id] = view or JobView(job_id)
            view.last_message_at = time.time()
            metrics.JOBS.set(len(self.views))
        return view

    async def _evict(self, view: JobView) -> None:
        """Let go of a job nothing has been heard of for its retention period: no longer
        followed here. The replica holding its lease (or taking it: the owner is gone) also
        takes it off the running list and deletes its hash if that has not expired yet, then
        releases the lease; while another replica holds it, that one does so at its own tick."""
        del self.views[view.job_id]
        metrics.JOBS.set(len(self.views))
        metrics.JOBS_EVICTED.inc()
        silent_s = self._limits.retention_for(view.started)
        if not (self.leases.held(view.job_id) or await self.leases.acquire(view.job_id)):
            log.info("job %s: no message for %.0f s; no longer followed by this replica (its "
                     "owner keeps its state)", view.job_id, silent_s)
            return
        await self._store.forget(view.job_id)
        await self.leases.release(view.job_id)
        log.warning("job %s: no message for %.0f s%s; no longer followed", view.job_id, silent_s,
                    "" if view.started else " and no epoch event ever")
