"""Prometheus metrics of the runtime service. Label sets are bounded: per job and layer, never
per seed (a layer may have thousands); seeds are counted by stage."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
