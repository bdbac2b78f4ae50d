"""Server-side pieces of the consumer: Lua scripts and reply parsing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Acknowledge handled entries and remember their event_ids in one atomic step, so a crash can
# never leave an event acknowledged but not deduplicated (or the reverse). One EVALSHA per batch
# also costs far less client CPU than one SET per message.
# KEYS[1]: stream; KEYS[2..]: dedupe keys. ARGV[1]: group, ARGV[2]: TTL s, ARGV[3..]: entry ids.
ACK_AND_MARK = """
for i = 2, #KEYS do redis.call('SET', KEYS[i], '1', 'EX', ARGV[2]) end
if #ARGV < 3 then return 0 end
return redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
"""
# Lua's unpack() limit (LUAI_MAXCSTACK 8000) bounds how many ids one ACK_AND_MARK call takes.
MAX_ACK_BATCH = 1000

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
