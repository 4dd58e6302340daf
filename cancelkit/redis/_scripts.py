"""The Lua scripts of :class:`cancelkit.redis.RedisBackend`: the registry side (no coredis here).

The LatestOnly scripts are in :mod:`cancelkit.redis._slot_scripts`.

Keys (``P`` is the backend's prefix, ``N`` an owner-scoped operation name, ``W`` a worker id,
``H`` a holder id; every key has a TTL). On a Redis Cluster ``P`` is the hash tag of the slot
group of the key's entity (:class:`~cancelkit.redis._config.Keys`): the operation id for the
registry's keys, the worker for its inbox; the counted sets (``P:tz``, ``P:sz``), ``P:gen``,
the liveness keys and the channels exist once per group.

- ``P:r:N`` a registration, a hash: ``o`` = ``"W H"``, ``c`` = the first cancel reason (JSON)
  once the operation was cancelled; TTL: the lease, refreshed by the heartbeat.
- ``P:r:N#c`` the cancel reason of a running registration, kept for the tombstone TTL, so a
  cancel survives even if the registration's lease lapsed before its worker heard of it.
  Every script that records a cancel on a registration writes it: CANCEL, and REGISTER and
  the resync when they take a tombstone (their reply, which tells the worker, can be lost).
- ``P:t:N`` a tombstone (the reason, JSON) and ``P:f:N`` a finished-marker (``1``, or the
  reason of the cancel that won, for a retried UNREGISTER); TTL: tombstone TTL.
- ``P:i:ID`` the registration keys running under operation id ``ID`` (any owner), so that a
  cancel by another owner answers "not found" and writes no tombstone; TTL: the lease.
- ``P:tz`` a sorted set of live tombstone keys scored by expiry (ms), for the tombstone limit;
  ``P:tz:O`` the same for one owner (``O`` = ``len:owner``, ``-`` for no owner), for the
  per-owner limit.
- ``P:co:X`` the answer of cancel call ``X`` (a random id per call), so a retried call
  answers what the first one did; TTL: the lease.
- ``P:in:W`` a worker's inbox, a list of the message lines sent to it (below); TTL: the lease.
- ``P:tz`` a sorted set of live tombstone keys scored by expiry (ms), for the tombstone limit.
- ``P:k:K`` the state of latest-only key ``K`` (its claims' states, its limit, its newest
  sequence number) and ``P:q:K`` its claims by generation; ``P:sz`` the released keys whose
  sequence number is remembered: see :mod:`cancelkit.redis._slot_scripts`.
- ``P:gen`` the generation counter: ``max(counter + 1, server time in µs)``, so it stays
  monotonic even after the key expired.
- ``P:a:W`` a worker's liveness; a claim of a worker whose key expired is pruned from queues.

Messages, published on a worker's channel ``P:w:W`` and pushed to its inbox ``P:in:W`` (and
returned by the sync scripts):
``c H REASON`` cancel registration holder H; ``s H NEW`` holder H was superseded by NEW;
``t H`` holder H may have its turn; ``l H [W H2]`` (sync only) H's registration was taken over:
held by holder H2 of worker W now, or (no tail) another run of the id ended after its lease
lapsed. The worker cancels H at once: one run per id, fleet-wide.
"""

from __future__ import annotations

__all__ = ["CANCEL", "COMMIT", "INBOX", "REGISTER", "SYNC_REGISTRATIONS", "UNREGISTER"]

#: KEYS: reg, tomb, fin, tz, id-index. ARGV: "W H", lease ms, tombstone ttl ms.
#: Returns {-1} (registered by another holder), {1, reason} (cancelled: tombstoned), or {0}.
#: A tombstone refuses the start and stays until it expires (a retried start is refused the
#: same way); nothing is recorded then. Idempotent for one holder.
REGISTER = """
local cur = redis.call('HGET', KEYS[1], 'o')
if cur then
  if cur ~= ARGV[1] then return {-1} end
  local c = redis.call('HGET', KEYS[1], 'c')
  if c then return {1, c} end
  return {0}
end
local t = redis.call('GET', KEYS[2])
if t then return {1, t} end
redis.call('DEL', KEYS[3], KEYS[1] .. '#c')
redis.call('HSET', KEYS[1], 'o', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[5], KEYS[1])
redis.call('PEXPIRE', KEYS[5], ARGV[2])
return {0}
"""

