"""The Lua scripts of the LatestOnly side of :class:`cancelkit.redis.RedisBackend`.

Keys and messages are described in :mod:`cancelkit.redis._scripts`.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "RELEASE", "SYNC_CLAIMS", "TURN"]

#: KEYS: owner, queue, gen. ARGV: W, H, replace ('1'/'0'), lease ms, channel prefix,
#: generation-key ttl ms. Returns {0} (refused) or {1, G[, prevW, prevH]}. Idempotent for
#: one holder.
ACQUIRE = """
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
if cur then
  local w, h = string.match(cur, '^(%S+) (%S+)')
  if w ~= ARGV[1] then redis.call('PUBLISH', ARGV[5] .. w, 's ' .. h .. ' ' .. ARGV[2]) end
  return {1, gs, w, h}
end
return {1, gs}
"""

#: KEYS: owner, queue. ARGV: W, H, channel prefix. Compare-and-delete of the owner, removes
#: the claim, wakes the new head of the queue if the released claim was the head.
RELEASE = """
local me = ARGV[1] .. ' ' .. ARGV[2]
local head0 = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
redis.call('ZREM', KEYS[2], me)
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #me + 1) == me .. ' ' then redis.call('DEL', KEYS[1]) end
local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if not head then
  redis.call('DEL', KEYS[2])
  return 0
end
if head0 == me then
  local w, h = string.match(head, '^(%S+) (%S+)$')
  if w ~= ARGV[1] then redis.call('PUBLISH', ARGV[3] .. w, 't ' .. h) end
end
return 1
"""

#: KEYS: queue. ARGV: "W H", liveness-key prefix. 1 if every earlier claim was released
#: (claims of workers that stopped heartbeating are pruned), else 0.
TURN = """
while true do
  local head = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not head or head == ARGV[1] then return 1 end
  if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
  local w = string.match(head, '^(%S+) ')
  if redis.call('EXISTS', ARGV[2] .. w) == 1 then return 0 end
  redis.call('ZREM', KEYS[1], head)
end
"""

#: The heartbeat and the resync after a reconnect, for latest-only claims: refresh this
#: worker's liveness and the TTLs of its claims, re-assert those that Redis lost, and report
#: the claims that were superseded meanwhile.
#: KEYS: alive, then two per entry (owner, queue). ARGV: W, lease ms, then two per entry
#: (H, G). Returns message lines (see :mod:`cancelkit.redis._scripts`).
SYNC_CLAIMS = """
local W, lease = ARGV[1], ARGV[2]
redis.call('SET', KEYS[1], '1', 'PX', lease)
local out = {}
local n = (#ARGV - 2) / 2
for i = 0, n - 1 do
  local h, g = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  local k1, k2 = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local me = W .. ' ' .. h
  local mine = me .. ' ' .. g
  local cur = redis.call('GET', k1)
  redis.call('ZADD', k2, g, me)
  redis.call('PEXPIRE', k2, lease)
  if cur == mine then
    redis.call('PEXPIRE', k1, lease)
  elseif cur then
    out[#out + 1] = 's ' .. h .. ' ' .. string.match(cur, '^%S+ (%S+)')
  else
    local top = redis.call('ZREVRANGE', k2, 0, 0)[1]
    if top ~= me then
      out[#out + 1] = 's ' .. h .. ' ' .. string.match(top, '^%S+ (%S+)$')
    else
      redis.call('SET', k1, mine, 'PX', lease)
    end
  end
end
return out
"""
