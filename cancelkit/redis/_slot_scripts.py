"""The Lua scripts of the LatestOnly side of :class:`cancelkit.redis.RedisBackend`.

Keys (``P`` the prefix, ``K`` a latest-only key, ``W`` a worker, ``H`` a holder; the other
keys and the messages are described in :mod:`cancelkit.redis._scripts`):

- ``P:k:K`` the key's state, a hash: ``"W H"`` -> the claim's state (``r`` running, ``w``
  waiting, ``s NEW`` superseded by holder NEW), ``lim`` the key's ``max_concurrency``, and
  ``seq``/``sh`` the newest sequence number accepted and its holder. TTL: the lease (with a
  sequence number: the longer of the lease and the sequence TTL), refreshed by every script
  and heartbeat; once no claim is left only ``seq``/``sh`` remain, for the sequence TTL.
- ``P:q:K`` the claims not yet released, a sorted set of ``"W H"`` by generation (the order
  of arrival); TTL: the lease.
- ``P:x:W H`` (in the group of K) a superseded claim released lately: ``s NEW``, so that a
  release retried after its reply was lost answers what the first attempt did; TTL: the lease.
- ``P:sz`` the released keys whose sequence number is remembered, a sorted set by expiry
  (ms), for the ``max_seq_keys`` bound (the oldest are forgotten first).

Every claim also has a lease deadline, the field ``"d W H"`` of the state hash (ms):
acquiring sets it and the heartbeat of the claim's worker moves it on. Every script first
prunes the claims of workers whose liveness key ``P:a:W`` expired (a crashed worker) and the
claims whose deadline passed (a claim left by a caller that was cancelled while its acquire
was in flight, although its worker lives on: it blocks the key for at most one lease), then,
while fewer than ``lim`` claims run, lets the oldest waiting claim run,
and tells the first ``lim`` running or superseded claims, and those it let run, that their
turn may have come (``t H``; other workers by pub/sub, this worker in the script's reply):
the promoted ones always, the first ``lim`` only when a claim was released or pruned (so
that two waiting workers never wake each other in a loop).
"""

from __future__ import annotations

from ._scripts import SEND

__all__ = ["ACQUIRE", "COMMIT_CLAIM", "IS_CURRENT", "RELEASE", "SYNC_CLAIMS", "TURN"]

# KEYS[1] state hash, KEYS[2] order zset. Defines settle(W, alive_prefix, channel_prefix),
# which prunes dead workers' claims, promotes waiters, publishes turns and returns
# (running, waiting, local turn holders).
_SETTLE = """
local function split(m)
  return string.match(m, '^(%S+) (%S+)$')
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function settle(W, alive, chan, released)
  local lim = tonumber(redis.call('HGET', KEYS[1], 'lim') or '1')
  local members = redis.call('ZRANGE', KEYS[2], 0, -1)
  local order, state, running, waiting = {}, {}, {}, {}
  local seen = {}
  local now = now_ms()
  for _, m in ipairs(members) do
    local w = string.match(m, '^(%S+) ')
    local st = redis.call('HGET', KEYS[1], m)
    local deadline = tonumber(redis.call('HGET', KEYS[1], 'd ' .. m) or '0')
    if not st or deadline < now or (w ~= W and redis.call('EXISTS', alive .. w) == 0) then
      redis.call('ZREM', KEYS[2], m)
      redis.call('HDEL', KEYS[1], m, 'd ' .. m)
      released = true
    else
      order[#order + 1] = m
      state[m] = st
      if st == 'r' then
        running[#running + 1] = m
      elseif st == 'w' then
        waiting[#waiting + 1] = m
      end
    end
  end
  local turns = {}
  local wi = 1
  while #running < lim and waiting[wi] do
    local m = waiting[wi]
    redis.call('HSET', KEYS[1], m, 'r')
    state[m] = 'r'
    running[#running + 1] = m
    turns[#turns + 1] = m
    wi = wi + 1
  end
  local rest = {}
  for i = wi, #waiting do rest[#rest + 1] = waiting[i] end
  local n = released and 0 or lim
  for _, m in ipairs(order) do
    if n >= lim then break end
    if state[m] ~= 'w' then
      n = n + 1
      turns[#turns + 1] = m
    end
  end
  local mine = {}
  for _, m in ipairs(turns) do
    if not seen[m] then
      seen[m] = true
      local w, h = split(m)
      if w == W then mine[#mine + 1] = 't ' .. h
      else redis.call('PUBLISH', chan .. w, 't ' .. h) end
    end
  end
  return running, rest, mine, order, state
end
local function ttl(lease, long)
  if redis.call('HEXISTS', KEYS[1], 'seq') == 1 then
    redis.call('PEXPIRE', KEYS[1], long)
  else
    redis.call('PEXPIRE', KEYS[1], lease)
  end
  redis.call('PEXPIRE', KEYS[2], lease)
end
"""