#: KEYS: reg, fin, id-index, tomb. ARGV: "W H", tombstone ttl ms. Compare-and-delete, leaves a
#: finished-marker: '1', or the reason of the cancel that won, so that a call retried after
#: its reply was lost (the script ran) answers the same. Returns that reason (recorded on the
#: registration, kept in ``reg#c`` after its lease lapsed, a tombstone written while the
#: registration was gone from the server (its lease lapsed, or a failover lost it: that cancel
#: answered PENDING while the body ran), or in the finished-marker after this script ran), or
#: '' (none, or it committed). A registration gone from the server leaves no finished-marker:
#: a worker's resync reads one as "another run of the id ended" and cancels its own copy, and
#: this holder may never have run (a start abandoned while Redis was unreachable); a later
#: cancel answers 'pending', true then: nothing of the id runs, and it never starts again
#: before the tombstone expires.
UNREGISTER = """
local cur = redis.call('HGET', KEYS[1], 'o')
local c = false
if cur == ARGV[1] then
  if not redis.call('HGET', KEYS[1], 'm') then c = redis.call('HGET', KEYS[1], 'c') end
  redis.call('DEL', KEYS[1], KEYS[1] .. '#c')
  redis.call('SREM', KEYS[3], KEYS[1])
  redis.call('SET', KEYS[2], c or '1', 'PX', ARGV[2])
elseif not cur then
  c = redis.call('GET', KEYS[1] .. '#c') or redis.call('GET', KEYS[4])
  if not c then
    local f = redis.call('GET', KEYS[2])
    if f ~= '1' then c = f end
  end
end
return c or ''
"""

#: KEYS: reg, tomb, id-index. ARGV: "W H", lease ms. The commit point of a registration:
#: exactly one of a cancel and the commit wins. Returns {1, reason} (a cancel won: recorded on
#: the registration, kept after its lease lapsed, or a tombstone written since), {2, "W H"}
#: (another holder runs the id now), or {0} (committed: CANCEL answers 'committed' from now on; a
#: registration whose lease lapsed is recorded again, committed).
COMMIT = """
local cur = redis.call('HGET', KEYS[1], 'o')
if cur and cur ~= ARGV[1] then return {2, cur} end
local c = cur and redis.call('HGET', KEYS[1], 'c')
  or redis.call('GET', KEYS[1] .. '#c') or redis.call('GET', KEYS[2])
if c then return {1, c} end
redis.call('HSET', KEYS[1], 'o', ARGV[1], 'm', '1')
if not cur then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[3], KEYS[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return {0}
"""

#: Sends a message line to worker W: PUBLISH on its channel (the fast path) and RPUSH to its
#: inbox (the bounded path: the worker reads it on every reconnect and every poll). The inbox
#: keeps the newest 1000 lines and lives for a lease after the last one.
#: send(W, line, channel prefix, inbox prefix, lease ms); publish = false for this worker.
#: On a cluster with keys spread over slot groups, the channel prefix is the one of the
#: script's own group (every worker listens in every group) and the inbox prefix is '': the
#: inbox is in the worker's group, another slot, so send returns false and the caller writes
#: the inbox (INBOX).
SEND = """
local function send(w, line, channels, inboxes, lease, publish)
  if publish then redis.call('PUBLISH', channels .. w, line) end
  if inboxes == '' then return false end
  local inbox = inboxes .. w
  redis.call('RPUSH', inbox, line)
  redis.call('LTRIM', inbox, -1000, -1)
  redis.call('PEXPIRE', inbox, lease)
  return true
end
"""

