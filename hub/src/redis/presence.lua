-- Applies one node's presence changes to a topic, after forgetting the entries (of any node)
-- whose expiry passed, as one atomic step: joining and leaving are decided here, once, at the
-- user level.
--
-- KEYS (the topic's hash tag, one slot): 1 entries {T}:pe (zset: '<user> <node>' scored by
--   its expiry, ms), 2 details {T}:pd (hash: '<user> <node>' -> '<connections>:<since ms>'),
--   3 users {T}:pu (hash: user -> how many nodes it has an entry on), 4 version {T}:pv (the
--   last change's version).
-- ARGV: 1 node, 2 entry TTL ms, 3 key TTL ms, 4 number of upserts, then per upsert: user,
--   connections, since ms (0 connections: only extend an existing entry's expiry, the user's
--   leave is pending on the node); then the users whose entry of this node is removed.
-- Returns {per change in decision order: user, 1 (joined) or 0 (left), version, users present
--   after it}. Versions grow with every change of the topic: the last one plus one, or the time
--   in ms times 4096 when that is larger (a topic whose keys expired starts above every earlier
--   version). The users present tell the topic's occupancy: a join that makes it 1 occupied
--   it, a leave that makes it 0 vacated it (webhooks' topic.occupied / topic.vacated).
local entries, details, users, last = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local node = ARGV[1]
local now = now_ms()
local expiry = now + tonumber(ARGV[2])
local reply = {}
local version = math.max(tonumber(redis.call('GET', last) or '0'), now * 4096)
local present = redis.call('HLEN', users)

local function change(user, joined)
  version = version + 1
  -- Never below 0, even if the users hash lost a user whose entry is still here (evicted or
  -- flushed keys): the reply must stay well-formed.
  present = math.max(present + (joined == 1 and 1 or -1), 0)
  reply[#reply + 1] = user
  reply[#reply + 1] = joined
  reply[#reply + 1] = version
  reply[#reply + 1] = present
end

local function gone(member)
  redis.call('HDEL', details, member)
  local user = string.match(member, '^(.-) ')
  if redis.call('HINCRBY', users, user, -1) <= 0 then
    redis.call('HDEL', users, user)
    change(user, 0)
  end
end

-- Entries nobody refreshed (their node died or stalled), a bounded number per call: the next
-- update takes the rest.
local expired = redis.call('ZRANGEBYSCORE', entries, '-inf', now, 'LIMIT', 0, 1000)
for _, member in ipairs(expired) do
  redis.call('ZREM', entries, member)
  gone(member)
end

local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  local a = 5 + i * 3
  local user = ARGV[a]
  local member = user .. ' ' .. node
  if ARGV[a + 1] == '0' then
    -- A pending leave's keep-alive: only an existing entry lives on.
    redis.call('ZADD', entries, 'XX', expiry, member)
  elseif redis.call('ZADD', entries, expiry, member) == 1 then
    if redis.call('HINCRBY', users, user, 1) == 1 then
      change(user, 1)
    end
  end
  if ARGV[a + 1] ~= '0' then
    redis.call('HSET', details, member, ARGV[a + 1] .. ':' .. ARGV[a + 2])
  end
end

for i = 5 + n * 3, #ARGV do
  local member = ARGV[i] .. ' ' .. node
  if redis.call('ZREM', entries, member) == 1 then
    gone(member)
  end
end

if #reply > 0 then
  redis.call('SET', last, string.format('%d', version))
end
-- A topic nobody refreshes any more is gone by itself.
local ttl = tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ttl)
end
return reply