#: KEYS: state, order, gen counter, this worker's liveness key, P:sz.
#: ARGV: W, H, policy ('<when_busy> <when_full>'), limit, max_waiting, seq ('' for none),
#: lease ms, channel prefix,
#: gen-key ttl ms, liveness-key prefix, state ttl ms (max of lease and sequence ttl), inbox
#: prefix (a superseded claim of another worker is told by pub/sub and in its inbox).
#: Returns {admission, G, extra...}: {'running'|'waiting', G, lines for this worker: turns,
#: and the supersedes of its claims of the key, also those told before by message},
#: {'stale', 0, newest holder, newest seq}, {'busy'} or {'full'}. Idempotent for one holder.
#: An error reply ``cancelkit: ...`` for a policy it does not know (``ValueError`` in Python).
ACQUIRE = (
    SEND
    + _SETTLE
    + """
local W, H = ARGV[1], ARGV[2]
local busy, full = string.match(ARGV[3], '^(%S+) (%S+)$')
local limit, max_waiting, seq = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local me = W .. ' ' .. H
-- A part this version does not know is refused before anything is written (the Python
-- side refuses it first; this is the script's own guard, for a caller that skips it).
if not (busy == 'supersede' or busy == 'wait' or busy == 'refuse')
    or not (full == 'supersede' or full == 'refuse') or not max_waiting then
  return redis.error_reply('cancelkit: a policy this backend does not know: ' .. ARGV[3])
end
-- Appends to out a line for each claim of this worker on the key that was superseded (its
-- message may still be on its way, or was in the lost reply of a retried call), so that it
-- stops before the new claim's body starts.
local function superseded_here(out)
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local w, h = split(m)
    if w == W then
      local by = string.match(redis.call('HGET', KEYS[1], m) or '', '^s (%S+)$')
      if by then out[#out + 1] = 's ' .. h .. ' ' .. by end
    end
  end
  return out
end
local st = redis.call('HGET', KEYS[1], me)
if st then  -- a retried call: the same answer, and the supersedes it told
  local g = redis.call('ZSCORE', KEYS[2], me)
  return superseded_here({st == 'w' and 'waiting' or 'running', g})
end
redis.call('SET', KEYS[4], '1', 'PX', ARGV[7])
if seq ~= '' then
  local newest = redis.call('HGET', KEYS[1], 'seq')
  if newest and tonumber(seq) <= tonumber(newest) then
    return {'stale', 0, redis.call('HGET', KEYS[1], 'sh'), newest}
  end
end
redis.call('HSET', KEYS[1], 'lim', ARGV[4], 'pol', busy)
local running, waiting, mine = settle(W, ARGV[10], ARGV[8], false)
local state, victim = 'r', nil
if #running >= limit then
  if busy == 'supersede' then
    victim = running[1]
  elseif busy == 'refuse' then
    return {'busy'}
  elseif #waiting < max_waiting then  -- 'wait'
    state = 'w'
  elseif full == 'supersede' then
    state, victim = 'w', waiting[1]
  else  -- 'refuse'
    return {'full'}
  end
end
local g = redis.call('INCR', KEYS[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if g < now then
  g = now
  redis.call('SET', KEYS[3], string.format('%d', g))
end
redis.call('PEXPIRE', KEYS[3], ARGV[9])
local gs = string.format('%d', g)
redis.call('ZREM', KEYS[5], KEYS[1])
redis.call('HSET', KEYS[1], me, state)
redis.call('HSET', KEYS[1], 'd ' .. me, string.format('%d', now_ms() + tonumber(ARGV[7])))
redis.call('ZADD', KEYS[2], gs, me)
if seq ~= '' then redis.call('HSET', KEYS[1], 'seq', seq, 'sh', H) end
local out = {state == 'r' and 'running' or 'waiting', gs}
if victim then
  redis.call('HSET', KEYS[1], victim, 's ' .. H)
  local w, h = split(victim)
  if w ~= W and not send(w, 's ' .. h .. ' ' .. H, ARGV[8], ARGV[12], ARGV[7], true) then
    out[#out + 1] = '>' .. w .. ' s ' .. h .. ' ' .. H  -- the caller writes the inbox
  end
end
for _, line in ipairs(mine) do out[#out + 1] = line end
superseded_here(out)  -- the victim, if it is this worker's, and those superseded before
ttl(ARGV[7], ARGV[11])
return out
"""
)

