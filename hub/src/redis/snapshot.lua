-- Reads the latest event of every key of a topic, and the position it was taken at, at once.
--
-- KEYS: 1 stream {T}:s, 2 meta {T}:m, 3 latest {T}:k, 4 updated {T}:kt.
-- ARGV: 1 epoch candidate (a topic never published to gets its epoch now), 2 key idle ms,
--   3 keys kept, 4 meta TTL ms.
-- Returns {epoch, top offset, positioned tail...} (in no order: the caller sorts by offset).
local stream, meta, latest, updated = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = now_ms()
local m = redis.call('HMGET', meta, 'e', 'o')
local epoch, top = m[1], tonumber(m[2] or '0')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream, latest, updated)
  redis.call('HSET', meta, 'e', epoch)
  top = 0
end
redis.call('PEXPIRE', meta, tonumber(ARGV[4]))
local reply = {epoch, top}
if redis.call('EXISTS', updated) == 1 then
  forget_keys(latest, updated, now, tonumber(ARGV[2]), tonumber(ARGV[3]))
  for _, tail in ipairs(redis.call('HVALS', latest)) do
    reply[#reply + 1] = tail
  end
end
return reply
