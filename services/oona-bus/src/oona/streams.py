"""Stream names of DESIGN §4, in one place."""

from __future__ import annotations

TELEMETRY_SEED_HEALTH = "telemetry.seed.health"
CONTROL_ACKS = "control.kasmina.acks"
FIELD_REPORTS = "innovation.field_reports"
EPOCH_EVENTS = "system.events.epoch"
BLUEPRINT_PROPOSALS = "innovation.blueprints"  # Karn's search: new specs (BlueprintProposal)
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


TELEMETRY_PREFIX = "telemetry."


def must_not_lose(stream: str) -> bool:
    """Whether a stream is trimmed only past what every consumer group is done with (commands,
    acks, field reports, epoch events, any other stream) rather than capped like telemetry
    (`telemetry.*`, droppable by design: DESIGN §4). Dead-letter streams are capped: they have
    no consumer group to wait for."""
    return not (stream.startswith(TELEMETRY_PREFIX) or stream.endswith(DLQ_SUFFIX))


def trim_mode(stream: str) -> str:
    """The trim mode argument of oona.scripts' PUBLISH, TRIM and REPLAY for `stream`."""
    return "guarded" if must_not_lose(stream) else "capped"


_FAMILIES = frozenset({TELEMETRY_SEED_HEALTH, CONTROL_ACKS, FIELD_REPORTS, EPOCH_EVENTS,
                       BLUEPRINT_PROPOSALS})


def family(stream: str) -> str:
    """A bounded metric label for a stream: its DESIGN name without the job part, else "other"."""
    base = stream.removesuffix(DLQ_SUFFIX)
    if base.startswith(_COMMANDS_PREFIX):
        base = _COMMANDS_PREFIX.rstrip(".")
    elif base not in _FAMILIES:
        base = "other"
    return base + (DLQ_SUFFIX if stream.endswith(DLQ_SUFFIX) else "")
