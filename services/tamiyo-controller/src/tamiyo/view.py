"""What Tamiyo knows about one job: the latest health report per layer, the validation metric
per epoch, and the commands it has in flight. Plain data, serialisable to JSON, no I/O.

Stages are the wire `SeedStage` values throughout (oona.contracts.SeedStage): Tamiyo never
converts to the runtime's Python enum, so it cannot get the +1 offset wrong.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from oona.contracts import CommandAck, EpochEvent, LayerHealthReport, LifecycleCommand
from oona.contracts import SeedStage as Stage

from tamiyo.validation import MAX_LOGGED_CHARS

# Stages counted against max_active_seeds (DESIGN §3.2: GERMINATED..FINE_TUNING).
ACTIVE_STAGES = frozenset(range(Stage.SEED_STAGE_GERMINATED, Stage.SEED_STAGE_FINE_TUNING + 1))

_STATE_VERSION = 1
# Per job, so that its saved state stays bounded however long it runs. Early acks matter only
# for the decisions of the epoch being decided again after a crash, or of the last few epochs
# before a takeover; older ones are for long-resolved commands.
_MAX_EARLY_ACKS = 256
# Validation metrics kept: the plateau is measured over the newest ones (PolicyConfig checks
# that plateau_epochs fits). 256 epochs are ~6 KB of saved state.
METRIC_HISTORY_EPOCHS = 256


def expected_stage(command: LifecycleCommand) -> int | None:
    """The stage a seed is in once `command` is applied; None for job-wide commands."""
    action = command.WhichOneof("action")
    return {
        "germinate": Stage.SEED_STAGE_GERMINATED,
        "advance": command.advance.target_stage,
        "cull": Stage.SEED_STAGE_CULLED,
        "rollback": Stage.SEED_STAGE_ROLLED_BACK,
        "cancel": Stage.SEED_STAGE_CANCELLED,
    }.get(action or "")


@dataclass
class PendingCommand:
    """A command sent and not yet acknowledged. `retry_at` (wall-clock seconds) is set once the
    job has passed the epoch the command was due at: only then is a missing ack overdue."""

    command: LifecycleCommand
    attempts: int = 1
    retry_at: float | None = None


@dataclass(frozen=True)
class AppliedCommand:
    """A positively acknowledged seed command, kept until a report newer than `epoch` shows
    the seed: until then a report still showing `stage_before` is older than the command."""

    stage_before: int
    stage_after: int
    epoch: int


@dataclass(frozen=True)
class SeedView:
    """One seed as the policy sees it: `stage` is where it will be once the commands in flight
    for it are applied; `busy` says a command for it is in flight (send it no other)."""

    layer_id: str
    index: int
    stage: int
    ready_for: int
    busy: bool


@dataclass
class JobView:
    job_id: str
    # The event id of the job's latest JOB_STARTED: a job resumed from a checkpoint is a new
    # run, and its commands need ids of their own (see record_job_start).
    run_id: str = ""
    reports: dict[str, LayerHealthReport] = field(default_factory=dict)
    # Validation metric per ended epoch (absent when the epoch event carried none).
    metrics: dict[int, float] = field(default_factory=dict)
    higher_is_better: bool = True
    # The newest ended epoch, when it ended (wall clock), and the newest one decided.
    epoch: int | None = None
    epoch_ended_at: float = 0.0
    last_decided_epoch: int = -1
    last_germination_epoch: int | None = None
    pending: dict[str, PendingCommand] = field(default_factory=dict)
    applied: dict[tuple[str, int], AppliedCommand] = field(default_factory=dict)
    # Acks that came before their command was (re)decided: after a crash between publishing a
    # decision and saving it, the restarted controller decides the epoch again (same ids) and
    # may read the runtime's ack first. Kept so that decision resolves at once, not in flight
    # forever (the runtime acks a command id once).
    early_acks: dict[str, CommandAck] = field(default_factory=dict)
    finished: bool = False
    # When a message for the job last came (wall clock; not saved: a restarted Tamiyo counts
    # from its start). A job silent for the retention period is let go (JobLimits).
    last_message_at: float = 0.0

    # -- recording what the bus says ------------------------------------------------------

    def record_report(self, report: LayerHealthReport) -> bool:
        """Keep the newest report per layer. False for an older one (a late redelivery)."""
        current = self.reports.get(report.layer_id)
        if current is not None and report.epoch < current.epoch:
            return False
        self.reports[report.layer_id] = report
        for key in [k for k, a in self.applied.items()
                    if k[0] == report.layer_id and a.epoch < report.epoch]:
            del self.applied[key]
        return True

    def record_job_start(self, event: EpochEvent, run_id: str) -> bool:
        """Note a (re)start of the job. False for the start already known (a redelivery).

        A job resumed from a checkpoint older than what Tamiyo has seen replays epochs: forget
        everything after the checkpoint's epoch, so those epochs are decided again, and the
        commands in flight, which the stopped run took with it."""
        if run_id == self.run_id:
            return False
        self.run_id = run_id
        if self.epoch is not None and event.epoch < self.epoch:
            self.epoch = event.epoch
            self.last_decided_epoch = min(self.last_decided_epoch, event.epoch)
            self.metrics = {e: m for e, m in self.metrics.items() if e <= event.epoch}
            if (self.last_germination_epoch or 0) > event.epoch:
                self.last_germination_epoch = None
            self.reports.clear()
            self.pending.clear()
            self.applied.clear()
        return True

    def record_epoch_end(self, event: EpochEvent, now: float) -> bool:
        """Note an ended epoch. False when it is not newer than the one known (redelivery)."""
        if self.epoch is not None and event.epoch <= self.epoch:
            return False
        self.epoch, self.epoch_ended_at = event.epoch, now
        self.higher_is_better = event.higher_is_better
        # A non-finite metric (a diverged epoch) counts as not measured: the epoch is still
        # decided (the runtime's safety readiness may ask for rollbacks), and the plateau test
        # sees only numbers.
        if event.HasField("val_metric") and math.isfinite(event.val_metric):
            self.metrics[event.epoch] = event.val_metric
            while len(self.metrics) > METRIC_HISTORY_EPOCHS:
                del self.metrics[min(self.metrics)]
        for pending in self.pending.values():
            due = pending.command.apply_at_epoch if pending.command.HasField(
                "apply_at_epoch") else 0
            if pending.retry_at is None and event.epoch >= due:
                pending.retry_at = now
        return True

    def record_ack(self, ack: CommandAck) -> PendingCommand | None:
        """Resolve the command `ack` answers; None when it is not in flight (a duplicate ack,
        or a command of another controller)."""
        pending = self.pending.pop(ack.command_id, None)
        if pending is None:
            self.remember_ack(ack)
            return None
        command = pending.command
        if ack.success and command.HasField("seed_index"):
            self.applied[(command.layer_id, command.seed_index)] = AppliedCommand(
                ack.stage_before, ack.stage_after, ack.applied_epoch)
        return pending

    def remember_ack(self, ack: CommandAck) -> None:
        """Keep an ack to resolve its command once that is (re)decided or loaded."""
        if len(ack.message) > MAX_LOGGED_CHARS:  # kept only to be logged
            kept = CommandAck()
            kept.CopyFrom(ack)
            kept.message = ack.message[:MAX_LOGGED_CHARS]
            ack = kept
        self.early_acks.pop(ack.command_id, None)  # re-inserted as the newest
        self.early_acks[ack.command_id] = ack
        while len(self.early_acks) > _MAX_EARLY_ACKS:
            del self.early_acks[next(iter(self.early_acks))]

    # -- what the policy reads ------------------------------------------------------------

    @property
    def started(self) -> bool:
        """An epoch event came for the job (its start or an epoch's end), not only reports."""
        return bool(self.run_id) or self.epoch is not None

    @property
    def awaiting_decision(self) -> bool:
        return not self.finished and self.epoch is not None and self.epoch > self.last_decided_epoch

    def all_layers_reported(self) -> bool:
        """Every layer seen so far has reported for the newest ended epoch."""
        return bool(self.reports) and self.epoch is not None and all(
            r.epoch >= self.epoch for r in self.reports.values())

    def validation_history(self) -> list[float]:
        return [self.metrics[e] for e in sorted(self.metrics)]

    def seeds(self, layer_id: str) -> Iterator[SeedView]:
        report = self.reports[layer_id]
        in_flight = {p.command.seed_index: p.command for p in self.pending.values()
                     if p.command.layer_id == layer_id and p.command.HasField("seed_index")}
        for index in range(report.num_seeds):
            stage, ready_for = report.stage[index], report.ready_for[index]
            command = in_flight.get(index)
            applied = self.applied.get((layer_id, index))
            if command is not None:
                stage = expected_stage(command) or stage
            elif applied is not None and stage == applied.stage_before:
                # The report predates the applied command: its readiness is stale too.
                yield SeedView(layer_id, index, applied.stage_after, Stage.SEED_STAGE_UNSPECIFIED,
                               busy=True)
                continue
            yield SeedView(layer_id, index, stage, ready_for, busy=command is not None)

    # -- persistence ----------------------------------------------------------------------

    def to_json(self, *, with_reports: bool = True) -> str:
        """The controller state of this job. The worker stores reports apart (one per layer,
        written as they arrive) and so leaves them out; a checkpoint keeps them in."""
        state: dict[str, Any] = {
            "version": _STATE_VERSION, "job_id": self.job_id, "run_id": self.run_id,
            "metrics": {str(e): m for e, m in self.metrics.items()},
            "higher_is_better": self.higher_is_better, "epoch": self.epoch,
            "epoch_ended_at": self.epoch_ended_at, "last_decided_epoch": self.last_decided_epoch,
            "last_germination_epoch": self.last_germination_epoch, "finished": self.finished,
            "pending": [{"command": _b64(p.command.SerializeToString()), "attempts": p.attempts,
                         "retry_at": p.retry_at} for p in self.pending.values()],
            "applied": [[layer, seed, a.stage_before, a.stage_after, a.epoch]
                        for (layer, seed), a in self.applied.items()],
            "early_acks": [_b64(a.SerializeToString()) for a in self.early_acks.values()],
        }
        if with_reports:
            state["reports"] = {k: _b64(r.SerializeToString()) for k, r in self.reports.items()}
        return json.dumps(state, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes,
                  reports: dict[str, LayerHealthReport] | None = None) -> JobView:
        state = json.loads(text)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown Tamiyo state version {state.get('version')!r}")
        view = cls(job_id=state["job_id"], run_id=state["run_id"],
                   metrics={int(e): m for e, m in state["metrics"].items()},
                   higher_is_better=state["higher_is_better"], epoch=state["epoch"],
                   epoch_ended_at=state["epoch_ended_at"],
                   last_decided_epoch=state["last_decided_epoch"],
                   last_germination_epoch=state["last_germination_epoch"],
                   finished=state["finished"])
        for item in state["pending"]:
            command = LifecycleCommand.FromString(base64.b64decode(item["command"]))
            view.pending[command.command_id] = PendingCommand(command, item["attempts"],
                                                              item["retry_at"])
        for layer, seed, before, after, epoch in state["applied"]:
            view.applied[(layer, seed)] = AppliedCommand(before, after, epoch)
        for data in state.get("early_acks", []):
            ack = CommandAck.FromString(base64.b64decode(data))
            view.early_acks[ack.command_id] = ack
        if reports is None:
            reports = {k: LayerHealthReport.FromString(base64.b64decode(v))
                       for k, v in state.get("reports", {}).items()}
        view.reports = dict(reports)
        return view


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
