"""Checks on every message Tamiyo reads, before any of it is used or saved.

A message that fails raises `InvalidContent`, an `oona.Reject`: the bus consumer dead-letters it
at once (`<stream>.dlq`, reason `rejected`, this text as the detail) instead of retrying it, so
a malformed message is never saved into Tamiyo's state and never replayed into a crash. The
same checks run on the state loaded from Redis (a poison entry written by an older Tamiyo is
skipped) and on gRPC `Step` requests (`INVALID_ARGUMENT`).

Fields Tamiyo never reads (`step`, `epochs_in_stage`, an event's `train_loss`, `active_seeds`,
`parameter_count` and failure `message`, an ack's `applied_step` and `message`) are bounded only
by the bus's payload limit; an ack's message is cut to `MAX_LOGGED_CHARS` where it is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from oona import ids
from oona.contracts import (
    CommandAck,
    EpochEvent,
    EpochEventKind,
    LayerHealthReport,
    SeedStage,
)
from oona.errors import Reject

# Job, layer and command ids: oona's one rule (`oona.ids`), the one the runtime checks at attach.
MAX_ID_CHARS = ids.MAX_ID_CHARS
# An epoch Tamiyo can still command (`apply_at_epoch` = epoch + 1 is a uint32): far past any
# real job, and a forged epoch near 2**32 cannot wedge a job's view at its end.
MAX_EPOCH = 10_000_000
# DESIGN §3.1: thousands of seeds per layer must work; 65,536 seeds (chunk size 1 of a
# 65,536-wide layer) is a 3.4 MB report, well inside the bus's payload limit.
MAX_SEEDS_PER_LAYER = 65_536
MAX_LOGGED_CHARS = 500

_STAGES = frozenset(SeedStage.values())
_KINDS = frozenset(EpochEventKind.values()) - {EpochEventKind.EPOCH_EVENT_KIND_UNSPECIFIED}
_INF = math.inf
# Per-seed float columns and their range; NaN is allowed in each (LayerHealthReport: "a metric
# that is not measured in a seed's current stage is NaN"), and so is +inf where the range is
# open (a diverging seed's gradient norm is exactly what the runtime's safety rules look at).
_FLOAT_COLUMNS = {
    "alpha": (0.0, 1.0),
    "chunk_variance": (0.0, _INF),
    "dead_ratio": (0.0, 1.0),
    "mean_abs_correlation": (0.0, 1.0),
    "reconstruction_ratio": (0.0, _INF),
    "grad_norm": (0.0, _INF),
    "drift": (0.0, _INF),
    "contribution": (-_INF, _INF),
}
# The same, for columns a runtime may leave empty (it does not measure them).
_OPTIONAL_FLOAT_COLUMNS = {"output_grad_sq": (0.0, _INF)}


@dataclass(frozen=True)
class JobLimits:
    """How much Tamiyo tracks (TAMIYO_JOB_RETENTION_S, TAMIYO_UNSTARTED_JOB_RETENTION_S,
    TAMIYO_MAX_JOBS, TAMIYO_MAX_LAYERS_PER_JOB). A job with no message for `retention_s` is let
    go, and a finished one's saved state expires that long after its end; so `retention_s` must
    exceed a job's longest epoch plus any pause, or a live job's decision state is let go.

    A job of which no epoch event has come (only reports: a runtime sends JOB_STARTED at attach,
    before its first report, so a real job's event follows its first report within the bus lag)
    is let go after `unstarted_retention_s` (at most `retention_s`): ids that never start a job
    hold a place in `max_jobs` for minutes, not a day."""

    retention_s: float = 24 * 3600.0
    unstarted_retention_s: float = 600.0
    max_jobs: int = 1000
    max_layers_per_job: int = 4096

    def __post_init__(self) -> None:
        if (self.retention_s <= 0 or self.unstarted_retention_s <= 0 or self.max_jobs < 1
                or self.max_layers_per_job < 1):
            raise ValueError("need job_retention_s > 0, unstarted_job_retention_s > 0, "
                             "max_jobs >= 1 and max_layers_per_job >= 1")

    def retention_for(self, started: bool) -> float:
        """Seconds of silence after which a job is let go; `started`: an epoch event came."""
        return self.retention_s if started else min(self.unstarted_retention_s, self.retention_s)


class InvalidContent(Reject):
    """A message whose content breaks the wire contract or Tamiyo's bounds."""


class OverLimit(Reject):
    """A sound message that would make Tamiyo track more than its settings allow."""


def check_id(what: str, value: str) -> None:
    try:
        ids.check_id(what, value)
    except ids.InvalidId as err:
        raise InvalidContent(str(err)) from None


def check_epoch(what: str, epoch: int) -> None:
    if epoch > MAX_EPOCH:
        raise InvalidContent(f"{what} {epoch} is past the last epoch Tamiyo commands "
                             f"({MAX_EPOCH})")


def check_report(report: LayerHealthReport) -> None:
    check_id("job_id", report.job_id)
    check_layer_report(report)


def check_layer_report(report: LayerHealthReport) -> None:
    """Everything in a report but its job id (a `Step` request names the job once)."""
    check_id("layer_id", report.layer_id)
    check_epoch("epoch", report.epoch)
    n = report.num_seeds
    if not 1 <= n <= MAX_SEEDS_PER_LAYER:
        raise InvalidContent(f"num_seeds {n} is not in 1..{MAX_SEEDS_PER_LAYER}")
    for column in ("stage", "blueprint_id", "epochs_in_stage", "strategy_id", "ready_for",
                   *_FLOAT_COLUMNS):
        length = len(getattr(report, column))
        if length != n:
            raise InvalidContent(f"{column} has {length} elements, num_seeds is {n}")
    for column in _OPTIONAL_FLOAT_COLUMNS:
        if (length := len(getattr(report, column))) not in (0, n):
            raise InvalidContent(f"{column} has {length} elements, num_seeds is {n} (or 0)")
    _check_stages("stage", report.stage, allow_unspecified=False)
    _check_stages("ready_for", report.ready_for, allow_unspecified=True)
    for column in ("blueprint_id", "strategy_id"):
        if (low := min(getattr(report, column))) < -1:
            raise InvalidContent(f"{column} has {low}; ids are >= 0, or -1 for none")
    for column, (low, high) in (_FLOAT_COLUMNS | _OPTIONAL_FLOAT_COLUMNS).items():
        values = getattr(report, column)
        # One comprehension per column (NaN fails every comparison, so it lands in `outside`
        # and is let through below): 47 ms for a 65,536-seed report with 4 NaN columns.
        outside = [i for i, v in enumerate(values) if not low <= v <= high]
        for index in outside:
            if not math.isnan(values[index]):
                raise InvalidContent(f"{column}[{index}] = {values[index]} is outside "
                                     f"[{low}, {high}]")
    if report.features and report.features < n:
        raise InvalidContent(f"features {report.features} < num_seeds {n}: every seed needs a "
                             "feature (0 means not reported)")


def check_epoch_event(event: EpochEvent) -> None:
    check_id("job_id", event.job_id)
    if event.kind not in _KINDS:
        raise InvalidContent(f"kind {event.kind} is not a known EpochEventKind")
    check_epoch("epoch", event.epoch)
    if len(event.val_metric_name) > MAX_ID_CHARS:
        raise InvalidContent(f"val_metric_name of {len(event.val_metric_name)} characters "
                             f"(at most {MAX_ID_CHARS})")


def check_ack(ack: CommandAck) -> None:
    check_id("job_id", ack.job_id)
    check_id("command_id", ack.command_id)
    for name in ("stage_before", "stage_after"):
        if getattr(ack, name) not in _STAGES:
            raise InvalidContent(f"{name} {getattr(ack, name)} is not a SeedStage")
    check_epoch("applied_epoch", ack.applied_epoch)


def _check_stages(column: str, values: Sequence[int], *, allow_unspecified: bool) -> None:
    allowed = _STAGES if allow_unspecified else _STAGES - {SeedStage.SEED_STAGE_UNSPECIFIED}
    for index, value in enumerate(values):
        if value not in allowed:
            raise InvalidContent(f"{column}[{index}] = {value} is not a seed stage")

