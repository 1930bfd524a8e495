-- Publishes a batch of one topic's events: assigns their offsets, appends them to the topic's
-- history, trims it, and publishes them to the topic's shard channel, as one atomic step.
--
-- KEYS (one hash tag, one slot): 1 stream {T}:s, 2 meta {T}:m (e = epoch, o = top offset,
--   d = when the next age trim is due), 3 versions {T}:v (event key -> newest version),
--   4 latest {T}:k (event key -> its latest positioned tail), 5 updated {T}:kt (zset: event
--   key scored by when it was last updated), 6.. one idempotency key per event ({T}:i:<key>,
--   or {T}:i: when the event has none).
-- ARGV: 1 epoch candidate (used when the meta hash is missing: a new epoch), 2 channel,
--   3 events kept (MAXLEN ~), 4 max age ms (0: no age trim), 5 meta TTL ms, 6 idempotency
--   TTL ms, 7 keep history (1/0), 8 keys kept, 9 key idle ms, then per event: message tail,
--   has idempotency key (1/0), event id, event key ('' for none), version (0 for none).
-- Returns {epoch, then per event: offset, outcome, id}. Outcome 0: published. 1: a duplicate
--   (a repeated idempotency key): the first publish's offset and id, nothing published.
--   2: superseded (its key already has this version or a newer one): not published, the
--   offset is the top's.
local stream, meta, versions, latest, updated = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local max_age = tonumber(ARGV[4])
local meta_ttl = tonumber(ARGV[5])
local idem_ttl = tonumber(ARGV[6])
local keep = ARGV[7] == '1'
local now = now_ms()

local m = redis.call('HMGET', meta, 'e', 'd')
local epoch, due = m[1], m[2]
if not epoch then
  -- First publish, or the meta hash is gone (FLUSHALL, a restart without persistence, its
  -- TTL, eviction): a new epoch, and no leftover entry may collide with restarted offsets.
  epoch = ARGV[1]
  redis.call('DEL', stream, latest, updated)
  redis.call('HSET', meta, 'e', epoch)
  due = nil
end

local reply = {epoch}
local published = {}
local n = (#ARGV - 9) / 5
local versioned, keyed = false, false
for i = 0, n - 1 do
  local a = 10 + i * 5
  local tail, has_key, id, event_key, version = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4])
  local key = KEYS[6 + i]
  local first = has_key == '1' and redis.call('GET', key)
  local newest = version > 0 and event_key ~= '' and tonumber(redis.call('HGET', versions, event_key) or '0')
  if first then
    local o, first_id = string.match(first, '^(%d+):(.*)$')
    reply[#reply + 1] = tonumber(o)
    reply[#reply + 1] = 1
    reply[#reply + 1] = first_id
  elseif newest and newest >= version then
    reply[#reply + 1] = tonumber(redis.call('HGET', meta, 'o') or '0')
    reply[#reply + 1] = 2
    reply[#reply + 1] = id
  else
    if newest then
      redis.call('HSET', versions, event_key, version)
      versioned = true
    end
    local offset = redis.call('HINCRBY', meta, 'o', 1)
    local positioned = 'x-stream-offset:' .. offset .. '\nx-stream-epoch:' .. epoch .. '\n' .. tail
    if keep then
      redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], offset .. '-0', 't', now, 'p', positioned)
    end
    if has_key == '1' then
      redis.call('SET', key, offset .. ':' .. id, 'PX', idem_ttl)
    end
    if event_key ~= '' then
      redis.call('HSET', latest, event_key, positioned)
      redis.call('ZADD', updated, now, event_key)
      keyed = true
    end
    published[#published + 1] = positioned
    reply[#reply + 1] = offset
    reply[#reply + 1] = 0
    reply[#reply + 1] = id
  end
end

if keep then
  trim(stream, meta, now, max_age, due)
  if max_age > 0 then
    redis.call('PEXPIRE', stream, max_age + 1000)
  end
end
redis.call('PEXPIRE', meta, meta_ttl)
if keyed then
  forget_keys(latest, updated, now, tonumber(ARGV[9]), tonumber(ARGV[8]))
end
if versioned then
  redis.call('PEXPIRE', versions, meta_ttl)
end
if #published > 0 then
  redis.call('SPUBLISH', ARGV[2], table.concat(published))
end
return reply
