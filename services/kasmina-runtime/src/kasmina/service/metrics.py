"""Prometheus metrics of the runtime service. Label sets are bounded: per job and layer, never
per seed (a layer may have thousands); seeds are counted by stage; job ids are at most 128
characters (limits.JOB_ID_PATTERN) and an evicted job's series are removed (forget_job)."""

from __future__ import annotations

from oona.contracts import AckReason
from prometheus_client import Counter, Gauge, Histogram

from ..lifecycle import SeedStage

EPOCH_SECONDS = Histogram("kasmina_epoch_seconds", "Wall time of one training epoch", ["job_id"],
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
STEP_SECONDS = Gauge("kasmina_step_seconds", "Mean wall time of a training step, last epoch",
                     ["job_id"])
SEEDS = Gauge("kasmina_seeds", "Seeds per lifecycle stage", ["job_id", "layer", "stage"])
ALPHA_MEAN = Gauge("kasmina_alpha_mean", "Mean alpha of the layer's blending seeds",
                   ["job_id", "layer"])
COMMANDS = Counter("kasmina_commands_total", "Lifecycle commands applied, by outcome",
                   ["job_id", "reason"])
VAL_METRIC = Gauge("kasmina_val_metric", "Validation metric at the last epoch boundary", ["job_id"])
TRAIN_LOSS = Gauge("kasmina_train_loss", "Mean training loss of the last epoch", ["job_id"])
COMMAND_LAG = Histogram("kasmina_command_lag_seconds",
                        "Time from a lifecycle command's publication to its arrival at the job",
                        ["job_id"], buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60))
JOBS = Gauge("kasmina_jobs", "Jobs by state", ["state"])

_PER_JOB = (EPOCH_SECONDS, STEP_SECONDS, VAL_METRIC, TRAIN_LOSS, COMMAND_LAG)


def ack_reason(reason: int) -> str:
    """An ack reason's label: its name, as Tamiyo's metrics have it (OK, INVALID, ...)."""
    return AckReason.Name(reason).removeprefix("ACK_REASON_")


def start_job(job_id: str) -> None:
    """Every ack reason's series of the job at 0, so a first refusal shows as an increase."""
    for reason in AckReason.values():
        COMMANDS.labels(job_id, ack_reason(reason))


def forget_job(job_id: str, layer_ids: list[str]) -> None:
    """Drop an evicted job's series, so /metrics stays bounded by the jobs the service keeps
    (removing a series that was never set is a no-op)."""
    for metric in _PER_JOB:
        metric.remove(job_id)
    for reason in AckReason.values():
        COMMANDS.remove(job_id, ack_reason(reason))
    for layer in layer_ids:
        ALPHA_MEAN.remove(job_id, layer)
        for stage in SeedStage:
            SEEDS.remove(job_id, layer, stage.name)
