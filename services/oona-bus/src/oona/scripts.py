"""Server-side pieces of publishing and consuming: Lua scripts and reply parsing."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Ids travel '\n'-joined in one argument: redis-py spends about a microsecond of Python per
# argument, which at tens of thousands of messages per second would dominate the client's time.
# (oona.envelope refuses event ids that contain '\n'.)

# Publish a batch to one stream, each event id at most once within the dedupe TTL: the check and
# the XADD are atomic, so a publisher that retries after a lost reply cannot write a duplicate,
# and consumers need no lookup before handling (acknowledgement is atomic with success, so a
# redelivered entry was by construction never handled to the end).
# KEYS[1]: stream. ARGV: MAXLEN (approximate), dedupe TTL s (0: no dedupe), dedupe key prefix,
# event ids, then one envelope per event id. Returns per message its entry id, or false (nil)
# where the event id was already published.
PUBLISH = """
local ids = {}
for id in string.gmatch(ARGV[4], '[^\\n]+') do ids[#ids + 1] = id end
local out = {}
for i = 1, #ids do
  local key = ARGV[3] .. ids[i]
  if ARGV[2] == '0' or redis.call('EXISTS', key) == 0 then
    -- XADD before remembering the id: if it fails, a retry must not be taken for a duplicate.
    out[i] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'envelope', ARGV[4 + i])
    if ARGV[2] ~= '0' then redis.call('SET', key, '1', 'EX', ARGV[2]) end
  else
    out[i] = false
  end
end
return out
"""

# XACK with the entry ids in one argument. KEYS[1]: stream. ARGV: group, entry ids.
ACK = """
local ids = {}
for id in string.gmatch(ARGV[2], '[^\\n]+') do ids[#ids + 1] = id end
if #ids == 0 then return 0 end
return redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
"""
# Dead-letter an entry: XADD to the DLQ and XACK on the stream, atomically. A script rather than
# MULTI: it is atomic on one server and on one cluster slot alike, and the async cluster client of
# older redis-py (the pin allows redis>=5.0) refuses MULTI. In a Redis Cluster it is used only
# where both keys share a slot (oona.connection.atomic_across); Consumer._dead_letter does the
# other case.
# KEYS: DLQ, stream. ARGV: MAXLEN (approximate), group, entry id, then field, value, ...
DEAD_LETTER = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
return redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
"""

# Replay a dead letter: XADD its fields to the stream and XDEL it from the DLQ, atomically.
# KEYS: stream, DLQ. ARGV: the dead letter's entry id, then field, value, ... Returns the new id.
REPLAY = """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[2], ARGV[1])
return id
"""

# Lua's unpack() limit (LUAI_MAXCSTACK 8000) bounds how many ids one ACK call takes.
MAX_ACK_BATCH = 1000
_HASH_TAG = re.compile(r"\{[^}]+\}")


def dedupe_prefix(stream: str) -> str:
    """Key prefix for a stream's published event ids, in the stream's Redis Cluster slot (its
    own hash tag, or its whole name made the tag)."""
    slot = stream if _HASH_TAG.search(stream) else f"{{{stream}}}"
    return f"{slot}:oona.published:"


# XAUTOCLAIM ... JUSTID through Lua: redis-py's reply callback drops the cursor for JUSTID, and
# JUSTID does not bump the delivery counter (the XCLAIM that follows does, exactly once).
# KEYS[1]: stream. ARGV: group, consumer, min idle ms, cursor, count.
AUTOCLAIM_IDS = """
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5],
                  'JUSTID')
"""


@dataclass(frozen=True)
class AutoclaimPage:
    cursor: str
    claimed: list[str]
    # Entries that were pending but deleted from the stream; Redis 7 reports (and un-pends)
    # them here, Redis 6.2 leaves them pending and returns them among `claimed`.
    deleted: list[str]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_autoclaim_reply(reply: Sequence[Any]) -> AutoclaimPage:
    """Redis 6.2 replies [cursor, ids]; Redis 7.x replies [cursor, ids, deleted_ids]."""
    if len(reply) not in (2, 3):
        raise ValueError(f"unexpected XAUTOCLAIM reply of {len(reply)} elements")
    deleted = reply[2] if len(reply) == 3 else []
    return AutoclaimPage(_text(reply[0]), [_text(i) for i in reply[1]],
                         [_text(i) for i in deleted])
