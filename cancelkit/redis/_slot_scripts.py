"""The Lua scripts of the LatestOnly side of :class:`cancelkit.redis.RedisBackend`.

Keys and messages are described in :mod:`cancelkit.redis._scripts`; besides those, every
key ``K`` has ``P:qd:K``, the lease deadline (ms) of each claim in its queue ``P:q:K``:
acquiring sets it, the heartbeat of the claim's worker moves it on, and a claim whose
deadline passed is pruned (a claim left by a caller that was cancelled while its acquire
was in flight blocks handover for at most one lease, even though its worker lives on).
"""

from __future__ import annotations

from ._scripts import SEND

__all__ = ["ACQUIRE", "RELEASE", "SYNC_CLAIMS", "TURN"]

#: KEYS: owner, queue, gen, deadlines. ARGV: W, H, replace ('1'/'0'), lease ms, channel
#: prefix, generation-key ttl ms, inbox prefix. Returns {0} (refused) or
#: {1, G[, prevW, prevH]}. Idempotent for one holder.
ACQUIRE = (
    SEND
    + """
local cur = redis.call('GET', KEYS[1])
if cur then
  local cw, ch, cg = string.match(cur, '^(%S+) (%S+) (%S+)$')
  if cw == ARGV[1] and ch == ARGV[2] then return {1, cg} end  -- a retried call
  if ARGV[3] == '0' then return {0} end
end
local g = redis.call('INCR', KEYS[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if g < now then
  g = now
  redis.call('SET', KEYS[3], string.format('%d', g))
end
redis.call('PEXPIRE', KEYS[3], ARGV[6])
local gs = string.format('%d', g)
local me = ARGV[1] .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], me .. ' ' .. gs, 'PX', ARGV[4])
redis.call('ZADD', KEYS[2], gs, me)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local deadline = math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000) + tonumber(ARGV[4])
redis.call('ZADD', KEYS[4], string.format('%d', deadline), me)
redis.call('PEXPIRE', KEYS[4], ARGV[4])
if cur then
  local w, h = string.match(cur, '^(%S+) (%S+)')
  send(w, 's ' .. h .. ' ' .. ARGV[2], ARGV[5], ARGV[7], ARGV[4], w ~= ARGV[1])
  return {1, gs, w, h}
end
return {1, gs}
"""
)

#: KEYS: owner, queue, deadlines. ARGV: W, H, channel prefix, inbox prefix, lease ms.
#: Compare-and-delete of the owner, removes the claim, wakes the new head of the queue if
#: the released claim was the head. Idempotent.
RELEASE = (
    SEND
    + """
local me = ARGV[1] .. ' ' .. ARGV[2]
local head0 = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
redis.call('ZREM', KEYS[2], me)
redis.call('ZREM', KEYS[3], me)
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #me + 1) == me .. ' ' then redis.call('DEL', KEYS[1]) end
local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if not head then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 0
end
if head0 == me then
  local w, h = string.match(head, '^(%S+) (%S+)$')
  send(w, 't ' .. h, ARGV[3], ARGV[4], ARGV[5], w ~= ARGV[1])
end
return 1
"""
)

#: KEYS: queue, deadlines. ARGV: "W H", liveness-key prefix. {1} if every earlier claim was
#: released, else {0, ms until the head's lease deadline}. Claims of workers that stopped
#: heartbeating, and claims whose lease deadline passed, are pruned.
TURN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not head or head == ARGV[1] then return {1} end
  if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1} end
  local w = string.match(head, '^(%S+) ')
  local deadline = tonumber(redis.call('ZSCORE', KEYS[2], head) or '0')
  if deadline > now and redis.call('EXISTS', ARGV[2] .. w) == 1 then
    return {0, deadline - now}
  end
  redis.call('ZREM', KEYS[1], head)
  redis.call('ZREM', KEYS[2], head)
end
"""

#: The heartbeat and the resync after a reconnect, for latest-only claims: refresh this
#: worker's liveness and the leases of its claims, re-assert those that Redis lost, and
#: report the claims that were superseded meanwhile.
#: KEYS: alive, then three per entry (owner, queue, deadlines). ARGV: W, lease ms, then two
#: per entry (H, G). Returns message lines (see :mod:`cancelkit.redis._scripts`).
SYNC_CLAIMS = """
local W, lease = ARGV[1], ARGV[2]
-- A write that needs no memory first: under OOM (noeviction) Redis refuses only a script's
-- first write, so the leases are still refreshed.
if redis.call('PEXPIRE', KEYS[1], lease) == 0 then redis.call('SET', KEYS[1], '1', 'PX', lease) end
local t = redis.call('TIME')
local deadline = string.format(
  '%d', math.floor(tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000) + tonumber(lease))
local out = {}
local n = (#ARGV - 2) / 2
for i = 0, n - 1 do
  local h, g = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  local k1, k2, k3 = KEYS[2 + 3 * i], KEYS[3 + 3 * i], KEYS[4 + 3 * i]
  local me = W .. ' ' .. h
  local cur = redis.call('GET', k1)
  if cur and string.sub(cur, 1, #me + 1) == me .. ' ' then
    redis.call('PEXPIRE', k1, lease)  -- ours (its generation may be the server's, see acquire)
    cur = nil
    g = redis.call('ZSCORE', k2, me) or g
  end
  redis.call('ZADD', k2, g, me)
  redis.call('PEXPIRE', k2, lease)
  redis.call('ZADD', k3, deadline, me)
  redis.call('PEXPIRE', k3, lease)
  if cur then
    out[#out + 1] = 's ' .. h .. ' ' .. string.match(cur, '^%S+ (%S+)')
  elseif not redis.call('GET', k1) then
    local top = redis.call('ZREVRANGE', k2, 0, 0)[1]
    if top ~= me then
      out[#out + 1] = 's ' .. h .. ' ' .. string.match(top, '^%S+ (%S+)$')
    else
      redis.call('SET', k1, me .. ' ' .. g, 'PX', lease)
    end
  end
end
return out
"""
