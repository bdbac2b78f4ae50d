"""The one rule for the ids the services exchange: job, layer and command ids.

They become Redis keys (`tamiyo:job:{<job_id>}`, whose braces are the Redis Cluster hash tag, so
no braces), stream names (`control.kasmina.commands.<job_id>`), metric labels, log lines and, for
a job id, checkpoint file names (no `/`). What the runtime produces fits: layer ids are module
paths (`model.layers.0.self_attn.q_proj`, `0.linear` in an nn.Sequential, `_orig_mod.fc1` under
torch.compile), command ids uuids (Tamiyo's) or any caller's names, `:` included. 128
characters, the bus's own event id limit, holds the longest Hugging Face module paths (under
80).

The runtime checks its job and layer ids at attach, the runtime service a submitted job id, and
Tamiyo every id it reads, all with `check_id`, so an id one accepts is never refused by another.
"""

from __future__ import annotations

import re

MAX_ID_CHARS = 128
# ASCII letters, digits and `_` first (not `.` or `-`: no hidden files, no option-like names),
# then those and `.`, `:`, `-`. No `/`, spaces, braces, control characters or non-ASCII.
ID_PATTERN = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.:-]{{0,{MAX_ID_CHARS - 1}}}")
_SHOWN_CHARS = 60


class InvalidId(ValueError):
    """An id outside the rule of this module; the text names the field and shows the id
    (cut to 60 characters)."""


def is_valid_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


def check_id(what: str, value: str) -> str:
    """`value` if it is a valid id; `InvalidId` naming `what` otherwise."""
    if not is_valid_id(value):
        shown = repr(value[:_SHOWN_CHARS])
        if len(value) > _SHOWN_CHARS:
            shown += f"... ({len(value)} characters)"
        raise InvalidId(f"{what} {shown} is not an id: 1-{MAX_ID_CHARS} characters of "
                        f"[A-Za-z0-9_.:-], not starting with '.', ':' or '-'")
    return value
