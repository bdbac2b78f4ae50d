"""`FleetRuntime`: a training loop's seed layers joined to the fleet over the Oona bus.

    runtime = kasmina.attach(model, job_id="job-7")          # OONA_REDIS_URL, or embedded
    for epoch in range(epochs):
        for x, y in loader:
            ...; optimizer.step(); runtime.step(loss)
        runtime.end_epoch(val_metric, evaluate=validate)
    runtime.close()

The training step never waits on the bus: commands arrive on a background reader and wait in
memory; publishing goes through a bounded outbox (health reports may be dropped when it is
full, acks, epoch events and field reports are not). At each epoch boundary the runtime checks
the commands that arrived (a malformed one is refused at once), applies the ones due (in arrival
order), answers each with a CommandAck, runs the layers' gates, and publishes one
LayerHealthReport per layer, the field reports of seeds that ended, and an EpochEvent.

One at-least-once mechanism: a command's bus delivery is acked after it was applied or refused
(`CommandInbox`), so a runtime that dies first leaves it pending and the job's next runtime
gets it again. One dedupe: the ids of the commands answered and their outcomes, kept with the
job's checkpoint (`state_dict`), so a command sent again (a controller's resend, a replay into a
resumed run) is never applied twice: it is answered ACK_REASON_DUPLICATE with the first answer's
outcome (success, stages, epoch; its reason in `original_reason`).

Feature flags (DESIGN §9): with `flags=True` the job reads its flags (oona.flags, bucketed by
job id) at attach, where the layers take them at once, and at every boundary, where a change
takes effect for the next epoch. Rank 0 reads them and broadcasts.
- `kasmina.execution_path`, in a model with `DualPathLayer`s: the path requested on each (the
  kill switch sends every canary job back to legacy that way).
- `kasmina.telemetry_level`: every seed layer's `KasminaConfig.telemetry_every`
  (`TELEMETRY_EVERY`, or an integer); while nobody has set the flag, or its value is not a
  level (logged once per change), each layer keeps the cadence it was attached with.

The job id and every layer id follow `oona.ids`, the rule Tamiyo checks: a bad one is a
ValueError at attach naming it, not a job whose every report Tamiyo dead-letters. A layer with
no id (a model that is itself one seed layer) is named by its path, `root` for the model.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
from collections.abc import Callable

import oona
import torch
from oona import ids, streams
from oona.contracts import AckReason, CommandAck, EpochEvent, EpochEventKind, LifecycleCommand
from oona.flags import EXECUTION_PATH, TELEMETRY_LEVEL, RedisFlagProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagResolutionDetails
from torch import nn

from .. import distributed
from ..controller import measure_contributions
from ..dual import DualPathLayer
from ..lifecycle import ACTIVE_STAGES
from ..wrap import name_layers, unique_seed_layers
from .inbox import CommandInbox, Incoming
from .wire import (
    MAX_COMMAND_ID,
    CommandTarget,
    health_to_proto,
    outcome_to_field_report,
    refusal_to_field_report,
)

log = logging.getLogger(__name__)
# A command that names a boundary this many epochs in the past is refused as expired. Applying
# a late command is safe (every transition is checked against the current table and gates), and
# short epochs (digits: ~0.1 s) outrun a controller's round trip by several epochs.
MAX_LATENESS_EPOCHS = 10
# Command ids remembered with their outcomes for the duplicate check (and saved in
# checkpoints): ~250 bytes each in memory.
MAX_REMEMBERED_COMMANDS = 50_000
# What a duplicate's ack repeats of the first answer, in this order (also the checkpoint's).
_OUTCOME_FIELDS = ("reason", "success", "stage_before", "stage_after", "applied_epoch",
                   "applied_step")
# The telemetry-level flag's variants (oona.flags.DEFAULT_FLAGS) -> KasminaConfig.telemetry_every:
# accumulate every k-th training step. "sampled" keeps one step in ten of the accumulation.
TELEMETRY_EVERY = {"full": 1, "sampled": 10}
# Boundaries of the job's metric a field report carries from before its seed's germination
# (FieldReport.metric_history: Karn extrapolates the job's trajectory from them).
METRIC_HISTORY = 64


class FleetRuntime:
    def __init__(self, model: nn.Module, job_id: str, settings: oona.BusSettings | None = None,
                 metric_name: str = "val_metric", mode: str | None = None,
                 last_epoch: int | None = None, flags: bool = False) -> None:
        ids.check_id("job_id", job_id)
        layers = unique_seed_layers(model)
        if not layers:
            raise ValueError("the model has no KasminaLayer: call kasmina.wrap(model) first")
        if any(not layer.layer_id for layer in layers):
            # A layer with no id (built by hand, or `wrap` of a bare nn.Linear): named by its
            # path in the model, "root" for the model itself.
            layers = name_layers(model)
        for layer in layers:  # Tamiyo refuses, and so never controls, a job with a bad id
            _check_layer_id(layer.layer_id)
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
        self.last_epoch = last_epoch  # commands due after it are refused on arrival
        self.step_count = 0
        # epoch (boundaries completed) -> the job's metric then (NaN: none), the last ones only
        self._metrics: collections.OrderedDict[int, float] = collections.OrderedDict()
        distributed.check_ddp(model)
        # Under torch.distributed only rank 0 talks to the bus: it consumes the job's commands
        # and broadcasts the due ones at each boundary, and it alone publishes (DESIGN §8).
        self.leader = distributed.rank() == 0
        self._broker = None
        self._waiting: list[Incoming] = []  # arrived, well formed, due at a later boundary
        # command id -> the first answer's outcome (_OUTCOME_FIELDS; None: not known)
        self._answered: collections.OrderedDict[str, tuple | None] = collections.OrderedDict()
        self._commands: CommandInbox | None = None
        # Deliveries answered, whose CommandAck may not be published yet: acked on the bus once
        # the outbox has emptied, so a crash in between leaves them pending, never unanswered.
        self._unconfirmed: list[str] = []
        self._outbox = None
        self._flags: RedisFlagProvider | None = None
        self._follows_flags = flags
        self._follows_path = flags and any(isinstance(layer, DualPathLayer) for layer in layers)
        # Each layer's own cadence: what it keeps while the telemetry-level flag sets none.
        self._own_telemetry_every = [layer.config.telemetry_every for layer in layers]
        self._telemetry_logged: tuple | None = None  # the invalid level last logged
        if not self.leader:
            self._follow_flags()  # rank 0's reading, broadcast
            return
        settings = settings or oona.BusSettings.from_env()
        if settings.url is None:  # one embedded broker shared by the outbox and the consumer
            self._broker = oona.EmbeddedRedis(port=0).start()
            settings = oona.BusSettings.from_dsn(self._broker.url)
        self.settings = settings
        self._outbox = oona.OutboxThread(settings, sender_id=f"kasmina-{job_id}").start()
        # One consumer name per process: a restarted job is a new consumer, which takes over
        # what the old one left pending.
        self._commands = CommandInbox(settings, job_id,
                                      f"runtime-{socket.gethostname()}-{os.getpid()}").start()
        if self._follows_flags:
            self._flags = RedisFlagProvider(settings)
            self._flags.initialize(EvaluationContext(job_id))
        self._follow_flags()
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
        self._metrics[self.epoch] = float("nan") if val_metric is None else float(val_metric)
        while len(self._metrics) > 16 * METRIC_HISTORY:  # seeds live far fewer epochs
            self._metrics.popitem(last=False)
        for layer in self.layers:
            report = layer.end_epoch(val_metric)
            outcomes = layer.drain_outcomes()
            if not self.leader:
                continue
            self._outbox.put_telemetry(streams.TELEMETRY_SEED_HEALTH,
                                       health_to_proto(report, self.job_id))
            for outcome in outcomes:  # a DualPathLayer's may come from either path
                self._outbox.put(streams.FIELD_REPORTS, outcome_to_field_report(
                    outcome, self.job_id, outcome.chunk_size, self.higher_is_better,
                    self.metric_name, self.metric_history(outcome.germinated_epoch)))
        self._follow_flags()
        self._event(EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED, val_metric, train_loss)
        return acks

    @property
    def execution_paths(self) -> dict[str, str]:
        """Each seed layer's active execution path, by layer id."""
        return {layer.layer_id: layer.execution_path for layer in self.layers}

    @property
    def telemetry_every(self) -> dict[str, int]:
        """Each seed layer's telemetry cadence (accumulate every k-th step), by layer id."""
        return {layer.layer_id: layer.config.telemetry_every for layer in self.layers}

    def _follow_flags(self) -> None:
        """Take the flags' values (at once before the first step, else for the next epoch):
        the path requested on every DualPathLayer, the telemetry cadence of every layer. Every
        rank takes rank 0's reading."""
        if not self._follows_flags:
            return
        path = every = None
        if self._flags is not None:
            context = EvaluationContext(self.job_id)
            if self._follows_path:
                path = self._flags.resolve_string_details(EXECUTION_PATH, "legacy",
                                                          context).value
            every = self._telemetry_flag(self._flags.resolve_object_details(
                TELEMETRY_LEVEL, None, context))
        path, every = distributed.broadcast_object((path, every))
        if path in ("legacy", "chunked"):
            for layer in self.layers:
                if isinstance(layer, DualPathLayer):
                    layer.request_path(path)
        for layer, own in zip(self.layers, self._own_telemetry_every, strict=True):
            cadence = own if every is None else every
            if layer.config.telemetry_every != cadence:  # the next forward follows it
                layer.set_telemetry_every(cadence)

    def _telemetry_flag(self, details: FlagResolutionDetails) -> int | None:
        """The cadence the telemetry-level flag sets for this job; None: none (not set in
        Redis, unreadable, or not a level: logged once per change)."""
        metadata = details.flag_metadata or {}
        if details.error_code is None and metadata.get("source") != "redis":
            return None  # nobody has set it
        value = details.value
        every = TELEMETRY_EVERY.get(value) if isinstance(value, str) else None
        if isinstance(value, str) and value.isdigit():
            every = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            every = value
        if every is not None and every >= 1:
            return every
        seen = (metadata.get("version"), repr(value), details.error_message)
        if seen != self._telemetry_logged:
            self._telemetry_logged = seen
            log.warning("job %s: flag %s: %s ignored (a level is one of %s or an integer >= 1); "
                        "each layer keeps its telemetry cadence", self.job_id, TELEMETRY_LEVEL,
                        details.error_message or f"value {value!r}",
                        ", ".join(TELEMETRY_EVERY))
        return None

    def take_command_lags(self) -> list[float]:
        """Seconds each command spent between its publication and its arrival at this runtime,
        for the commands received since the last call (the bus lag seen by this job)."""
        lags = []
        while self._commands is not None and self._commands.lags:
            lags.append(self._commands.lags.popleft())
        return lags

    def metric_history(self, epoch: int) -> list[float]:
        """The job's metric at the last METRIC_HISTORY boundaries up to `epoch`, oldest first
        (those this runtime saw or resumed with)."""
        return [self._metrics[e] for e in range(max(1, epoch - METRIC_HISTORY + 1), epoch + 1)
                if e in self._metrics]

    def state_dict(self) -> dict:
        """What a checkpoint of the job must carry for the fleet: the answered command ids and
        their outcomes (`_OUTCOME_FIELDS`), and whether an operator paused or emergency-stopped
        the job (a resume keeps it so)."""
        return {"command_ids": list(self._answered),
                "command_outcomes": [list(o) if o else [] for o in self._answered.values()],
                "paused": self.target.paused, "stopped": self.target.stopped,
                "metrics": [[e, m] for e, m in self._metrics.items()]}

    def load_state_dict(self, state: dict) -> None:
        """Before the first boundary of a resumed run: commands answered before the checkpoint
        are answered as duplicates, with their outcome, if they come again. (A checkpoint
        without outcomes, from before they were kept: the duplicates' outcome is unknown.)"""
        ids = state.get("command_ids", ())
        outcomes = state.get("command_outcomes") or [[]] * len(ids)
        for command_id, outcome in zip(ids, outcomes, strict=True):
            known = tuple(outcome) if (len(outcome) == len(_OUTCOME_FIELDS)
                                       and all(isinstance(v, int) for v in outcome)
                                       and outcome[0] in AckReason.values()) else None
            self._remember(str(command_id), known)
        self.target.paused = bool(state.get("paused", False))
        self.target.stopped = bool(state.get("stopped", False))
        self._metrics.update((int(e), float(m)) for e, m in state.get("metrics", ()))

    def close(self, failed: str | None = None, timeout: float = 10.0) -> None:
        if not self.leader:
            return
        # Commands that can no longer be applied are answered, so no controller waits on them:
        # every delivery, including one read while the job was closing.
        self._commands.stop_reading(timeout)
        left = self._waiting + list(_drain(self._commands.received))
        self._waiting = []
        for incoming in left:
            self._outbox.put(streams.CONTROL_ACKS, CommandAck(
                command_id=incoming.command.command_id, job_id=self.job_id,
                reason=AckReason.ACK_REASON_EXPIRED, applied_epoch=self.epoch,
                applied_step=self.step_count, message=f"the job ended at epoch {self.epoch}"))
        kind = (EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED if failed
                else EpochEventKind.EPOCH_EVENT_KIND_JOB_FINISHED)
        self._event(kind, message=failed or "")
        unsent = self._outbox.close(timeout)
        if unsent:  # their deliveries stay pending: the job's next runtime answers them
            log.warning("job %s: %d messages not published at close", self.job_id, unsent)
        else:
            self._commands.ack(self._unconfirmed + [incoming.entry_id for incoming in left])
        # Everything answered and published: the job's command stream goes (a bounded bus for
        # long-lived fleets); else it stays for the job's next runtime.
        self._commands.close(timeout, delete=not unsent)
        if self._flags is not None:
            self._flags.shutdown()
        if self._broker is not None:
            self._broker.stop()

    def __enter__(self) -> FleetRuntime:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        self.close(failed=repr(exc) if exc is not None else None)

    # ---------------------------------------------------------------- internals
    def _apply_due_commands(self) -> list[CommandAck]:
        """Rank 0 picks the commands to answer at this boundary; every rank answers the same
        ones, in the same order; rank 0 publishes the acks, and acks their deliveries on the
        bus at a later boundary (or at close) once those are published."""
        if self.leader and self._unconfirmed and self._outbox.flush(timeout=0):
            self._commands.ack(self._unconfirmed)  # their CommandAcks are on the bus
            self._unconfirmed = []
        taken = self._take_due() if self.leader else []
        due = distributed.broadcast_object(
            [i.command.SerializeToString() for i in taken] if self.leader else None)
        commands = [LifecycleCommand.FromString(raw) for raw in due]
        acks = [self._answer(command) for command in commands]
        if self.leader:
            for command, ack in zip(commands, acks, strict=True):
                self._outbox.put(streams.CONTROL_ACKS, ack)
                refused = refusal_to_field_report(
                    command, ack, self.target.layers.get(command.layer_id),
                    self.higher_is_better, self.metric_name)
                if refused is not None:  # Karn counts it against the spec (wire.py)
                    self._outbox.put(streams.FIELD_REPORTS, refused)
            self._unconfirmed.extend(i.entry_id for i in taken)
        return acks

    def _answer(self, command: LifecycleCommand) -> CommandAck:
        if command.command_id in self._answered:
            return self._duplicate(command.command_id)
        boundary = self.epoch + 1
        when = command.apply_at_epoch if command.HasField("apply_at_epoch") else boundary
        if when < boundary - MAX_LATENESS_EPOCHS:
            ack = CommandAck(command_id=command.command_id, job_id=self.job_id,
                             reason=AckReason.ACK_REASON_EXPIRED, applied_epoch=self.epoch,
                             message=f"due at epoch {when}, now {boundary}")
        else:
            ack = self.target.apply(command, self.epoch, self.step_count, self.last_epoch)
        if command.command_id:
            self._remember(command.command_id,
                           tuple(getattr(ack, name) for name in _OUTCOME_FIELDS))
        return ack

    def _duplicate(self, command_id: str) -> CommandAck:
        """The answer to a command id answered before: not applied again; the first outcome."""
        outcome = self._answered[command_id]
        ack = CommandAck(command_id=command_id, job_id=self.job_id,
                         reason=AckReason.ACK_REASON_DUPLICATE)
        if outcome is None:
            ack.message = ("duplicate: this command id was answered before (its outcome is not "
                           "known here); not applied again")
            return ack
        first = dict(zip(_OUTCOME_FIELDS, outcome, strict=True))
        ack.original_reason = first.pop("reason")
        for name, value in first.items():
            setattr(ack, name, value)
        ack.message = (f"duplicate: answered before with {AckReason.Name(ack.original_reason)} "
                       f"at epoch {ack.applied_epoch}; not applied again")
        return ack

    def _remember(self, command_id: str, outcome: tuple | None) -> None:
        if not 0 < len(command_id) <= MAX_COMMAND_ID:  # refused as malformed, never kept
            return
        self._answered[command_id] = outcome
        while len(self._answered) > MAX_REMEMBERED_COMMANDS:
            self._answered.popitem(last=False)

    def _take_due(self) -> list[Incoming]:
        """The commands to answer at this boundary, in arrival order: those due, and those
        refused whatever their epoch (malformed, or a duplicate); the rest wait."""
        boundary, taken, waiting = self.epoch + 1, [], []
        for incoming in [*self._waiting, *_drain(self._commands.received)]:
            command = incoming.command
            when = command.apply_at_epoch if command.HasField("apply_at_epoch") else boundary
            if (when > boundary and command.command_id not in self._answered
                    and self.target.check(command, boundary, self.last_epoch) is None):
                waiting.append(incoming)
            else:
                taken.append(incoming)
        self._waiting = waiting
        return taken

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


def _check_layer_id(layer_id: str) -> None:
    try:
        ids.check_id("layer_id", layer_id)
    except ids.InvalidId as err:
        raise ids.InvalidId(f"{err}; a seed layer's id is its path in the model: rename the "
                            f"module, or set the layer's layer_id") from None


def _drain(received: collections.deque[Incoming]) -> list[Incoming]:
    out = []
    while received:
        out.append(received.popleft())
    return out


def attach(model: nn.Module, job_id: str, settings: oona.BusSettings | None = None,
           **kwargs: object) -> FleetRuntime:
    """Join a model's seed layers to the fleet (see `FleetRuntime`)."""
    return FleetRuntime(model, job_id, settings, **kwargs)