#: KEYS: state, order, P:sz, P:x:W H. ARGV: W, H, channel prefix, liveness-key prefix, lease ms,
#: sequence ttl ms, max_seq_keys, state ttl ms. Forgets the claim, lets waiters run, and
#: once no claim is left keeps only the newest sequence number (bounded by P:sz).
#: Returns {the claim's state before ('' if it was not recorded; a superseded claim's state
#: is kept a lease in P:x:W H, for a retry of this call), turn lines for this worker's
#: holders...}.
RELEASE = (
    _SETTLE
    + """
local W, H = ARGV[1], ARGV[2]
local me = W .. ' ' .. H
local was = redis.call('HGET', KEYS[1], me) or ''
if was == '' then  -- not recorded: or this call ran already and its reply was lost
  was = redis.call('GET', KEYS[4]) or ''
elseif string.sub(was, 1, 2) == 's ' then
  redis.call('SET', KEYS[4], was, 'PX', ARGV[5])
end
local function reply(lines)
  local out = {was}
  for _, line in ipairs(lines) do out[#out + 1] = line end
  return out
end
redis.call('ZREM', KEYS[2], me)
redis.call('HDEL', KEYS[1], me, 'd ' .. me)
local running, waiting, mine, order = settle(W, ARGV[4], ARGV[3], true)
if #order > 0 then
  ttl(ARGV[5], ARGV[8])
  return reply(mine)
end
redis.call('DEL', KEYS[2])
local seq = redis.call('HGET', KEYS[1], 'seq')
if not seq then
  redis.call('DEL', KEYS[1])
  return reply(mine)
end
local sh = redis.call('HGET', KEYS[1], 'sh')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'seq', seq, 'sh', sh)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[3], string.format('%d', now + tonumber(ARGV[6])), KEYS[1])
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[7])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[3], 0, over - 1)) do
    redis.call('ZREM', KEYS[3], old)
    if redis.call('HLEN', old) <= 2 then redis.call('DEL', old) end
  end
end
redis.call('PEXPIRE', KEYS[3], ARGV[6])
return reply(mine)
"""
)

#: KEYS: state, order. ARGV: W, H, liveness-key prefix, channel prefix, handover ('1'/'0').
#: {1, lines...} if the holder's body may start (or the holder is unknown), else {0, lines...};
#: the lines are turns for this worker's holders (``t H``).
TURN = (
    _SETTLE
    + """
local me = ARGV[1] .. ' ' .. ARGV[2]
if not redis.call('HGET', KEYS[1], me) then return {1} end
local running, waiting, mine, order, state = settle(ARGV[1], ARGV[3], ARGV[4], false)
local function reply(flag)
  local out = {flag}
  for _, line in ipairs(mine) do out[#out + 1] = line end
  return out
end
if state[me] ~= 'r' then return reply(0) end
if ARGV[5] == '0' then return reply(1) end
local lim = tonumber(redis.call('HGET', KEYS[1], 'lim') or '1')
local ahead = 0
for _, m in ipairs(order) do
  if m == me then return reply(1) end
  if state[m] ~= 'w' then
    ahead = ahead + 1
    if ahead >= lim then return reply(0) end
  end
end
return reply(1)
"""
)

#: KEYS: state. ARGV: W, H. The commit point of a claim: atomic with the ACQUIRE that would
#: supersede it. Returns {1, the newcomer} if it was superseded, {1, ''} if it is not
#: recorded (it lost its place), else {0}: a later supersede still takes its slot, and its
#: worker's token (committed) lets the body run on.
COMMIT_CLAIM = """
local st = redis.call('HGET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2])
if not st then return {1, ''} end
if string.sub(st, 1, 2) == 's ' then return {1, string.sub(st, 3)} end
return {0}
"""

