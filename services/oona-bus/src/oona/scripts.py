"""Server-side pieces of publishing and consuming: Lua scripts and reply parsing."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Ids travel '\n'-joined in one argument: redis-py spends about a microsecond of Python per
# argument, which at tens of thousands of messages per second would dominate the client's time.
# (oona.envelope refuses event ids that contain '\n'.)

# Trimming, shared by the scripts that add to a stream. Mode 'capped' (telemetry): XADD ... MAXLEN ~
# cap, the oldest go whether read or not. Mode 'guarded' (streams that must not lose): the oldest
# entries beyond the cap are removed only once every consumer group is done with them (delivered
# and acknowledged: older than the group's oldest pending entry, and not after its
# last-delivered-id); what stays beyond the cap is returned, for the oona_stream_over_cap gauge.
# A guarded stream without any group falls back to MAXLEN ~ (there is no reader to wait for).
# A group whose consumers have all been idle longer than the stale limit (a replica that is gone
# for good: Tamiyo's groups are per host name) holds nothing back; what is trimmed that it had
# not read is returned too, for oona_trimmed_unread_total and a warning: counted, never silent.
# One trim removes at most TRIM_SCAN entries, which bounds the time the script holds the server;
# publishing adds at most MAX_BATCH per call, so a stream whose groups keep up stays at the cap.
TRIM_SCAN = 2000
_TRIM = """
local function oona_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function oona_before(a, b)
  local am, as = oona_id(a)
  local bm, bs = oona_id(b)
  return am < bm or (am == bm and as < bs)
end
local function oona_fields(flat)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end
-- Returns {entries that stay beyond maxlen because a live group still needs them, entries
-- trimmed that a stale group had not read}.
local function oona_trim(key, maxlen, mode, stale_ms)
  local excess = redis.call('XLEN', key) - maxlen
  if excess <= 0 then return {0, 0} end
  local groups = redis.call('XINFO', 'GROUPS', key)
  if mode ~= 'guarded' or #groups == 0 then
    redis.call('XTRIM', key, 'MAXLEN', '~', maxlen)
    return {0, 0}
  end
  -- Per group: entries before `bound` are done (strictly before its oldest pending entry, or up
  -- to and including its last-delivered-id when nothing is pending).
  local live, stale = {}, {}
  for _, group in ipairs(groups) do
    local info = oona_fields(group)
    local bound
    if tonumber(info['pending']) > 0 then
      bound = {redis.call('XPENDING', key, info['name'])[2], false}
    else
      bound = {info['last-delivered-id'], true}
    end
    local fresh = stale_ms <= 0 or tonumber(info['consumers']) == 0
    if not fresh then
      for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', key, info['name'])) do
        if tonumber(oona_fields(consumer)['idle']) <= stale_ms then fresh = true break end
      end
    end
    if fresh then live[#live + 1] = bound else stale[#stale + 1] = bound end
  end
  local function done(id, bounds)
    for _, b in ipairs(bounds) do
      if not (oona_before(id, b[1]) or (b[2] and id == b[1])) then return false end
    end
    return true
  end
  -- Walk the oldest entries in pages (a lagging group usually stops it at the first one).
  local k = math.min(excess, TRIM_SCAN)
  local cut, unread, from, boundary = 0, 0, '-', nil
  while cut < k and boundary == nil do
    for _, entry in ipairs(redis.call('XRANGE', key, from, '+', 'COUNT', math.min(k - cut, 100))) do
      if not done(entry[1], live) then boundary = entry[1] break end
      if not done(entry[1], stale) then unread = unread + 1 end
      cut = cut + 1
      from = '(' .. entry[1]
    end
  end
  if cut == 0 then return {excess, 0} end
  if boundary == nil then boundary = redis.call('XRANGE', key, from, '+', 'COUNT', 1)[1][1] end
  redis.call('XTRIM', key, 'MINID', boundary)
  return {excess - cut, unread}
end
""".replace("TRIM_SCAN", str(TRIM_SCAN))

# Publish a batch to one stream, each event id at most once within the dedupe TTL: the check and
# the XADD are atomic, so a publisher that retries after a lost reply cannot write a duplicate,
# and consumers need no lookup before handling (acknowledgement is atomic with success, so a
# redelivered entry was by construction never handled to the end).
# KEYS[1]: stream. ARGV: MAXLEN, trim mode ('capped' or 'guarded', see _TRIM), stale group ms,
# dedupe TTL s (0: no dedupe), dedupe key prefix, event ids, then one envelope per event id.
# Returns per message its entry id, or false (nil) where the event id was already published,
# then oona_trim's two counts.
PUBLISH = _TRIM + """
local ids = {}
for id in string.gmatch(ARGV[6], '[^\\n]+') do ids[#ids + 1] = id end
local capped = ARGV[2] ~= 'guarded'
local out = {}
for i = 1, #ids do
  local key = ARGV[5] .. ids[i]
  if ARGV[4] == '0' or redis.call('EXISTS', key) == 0 then
    -- XADD before remembering the id: if it fails, a retry must not be taken for a duplicate.
    if capped then
      out[i] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'envelope', ARGV[6 + i])
    else
      out[i] = redis.call('XADD', KEYS[1], '*', 'envelope', ARGV[6 + i])
    end
    if ARGV[4] ~= '0' then redis.call('SET', key, '1', 'EX', ARGV[4]) end
  else
    out[i] = false
  end
end
local trimmed = {0, 0}
if not capped then trimmed = oona_trim(KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])) end
out[#ids + 1] = trimmed[1]
out[#ids + 2] = trimmed[2]
return out
"""

# Trim one stream by its mode (see _TRIM). KEYS[1]: stream. ARGV: MAXLEN, mode, stale group ms.
# Returns oona_trim's two counts.
TRIM = _TRIM + """
return oona_trim(KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]))
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

# Replay a dead letter: XADD its fields to the stream and XDEL it from the DLQ, atomically, and
# trim the stream by its mode (see _TRIM). KEYS: stream, DLQ. ARGV: the dead letter's entry id,
# MAXLEN, mode, stale group ms, then field, value, ... Returns the new id.
REPLAY = _TRIM + """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))
redis.call('XDEL', KEYS[2], ARGV[1])
oona_trim(KEYS[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]))
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
