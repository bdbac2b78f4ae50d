"""Stream names of DESIGN §4, in one place."""

from __future__ import annotations

TELEMETRY_SEED_HEALTH = "telemetry.seed.health"
CONTROL_ACKS = "control.kasmina.acks"
FIELD_REPORTS = "innovation.field_reports"
EPOCH_EVENTS = "system.events.epoch"
_COMMANDS_PREFIX = "control.kasmina.commands."
DLQ_SUFFIX = ".dlq"


def commands(job_id: str) -> str:
    """The command stream of one job. The braces make job_id the Redis Cluster hash tag, so a
    job's command stream and its keys land on one shard."""
    if not job_id or any(c in job_id for c in "{}"):
        raise ValueError(f"invalid job_id {job_id!r}")
    return f"{_COMMANDS_PREFIX}{{{job_id}}}"


def dead_letters(stream: str) -> str:
    return stream + DLQ_SUFFIX


_FAMILIES = frozenset({TELEMETRY_SEED_HEALTH, CONTROL_ACKS, FIELD_REPORTS, EPOCH_EVENTS})


def family(stream: str) -> str:
    """A bounded metric label for a stream: its DESIGN name without the job part, else "other"."""
    base = stream.removesuffix(DLQ_SUFFIX)
    if base.startswith(_COMMANDS_PREFIX):
        base = _COMMANDS_PREFIX.rstrip(".")
    elif base not in _FAMILIES:
        base = "other"
    return base + (DLQ_SUFFIX if stream.endswith(DLQ_SUFFIX) else "")