#: The inbox half of SEND, for a caller whose script could not write it (keys spread over
#: slot groups: the worker's inbox is in the worker's group). KEYS: the worker's inbox.
#: ARGV: the line, lease ms.
INBOX = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -1000, -1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: KEYS: reg, tomb, fin, tz, id-index, the owner's tombstone set, the outcome of this call.
#: ARGV: reason, tombstone ttl ms, max tombstones, channel prefix, this worker, max tombstones
#: per owner, inbox prefix ('' when keys are spread: the caller writes the inbox), lease ms.
#: An id running for another owner looks absent: 'not_found'. Idempotent: a retried call
#: (same outcome key) answers what the first answered, even if the operation finished in
#: between (never 'not_found' for a call that cancelled it). Returns
#: {'cancelled', W, H, reason} | {'not_found'} | {'pending'} | {'full', option name}.
CANCEL = (
    SEND
    + """
local prior = redis.call('GET', KEYS[7])
if prior then return cjson.decode(prior) end
local function answer(reply)
  redis.call('SET', KEYS[7], cjson.encode(reply), 'PX', ARGV[8])
  return reply
end
local cur = redis.call('HGET', KEYS[1], 'o')
if cur then
  if redis.call('HGET', KEYS[1], 'm') then return answer({'committed'}) end
  local w, h = string.match(cur, '^(%S+) (%S+)$')
  redis.call('HSETNX', KEYS[1], 'c', ARGV[1])
  local c = redis.call('HGET', KEYS[1], 'c')
  redis.call('SET', KEYS[1] .. '#c', c, 'PX', ARGV[2])
  send(w, 'c ' .. h .. ' ' .. c, ARGV[4], ARGV[7], ARGV[8], w ~= ARGV[5])
  return answer({'cancelled', w, h, c})
end
for _, other in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  if redis.call('EXISTS', other) == 1 then return {'not_found'} end
  redis.call('SREM', KEYS[5], other)
end
if redis.call('EXISTS', KEYS[2]) == 1 then return answer({'pending'}) end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'not_found'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[3]) then return {'full', 'max_tombstones'} end
local per_owner = tonumber(ARGV[6])
if per_owner > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
  if redis.call('ZCARD', KEYS[6]) >= per_owner then
    for _, other in ipairs(redis.call('ZRANGE', KEYS[6], 0, -1)) do
      if redis.call('EXISTS', other) == 0 then redis.call('ZREM', KEYS[6], other) end
    end
    if redis.call('ZCARD', KEYS[6]) >= per_owner then
      return {'full', 'max_tombstones_per_owner'}
    end
  end
end
local expiry = string.format('%d', now + tonumber(ARGV[2]))
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[4], expiry, KEYS[2])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
if per_owner > 0 then
  redis.call('ZADD', KEYS[6], expiry, KEYS[2])
  redis.call('PEXPIRE', KEYS[6], ARGV[2])
end
return answer({'pending'})
"""
)

#: The heartbeat and the resync after a reconnect, for registrations: refresh this worker's
#: liveness and the TTLs of its registrations, re-assert those that Redis lost, and report
#: what the worker missed.
#: KEYS: alive, tz, then three per entry (reg, tomb, fin). ARGV: W, lease ms, then three per
#: entry (H, id-index key, '1' if it committed while Redis was unreachable else '0'). Returns
#: message lines (see the module docs). A registration held by another holder, or gone with a
#: finished-marker (another run of the id registered after this one's lease lapsed, and
#: ended), is not re-asserted: the line ``l H`` tells the worker to cancel its copy.
SYNC_REGISTRATIONS = """
local W, lease = ARGV[1], ARGV[2]
-- A write that needs no memory first: under OOM (noeviction) Redis refuses only a script's
-- first write, so the leases are still refreshed.
if redis.call('PEXPIRE', KEYS[1], lease) == 0 then redis.call('SET', KEYS[1], '1', 'PX', lease) end
local out = {}
local n = (#ARGV - 2) / 3
for i = 0, n - 1 do
  local h, g, m = ARGV[3 + 3 * i], ARGV[4 + 3 * i], ARGV[5 + 3 * i] == '1'
  local k1, k2, k3 = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local me = W .. ' ' .. h
  redis.call('SADD', g, k1)
  redis.call('PEXPIRE', g, lease)
  local cur = redis.call('HGET', k1, 'o')
  if cur == me then
    redis.call('PEXPIRE', k1, lease)
    local c = redis.call('HGET', k1, 'c')
    if c then out[#out + 1] = 'c ' .. h .. ' ' .. c
    elseif m then redis.call('HSET', k1, 'm', '1') end
  elseif not cur and redis.call('EXISTS', k3) == 1 then
    out[#out + 1] = 'l ' .. h
  elseif not cur then
    local t = redis.call('GET', k1 .. '#c')
    if not t then
      t = redis.call('GET', k2)
      if t then
        -- The reason outlives the lease, for as long as the tombstone does: the reply that
        -- carries it to the worker can be lost, and the lease can lapse before the next
        -- resync (then the registration, and its 'c', are gone). The tombstone stays: a
        -- start of the id before it expires is refused too.
        local ttl = redis.call('PTTL', k2)
        if ttl <= 0 then ttl = lease end
        redis.call('SET', k1 .. '#c', t, 'PX', ttl)
      end
    end
    redis.call('HSET', k1, 'o', me)
    if t then
      redis.call('HSET', k1, 'c', t)
      out[#out + 1] = 'c ' .. h .. ' ' .. t
    elseif m then
      redis.call('HSET', k1, 'm', '1')
    end
    redis.call('PEXPIRE', k1, lease)
  else
    out[#out + 1] = 'l ' .. h .. ' ' .. cur
  end
end
return out
"""
