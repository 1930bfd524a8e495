-- Shared by Lockstep's Redis scripts (hub/src/redis.rs), prepended to each.
--
-- trim(stream, meta, now, max_age): drops the stream's entries older than max_age ms, lazily
-- and boundedly. The meta hash remembers (field d) when the oldest kept entry expires; until
-- then this costs one HMGET the caller already made. When it is due, a binary search over
-- one-entry XRANGE peeks (at most log2 of the stream's length) finds the first fresh offset,
-- and one XTRIM MINID cuts up to it. Entries are `<offset>-0` with fields t (ms) and p.
local function trim(stream, meta, now, max_age, due)
  if max_age <= 0 or (due and now < tonumber(due)) then
    return
  end
  local cutoff = now - max_age
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  if not oldest then
    redis.call('HDEL', meta, 'd')
    return
  end
  local lo = tonumber(string.match(oldest[1], '^(%d+)'))
  local keep_t = tonumber(oldest[2][2])
  if keep_t < cutoff then
    local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
    local hi = tonumber(string.match(newest[1], '^(%d+)'))
    local hi_t = tonumber(newest[2][2])
    if hi_t < cutoff then
      -- Everything expired.
      redis.call('DEL', stream)
      redis.call('HDEL', meta, 'd')
      return
    end
    -- Invariant: the entry at lo is expired, the one at hi is fresh.
    while hi - lo > 1 do
      local mid = math.floor((lo + hi) / 2)
      local e = redis.call('XRANGE', stream, mid, '+', 'COUNT', 1)[1]
      local eo, et = tonumber(string.match(e[1], '^(%d+)')), tonumber(e[2][2])
      if eo >= hi then
        hi, hi_t = mid, et
      elseif et < cutoff then
        lo = eo
      else
        hi, hi_t = eo, et
      end
    end
    redis.call('XTRIM', stream, 'MINID', hi)
    keep_t = hi_t
  end
  -- Look again when the oldest kept entry expires (a sixteenth later, to batch the work).
  redis.call('HSET', meta, 'd', keep_t + max_age + math.floor(max_age / 16))
end

-- forget_keys(latest, updated, now, idle, max): forgets the keys not updated for idle ms, then
-- the least recently updated beyond max, and lets both structures expire with the last key.
local function forget_keys(latest, updated, now, idle, max)
  local stale = redis.call('ZRANGEBYSCORE', updated, '-inf', now - idle)
  for _, key in ipairs(stale) do
    redis.call('ZREM', updated, key)
    redis.call('HDEL', latest, key)
  end
  local extra = redis.call('ZCARD', updated) - max
  if extra > 0 then
    local oldest = redis.call('ZPOPMIN', updated, extra)
    for i = 1, #oldest, 2 do
      redis.call('HDEL', latest, oldest[i])
    end
  end
  redis.call('PEXPIRE', latest, idle)
  redis.call('PEXPIRE', updated, idle)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
