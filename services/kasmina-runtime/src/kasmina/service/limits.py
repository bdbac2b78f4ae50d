"""What the runtime service accepts from a client: job ids, job parameters and paths, each
checked against documented bounds before anything is allocated or written."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from oona import ids

from ..recipes import DigitsParams

# Job ids name streams, files and metric labels: oona's one id rule (no path or hash-tag
# characters), the one Tamiyo checks too. The pattern is re-exported for the job registry.
JOB_ID_PATTERN = ids.ID_PATTERN

# Inclusive bounds of the digits recipe's numeric parameters. Widths bound memory (a 4096-wide
# digits host is ~300k parameters); epochs bound a job's run time (~0.1 s an epoch on a CPU).
DIGITS_BOUNDS: dict[str, tuple[float, float]] = {
    "epochs": (1, 100_000),
    "hidden": (1, 4096),
    "bottleneck": (1, 4096),
    "seeds_per_layer": (1, 4096),  # and at most `hidden`: one feature per seed at the least
    "seed": (0, 2**32 - 1),
    "lr": (1e-8, 10.0),
    "seed_lr": (1e-8, 10.0),
    "weight_decay": (0.0, 100.0),
    "batch_size": (1, 4096),
}
# Parameters of the service, not the recipe: how the job survives a runtime restart.
SERVICE_PARAMETERS = {"resume_on_restart": False, "checkpoint_every": 0}
CHECKPOINT_EVERY_MAX = 100_000
MAX_PARAMETERS = 32
MAX_VALUE_CHARS = 4096
PATH_MAX_CHARS = 1024


class LimitReached(Exception):
    """A bounded resource (jobs, watchers) is full: the client may try again later."""


def check_job_id(job_id: str) -> str:
    """`job_id`, or an `oona.ids.InvalidId` (a ValueError) naming the field."""
    return ids.check_id("job_id", job_id)


def parse_job_parameters(parameters: dict[str, str]) -> tuple[DigitsParams, dict[str, object]]:
    """The recipe's parameters and the service's, each checked; a ValueError names the field."""
    if len(parameters) > MAX_PARAMETERS:
        raise ValueError(f"parameters: at most {MAX_PARAMETERS}, got {len(parameters)}")
    recipe, service = {}, dict(SERVICE_PARAMETERS)
    for name, text in parameters.items():
        if len(text) > MAX_VALUE_CHARS:
            raise ValueError(f"{name[:40]}: value longer than {MAX_VALUE_CHARS} characters")
        if name == "resume_on_restart":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{name}: expected true/false, got {text!r}")
            service[name] = text.lower() in ("true", "1")
        elif name == "checkpoint_every":
            service[name] = _bounded_int(name, text, 0, CHECKPOINT_EVERY_MAX)
        else:
            try:  # one at a time, so the error names the field
                DigitsParams.from_strings({name: text})
            except ValueError as err:
                raise ValueError(f"{name[:40]}: {err}") from None
            recipe[name] = text
    params = DigitsParams.from_strings(recipe)
    for field in dataclasses.fields(params):
        if field.name not in DIGITS_BOUNDS:
            continue
        value, (low, high) = getattr(params, field.name), DIGITS_BOUNDS[field.name]
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(f"{field.name}: {value} is outside [{low:g}, {high:g}]")
    if params.seeds_per_layer > params.hidden:
        raise ValueError(f"seeds_per_layer: {params.seeds_per_layer} is more than hidden "
                         f"({params.hidden}); a seed needs at least one feature")
    return params, service


def _bounded_int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name}: {value} is outside [{low}, {high}]")
    return value


def confined(directory: Path, path: str | Path) -> Path:
    """`path` (relative to `directory`, or absolute) resolved, symlinks included; a
    PermissionError unless it lies inside `directory`."""
    text = str(path)
    if not text or "\0" in text or len(text) > PATH_MAX_CHARS or any(
            len(part) > 255 for part in Path(text).parts):
        raise ValueError(f"path: empty, with a NUL, longer than {PATH_MAX_CHARS} characters or "
                         f"with a name longer than 255")
    root = directory.resolve()
    resolved = (root / path).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise PermissionError(f"path {str(path)[:200]!r} is outside the checkpoint directory")
    return resolved
