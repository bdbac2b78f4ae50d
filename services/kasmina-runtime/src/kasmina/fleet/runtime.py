"""`FleetRuntime`: a training loop's seed layers joined to the fleet over the Oona bus.

    runtime = kasmina.attach(model, job_id="job-7")          # OONA_REDIS_URL, or embedded
    for epoch in range(epochs):
        for x, y in loader:
            ...; optimizer.step(); runtime.step(loss)
        runtime.end_epoch(val_metric, evaluate=validate)
    runtime.close()

The training step never waits on the bus: commands arrive on a background consumer and wait in
memory; publishing goes through a bounded outbox (health reports may be dropped when it is
full, acks, epoch events and field reports are not). At each epoch boundary the runtime applies
the commands due (in arrival order, each once), acks each, runs the layers' gates, and
publishes one LayerHealthReport per layer, the field reports of seeds that ended, and an
EpochEvent. A command lost between the bus ack and the boundary (a crash) is never acked, so the
controller resends it; command ids already applied are ignored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import oona
import torch
from oona import streams
from oona.contracts import AckReason, CommandAck, EpochEvent, EpochEventKind, LifecycleCommand
from torch import nn

from .. import distributed
from ..controller import measure_contributions
from ..lifecycle import ACTIVE_STAGES
from ..wrap import unique_seed_layers
from .wire import CommandTarget, health_to_proto, outcome_to_field_report

log = logging.getLogger(__name__)
# A command that names a boundary this many epochs in the past is refused as expired. Applying
# a late command is safe (every transition is checked against the current table and gates), and
# short epochs (digits: ~0.1 s) outrun a controller's round trip by several epochs.
MAX_LATENESS_EPOCHS = 10


class FleetRuntime:
    def __init__(self, model: nn.Module, job_id: str, settings: oona.BusSettings | None = None,
                 metric_name: str = "val_metric", mode: str | None = None) -> None:
        layers = unique_seed_layers(model)
        if not layers:
            raise ValueError("the model has no KasminaLayer: call kasmina.wrap(model) first")
        self.job_id = job_id
        self.model = model
        self.layers = layers
        self.target = CommandTarget(job_id, layers)
        self.metric_name = metric_name
        mode = mode or layers[0].config.mode
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        for layer in layers:  # one metric direction for the job, read by every gate
            layer.config = layer.config.replace(mode=mode)
        self.higher_is_better = mode == "max"
        self.epoch = max(layer.epoch for layer in layers)
        self.step_count = 0
        distributed.check_ddp(model)
        # Under torch.distributed only rank 0 talks to the bus: it consumes the job's commands
        # and broadcasts the due ones at each boundary, and it alone publishes (DESIGN §8).
        self.leader = distributed.rank() == 0
        self._broker = None
        self._inbox: collections.deque[LifecycleCommand] = collections.deque()
        self._applied: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Seconds from each command's publication to its arrival here (take_command_lags).
        self._lags: collections.deque[float] = collections.deque(maxlen=10_000)
        self._stop: Callable[[], None] | None = None
        self._outbox = self._thread = None
        if not self.leader:
            return
        settings = settings or oona.BusSettings.from_env()
        if settings.url is None:  # one embedded broker shared by the outbox and the consumer
            self._broker = oona.EmbeddedRedis(port=0).start()
            settings = oona.BusSettings.from_dsn(self._broker.url)
        self.settings = settings
        self._ready = threading.Event()
        self._outbox = oona.OutboxThread(settings, sender_id=f"kasmina-{job_id}").start()
        self._thread = threading.Thread(target=self._consume, name=f"kasmina-commands-{job_id}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise oona.BusUnavailable("the command consumer did not start within 30 s")
        self._event(EpochEventKind.EPOCH_EVENT_KIND_JOB_STARTED)

    # ---------------------------------------------------------------- training loop
    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """After the optimizer's step: the seeds' optimizers and alpha ramps (no bus I/O)."""
        self.step_count += 1
        for layer in self.layers:
            layer.step(loss)

    def end_epoch(self, val_metric: float | None, evaluate: Callable[[], float] | None = None,
                  train_loss: float | None = None) -> list[CommandAck]:
        """The epoch boundary: contributions, due commands, gates, and what goes on the bus.
        Returns this boundary's acks."""
        val_metric = measure_contributions(self.model, self.layers, val_metric, evaluate)
        acks = self._apply_due_commands()
        self.epoch += 1
        for layer in self.layers:
            report = layer.end_epoch(val_metric)
            outcomes = layer.drain_outcomes()
            if not self.leader:
                continue
            self._outbox.put_telemetry(streams.TELEMETRY_SEED_HEALTH,
                                       health_to_proto(report, self.job_id))
            for outcome in outcomes:
                start, end = layer.chunks[outcome.seed_id]
                self._outbox.put(streams.FIELD_REPORTS, outcome_to_field_report(
                    outcome, self.job_id, end - start, self.higher_is_better, self.metric_name))
        self._event(EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED, val_metric, train_loss)
        return acks

    def take_command_lags(self) -> list[float]:
        """Seconds each command spent between its publication and its arrival at this runtime,
        for the commands received since the last call (the bus lag seen by this job)."""
        lags = []
        while self._lags:
            lags.append(self._lags.popleft())
        return lags

    def close(self, failed: str | None = None, timeout: float = 10.0) -> None:
        if not self.leader:
            return
        kind = (EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED if failed
                else EpochEventKind.EPOCH_EVENT_KIND_JOB_FINISHED)
        self._event(kind, message=failed or "")
        if self._stop is not None:
            self._stop()
        self._thread.join(timeout)
        unsent = self._outbox.close(timeout)
        if unsent:
            log.warning("job %s: %d messages not published at close", self.job_id, unsent)
        if self._broker is not None:
            self._broker.stop()

    def __enter__(self) -> FleetRuntime:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        self.close(failed=repr(exc) if exc is not None else None)

    # ---------------------------------------------------------------- internals
    def _apply_due_commands(self) -> list[CommandAck]:
        """Rank 0 picks the due commands; every rank applies the same ones, in the same order;
        rank 0 publishes the acks."""
        due = distributed.broadcast_object(
            [c.SerializeToString() for c in self._take_due()] if self.leader else None)
        acks = []
        for raw in due:
            command = LifecycleCommand.FromString(raw)
            boundary = self.epoch + 1
            when = command.apply_at_epoch if command.HasField("apply_at_epoch") else boundary
            if when < boundary - MAX_LATENESS_EPOCHS:
                ack = CommandAck(command_id=command.command_id, job_id=self.job_id,
                                 reason=AckReason.ACK_REASON_EXPIRED, applied_epoch=self.epoch,
                                 message=f"due at epoch {when}, now {boundary}")
            else:
                ack = self.target.apply(command, self.epoch, self.step_count)
            if self.leader:
                self._outbox.put(streams.CONTROL_ACKS, ack)
            acks.append(ack)
        return acks

    def _take_due(self) -> list[LifecycleCommand]:
        """The commands due at this boundary, each once, in arrival order; later ones wait."""
        boundary, due, later = self.epoch + 1, [], []
        while self._inbox:
            command = self._inbox.popleft()
            if command.command_id in self._applied:
                continue  # redelivered or resent after its ack: applied once
            when = command.apply_at_epoch if command.HasField("apply_at_epoch") else boundary
            if when > boundary:
                later.append(command)
                continue
            self._applied[command.command_id] = None
            while len(self._applied) > 100_000:
                self._applied.popitem(last=False)
            due.append(command)
        self._inbox.extend(later)
        return due

    def _event(self, kind: int, val_metric: float | None = None,
               train_loss: float | None = None, message: str = "") -> None:
        if not self.leader:
            return
        event = EpochEvent(job_id=self.job_id, kind=kind, epoch=self.epoch, step=self.step_count,
                           val_metric_name=self.metric_name,
                           higher_is_better=self.higher_is_better, message=message,
                           active_seeds=sum(len(layer.seeds_in(*ACTIVE_STAGES))
                                            for layer in self.layers),
                           parameter_count=sum(layer.params_added() for layer in self.layers))
        if val_metric is not None:
            event.val_metric = val_metric
        if train_loss is not None:
            event.train_loss = train_loss
        self._outbox.put(streams.EPOCH_EVENTS, event)

    def _consume(self) -> None:
        asyncio.run(self._consume_async())

    async def _consume_async(self) -> None:
        async def on_command(command: LifecycleCommand, delivery: oona.Delivery) -> None:
            self._lags.append(time.time() - delivery.envelope.timestamp.ToNanoseconds() / 1e9)
            self._inbox.append(command)  # applied by the training thread at its next boundary

        async with oona.open_bus(self.settings) as bus:
            # One consumer per process: a restarted job is a new consumer, and the old one's
            # pending commands are reclaimed (XAUTOCLAIM) rather than shared by name.
            consumer = bus.consumer(streams.commands(self.job_id), group=f"kasmina-{self.job_id}",
                                    name=f"runtime-{socket.gethostname()}-{os.getpid()}",
                                    handlers={LifecycleCommand: on_command})
            await consumer.ensure_group()
            loop = asyncio.get_running_loop()
            self._stop = lambda: loop.call_soon_threadsafe(consumer.stop)
            self._ready.set()
            await consumer.run()


def attach(model: nn.Module, job_id: str, settings: oona.BusSettings | None = None,
           **kwargs: object) -> FleetRuntime:
    """Join a model's seed layers to the fleet (see `FleetRuntime`)."""
    return FleetRuntime(model, job_id, settings, **kwargs)
