"""The synchronous engine around a policy: one decision per (job, epoch), deterministic command
ids, commands in flight until acked, overdue ones re-sent under the same id. No asyncio, no
Redis: the worker and the gRPC layer drive it, and it is unit-tested directly."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from oona.contracts import CommandAck, LifecycleCommand

from tamiyo import metrics
from tamiyo.policy import Policy
from tamiyo.validation import MAX_LOGGED_CHARS
from tamiyo.view import JobView, PendingCommand

log = logging.getLogger(__name__)

_COMMAND_NAMESPACE = uuid.UUID("5b0d3f6e-7a1c-4e0b-9a55-7461d1796f01")  # Tamiyo's own


@dataclass(frozen=True)
class DeliveryConfig:
    """How commands reach the runtime. Over the bus they are applied at the next epoch boundary
    and acked; a synchronous caller (gRPC Step) applies them at once and sends no acks."""

    over_bus: bool = True
    # After the epoch a command was due at has ended, wait this long for its ack, then re-send.
    ack_timeout_s: float = 10.0
    # Sends per command (the first included); then it is abandoned and counted.
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.ack_timeout_s <= 0 or self.max_attempts < 1:
            raise ValueError("need ack_timeout_s > 0 and max_attempts >= 1")


@dataclass(frozen=True)
class Retry:
    command: LifecycleCommand
    attempt: int


class Controller:
    def __init__(self, policy: Policy, delivery: DeliveryConfig) -> None:
        self.policy = policy
        self.delivery = delivery

    def decide(self, view: JobView, now: float) -> list[LifecycleCommand]:
        """The commands for the view's newest ended epoch, once: a second call for the same
        epoch (a redelivered report or event) returns nothing."""
        if not view.awaiting_decision:
            return []
        assert view.epoch is not None
        started = time.perf_counter()
        commands = self.policy.decide(view)
        already_applied = []
        for command in commands:
            action = command.WhichOneof("action")
            command.job_id = view.job_id
            # Deterministic: deciding the same epoch of the same run again after a crash yields
            # the same ids, which the bus and the runtime both deduplicate. A UUID, as it is the
            # envelope's event id too, which has a length limit that long job and layer names
            # could pass.
            seed = command.seed_index if command.HasField("seed_index") else "*"
            command.command_id = str(uuid.uuid5(_COMMAND_NAMESPACE, "\n".join(map(str, (
                view.job_id, view.run_id, view.epoch, command.layer_id, seed, action)))))
            if self.delivery.over_bus:
                command.apply_at_epoch = view.epoch + 1
                view.pending[command.command_id] = PendingCommand(command)
                early = view.early_acks.pop(command.command_id, None)
                if early is not None:  # decided again after a crash, and already acked
                    self.on_ack(view, early)
                    already_applied.append(command)
            if action == "germinate":
                view.last_germination_epoch = view.epoch
            metrics.DECISIONS.labels(action).inc()
        view.last_decided_epoch = view.epoch
        metrics.DECISION_SECONDS.observe(time.perf_counter() - started)
        return [c for c in commands if c not in already_applied]

    def on_ack(self, view: JobView, ack: CommandAck) -> PendingCommand | None:
        pending = view.record_ack(ack)
        if pending is None:
            return None
        metrics.ACKS.labels(metrics.ack_reason_label(ack.reason)).inc()
        if not ack.success:
            # Final: the runtime refused it for a reason a re-send would not change. The policy
            # sees the seed as it is in the next report and may decide again.
            log.warning("job %s: %s refused (%s): %s", view.job_id, ack.command_id,
                        metrics.ack_reason_label(ack.reason), ack.message[:MAX_LOGGED_CHARS])
        return pending

    def due_retries(self, view: JobView, now: float) -> list[Retry]:
        """Commands whose ack is overdue, to re-send under the same command_id; those out of
        attempts are dropped (and counted)."""
        retries: list[Retry] = []
        for command_id, pending in list(view.pending.items()):
            # retry_at is unset until the job has passed the epoch the command is due at.
            if pending.retry_at is None or now < pending.retry_at + self.delivery.ack_timeout_s:
                continue
            if pending.attempts >= self.delivery.max_attempts:
                del view.pending[command_id]
                metrics.COMMANDS_ABANDONED.inc()
                log.error("job %s: no ack for %s after %d sends; giving up", view.job_id,
                          command_id, pending.attempts)
                continue
            pending.attempts += 1
            pending.retry_at = now
            metrics.COMMAND_RETRIES.inc()
            retries.append(Retry(pending.command, pending.attempts))
        return retries

    def finish(self, view: JobView) -> None:
        """The job ended: nothing more to decide or re-send."""
        view.finished = True
        if view.pending:
            metrics.COMMANDS_UNAPPLIED.inc(len(view.pending))
            log.info("job %s ended with %d commands unacked (due later): let go", view.job_id,
                     len(view.pending))
        view.pending.clear()