#: KEYS: state, order. ARGV: generation. 1 if a running claim has that generation.
IS_CURRENT = """
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], ARGV[1])) do
  if redis.call('HGET', KEYS[1], m) == 'r' then return 1 end
end
return 0
"""

#: The heartbeat and the resync after a reconnect, for latest-only claims: refresh this
#: worker's liveness and the TTLs of its claims, re-assert those that Redis lost, and report
#: the claims that were superseded meanwhile.
#: KEYS: alive, then two per entry (state, order). ARGV: W, lease ms, state ttl ms, channel
#: prefix, inbox prefix, then five per entry (H, G, live: '0' for a claim this worker has
#: cancelled already, 'r' running, 'w' waiting; the claim's limit and when-busy policy, the
#: key's if Redis holds nothing of it). Returns message lines (see
#: :mod:`cancelkit.redis._scripts`; ``>W`` lines are for the caller to write to W's inbox, as
#: from ACQUIRE).
#:
#: A lost claim is re-asserted by its generation, never in favour of an older one: with room
#: it runs; with none, under a superseding policy a claim newer than the oldest running one
#: runs and supersedes it (the newest admitted claim is the one that survives an outage); a
#: claim that waits in its worker waits in the queue again under a waiting policy; otherwise it
#: is superseded by the newest running one. A claim this worker cancelled
#: already is never re-asserted (its release follows). A claim Redis knows gets the
#: generation the worker gave it (after a lost ACQUIRE reply the worker made it locally).
SYNC_CLAIMS = (
    SEND
    + """
local function split(m)
  return string.match(m, '^(%S+) (%S+)$')
end
local W, lease = ARGV[1], ARGV[2]
-- A write that needs no memory first: under OOM (noeviction) Redis refuses only a script's
-- first write, so the leases are still refreshed.
if redis.call('PEXPIRE', KEYS[1], lease) == 0 then redis.call('SET', KEYS[1], '1', 'PX', lease) end
local t = redis.call('TIME')
local deadline = string.format(
  '%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(lease))
local out = {}
local n = (#ARGV - 5) / 5
for i = 0, n - 1 do
  local h, g, live = ARGV[6 + 5 * i], ARGV[7 + 5 * i], ARGV[8 + 5 * i]
  local k1, k2 = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local me = W .. ' ' .. h
  local st = redis.call('HGET', k1, me)
  if not st and live ~= '0' then  -- Redis lost it: re-assert it by its generation
    if not redis.call('HGET', k1, 'lim') then  -- Redis holds nothing of the key: its settings
      redis.call('HSET', k1, 'lim', ARGV[9 + 5 * i], 'pol', ARGV[10 + 5 * i])
    end
    local lim = tonumber(redis.call('HGET', k1, 'lim'))
    local pol = redis.call('HGET', k1, 'pol')
    local running, scores = {}, {}
    local members = redis.call('ZRANGE', k2, 0, -1, 'WITHSCORES')
    for j = 1, #members, 2 do
      if redis.call('HGET', k1, members[j]) == 'r' then
        running[#running + 1] = members[j]
        scores[#running] = tonumber(members[j + 1])
      end
    end
    if #running < lim then
      st = 'r'
    elseif live == 'w' and pol == 'wait' then
      st = 'w'
    elseif pol == 'supersede' and tonumber(g) > scores[1] then
      st = 'r'
      local victim = running[1]
      local line = 's ' .. select(2, split(victim)) .. ' ' .. h
      redis.call('HSET', k1, victim, 's ' .. h)
      local vw = split(victim)
      if vw == W then out[#out + 1] = line
      elseif not send(vw, line, ARGV[4], ARGV[5], lease, true) then
        out[#out + 1] = '>' .. vw .. ' ' .. line
      end
    else
      st = 's ' .. select(2, split(running[#running]))
    end
    redis.call('HSET', k1, me, st)
  end
  if st then
    -- the claim's own generation (an ACQUIRE whose reply was lost ran with another one)
    if live ~= '0' then redis.call('ZADD', k2, g, me) end
    redis.call('HSET', k1, 'd ' .. me, deadline)
    if string.sub(st, 1, 2) == 's ' then out[#out + 1] = 's ' .. h .. string.sub(st, 2) end
    redis.call('PEXPIRE', k1, redis.call('HEXISTS', k1, 'seq') == 1 and ARGV[3] or lease)
    redis.call('PEXPIRE', k2, lease)
  end
end
return out
"""
)
