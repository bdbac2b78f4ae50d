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
# entries beyond the cap are removed only once every consumer group is done with them (delivered:
# not after its last-delivered-id, and acknowledged: before its oldest pending entry); what stays
# beyond the cap is returned, for the oona_stream_over_cap gauge, with the name of the group that
# holds it. A guarded stream without any group falls back to MAXLEN ~ (no reader to wait for).
# A group whose consumers have all been idle longer than the stale limit (a replica that is gone
# for good: Tamiyo's groups are per host name), or that has no consumer and left an entry unread
# for that long, holds nothing back; what is trimmed that it was never delivered is returned
# too, for oona_trimmed_unread_total and a warning: counted, never silent.
# A trim runs only once TRIM_BATCH entries are beyond the cap, and cuts with MINID ~: Redis frees
# a stream's memory in whole nodes (stream-node-max-entries, 100 by default; a partial cut only
# marks entries deleted), so smaller or exact cuts cost work and free nothing. One trim looks at
# most at TRIM_SCAN entries, which bounds the time the script holds the server; publishing adds at
# most MAX_BATCH per call and trims after, so a stream whose groups keep up stays within about
# cap + TRIM_BATCH.
TRIM_SCAN = 2000
TRIM_BATCH = 100
_TRIM = """
local function oona_before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local function oona_fields(flat)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end
-- A bound {id, inclusive}: entries before id (and id itself when inclusive) are done. The
-- stricter of two bounds (nil: none yet).
local function oona_min(a, b)
  if a == nil then return b end
  if oona_before(b[1], a[1]) or (b[1] == a[1] and not b[2]) then return b end
  return a
end
local function oona_stale(key, info, stale_ms)
  if stale_ms <= 0 then return false end
  if tonumber(info['consumers']) == 0 then
    -- No consumer to ask how long it has been idle: stale once the oldest entry it was never
    -- delivered has waited longer than the limit (ids are publish times in ms).
    local waiting = redis.call('XRANGE', key, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)[1]
    if waiting == nil then return false end
    local now = redis.call('TIME')
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    return now_ms - tonumber(string.match(waiting[1], '^(%d+)')) > stale_ms
  end
  for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', key, info['name'])) do
    if tonumber(oona_fields(consumer)['idle']) <= stale_ms then return false end
  end
  return true
end
-- Returns {entries that stay beyond maxlen because a live group still needs them, entries
-- trimmed that a stale group was never delivered, the name of the group that stops the trim
-- (false if none)}.
local function oona_trim(key, maxlen, mode, stale_ms)
  local excess = redis.call('XLEN', key) - maxlen
  if excess < TRIM_BATCH then return {0, 0, false} end
  local groups = redis.call('XINFO', 'GROUPS', key)
  if mode ~= 'guarded' or #groups == 0 then
    redis.call('XTRIM', key, 'MAXLEN', '~', maxlen)
    return {0, 0, false}
  end
  -- live: the strictest bound of the live groups (and its group); unread_after: entries after
  -- the smallest last-delivered-id of the stale groups were never delivered to one of them.
  local live, blocker, unread_after = nil, false, nil
  for _, group in ipairs(groups) do
    local info = oona_fields(group)
    local bound = {info['last-delivered-id'], true}
    if tonumber(info['pending']) > 0 then
      bound = oona_min(bound, {redis.call('XPENDING', key, info['name'])[2], false})
    end
    if oona_stale(key, info, stale_ms) then
      unread_after = oona_min(unread_after, {info['last-delivered-id'], true})
    else
      live = oona_min(live, bound)
      if live == bound then blocker = info['name'] end
    end
  end
  -- Only the entries that are done are read (XRANGE stops at the bound): a lagging group costs
  -- no read at all.
  local stop = '+'
  if live ~= nil then stop = live[2] and live[1] or '(' .. live[1] end
  local k = math.min(excess, TRIM_SCAN)
  local cut, first_unread, from, last = 0, nil, '-', nil
  while cut < k do
    local want = math.min(k - cut, 100)
    local page = redis.call('XRANGE', key, from, stop, 'COUNT', want)
    for _, entry in ipairs(page) do
      cut = cut + 1
      if first_unread == nil and unread_after ~= nil and oona_before(unread_after[1], entry[1]) then
        first_unread = cut
      end
      last = entry[1]
    end
    if #page < want then break end
    from = '(' .. last
  end
  if cut == 0 then return {excess, 0, blocker} end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  -- MINID ~ removes whole nodes from the front: the first `removed` entries walked above.
  local removed = redis.call('XTRIM', key, 'MINID', '~', ms .. '-' .. string.format('%d', seq + 1))
  local unread = 0
  if first_unread ~= nil then unread = math.max(0, math.min(removed, cut) - first_unread + 1) end
  if cut == k then blocker = false end
  return {excess - cut, unread, blocker}
end
-- oona_trim's reply, or on an error {0, 0, false, the error}: the caller's writes are already
-- done and stay (a script has no rollback), so a trim that fails must not fail the reply. The
-- likely cause is a Redis user without the commands above (README: ACL).
local function oona_try_trim(key, maxlen, mode, stale_ms)
  local ok, reply = pcall(oona_trim, key, maxlen, mode, stale_ms)
  if ok then
    reply[4] = false
    return reply
  end
  if type(reply) == 'table' then reply = reply['err'] end
  return {0, 0, false, tostring(reply)}
end
""".replace("TRIM_SCAN", str(TRIM_SCAN)).replace("TRIM_BATCH", str(TRIM_BATCH))

# Publish a batch to one stream, each event id at most once within the dedupe TTL: the check and
# the XADD are atomic, so a publisher that retries after a lost reply cannot write a duplicate,
# and consumers need no lookup before handling (acknowledgement is atomic with success, so a
# redelivered entry was by construction never handled to the end).
# The adds come first: Redis checks maxmemory at a script's first write only (on 6.2.14 and 7.0.15 a
# script whose XTRIM removed nothing then XADDs past maxmemory), so a trim before
# them would let the adds past maxmemory even when it freed nothing. At maxmemory the script is
# refused before writing anything; the publisher then runs TRIM alone and retries (Publisher).
# KEYS[1]: stream. ARGV: MAXLEN, trim mode ('capped' or 'guarded', see _TRIM), stale group ms,
# dedupe TTL s (0: no dedupe), dedupe key prefix, event ids, then one envelope per event id.
# Returns per message its entry id, or false (nil) where the event id was already published,
# then oona_try_trim's four values.
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
local trimmed = {0, 0, false, false}
if not capped then
  trimmed = oona_try_trim(KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]))
end
for i = 1, 4 do out[#ids + i] = trimmed[i] end
return out
"""

# Trim one stream by its mode (see _TRIM). KEYS[1]: stream. ARGV: MAXLEN, mode, stale group ms.
# Returns oona_try_trim's four values. Allowed at maxmemory: XTRIM is the only write.
TRIM = _TRIM + """
return oona_try_trim(KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]))
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
# MAXLEN, mode, stale group ms, then field, value, ... Returns the new id, then oona_try_trim's
# four values.
REPLAY = _TRIM + """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))
redis.call('XDEL', KEYS[2], ARGV[1])
local trimmed = oona_try_trim(KEYS[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]))
return {id, trimmed[1], trimmed[2], trimmed[3], trimmed[4]}
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
