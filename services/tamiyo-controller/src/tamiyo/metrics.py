"""Prometheus metrics of Tamiyo. Labels are bounded: `kind` is a command action, `reason` an
AckReason name, `signal` a stability signal; nothing is labelled by job, layer or seed."""

from __future__ import annotations

from oona.contracts import AckReason
from prometheus_client import Counter, Gauge, Histogram

from tamiyo.stability import SIGNALS

COMMAND_KINDS = ("germinate", "advance", "cull", "rollback", "cancel")

DECISIONS = Counter("tamiyo_decisions", "Lifecycle commands decided, by action.", ["kind"])
DECISION_SECONDS = Histogram(
    "tamiyo_decision_seconds", "Time to decide one job's epoch (Karn's answer included).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
ACKS = Counter("tamiyo_acks", "Command acks received for commands in flight, by reason.",
               ["reason"])
KARN_FALLBACKS = Counter("tamiyo_karn_fallbacks",
                         "Germinations that used the default blueprint because Karn did not "
                         "answer.")
COMMAND_RETRIES = Counter("tamiyo_command_retries",
                          "Commands re-sent (same command_id) because their ack was overdue.")
COMMANDS_ABANDONED = Counter("tamiyo_commands_abandoned",
                             "Commands given up on after max attempts without an ack.")
COMMANDS_UNAPPLIED = Counter("tamiyo_commands_unapplied_at_job_end",
                             "Commands still unacked when their job ended (due at an epoch the "
                             "job never reached): let go, never applied.")
JOBS_EVICTED = Counter("tamiyo_jobs_evicted",
                       "Jobs let go after no message for TAMIYO_JOB_RETENTION_S.")
GROWTH_PAUSED_EPOCHS = Counter(
    "tamiyo_growth_paused_epochs",
    "Epochs decided with growth paused by the stability guard (no germination), by the signal "
    "that paused it: metric_spike, rollbacks, drift.", ["signal"])
JOBS = Gauge("tamiyo_jobs", "Running jobs this replica follows (every replica follows all).")
LEASED_JOBS = Gauge("tamiyo_leased_jobs",
                    "Jobs whose lease this replica holds: the ones it decides and commands.")

# Every series exists from the start, at 0, so rates and dashboards see it.
for _kind in COMMAND_KINDS:
    DECISIONS.labels(_kind)
for _signal in SIGNALS:
    GROWTH_PAUSED_EPOCHS.labels(_signal)
for _reason in AckReason.DESCRIPTOR.values:
    ACKS.labels(_reason.name.removeprefix("ACK_REASON_"))


def ack_reason_label(reason: int) -> str:
    try:
        return str(AckReason.Name(reason)).removeprefix("ACK_REASON_")
    except ValueError:  # a reason added to the contract after this build
        return "OTHER"
