-- Reads a topic's position and the events after an offset.
--
-- KEYS: 1 stream {T}:s, 2 meta {T}:m, 3 latest {T}:k, 4 updated {T}:kt (dropped with a new
--   epoch, like the stream).
-- ARGV: 1 epoch candidate (a topic never published to gets its epoch now, so its first
--   subscriber and its first event agree on it), 2 after (offset), 3 limit (0: position
--   only), 4 max age ms, 5 meta TTL ms.
-- Returns {epoch, top offset, oldest offset kept (top + 1 when none), events...}.
local stream, meta = KEYS[1], KEYS[2]
local max_age = tonumber(ARGV[4])
local now = now_ms()
local m = redis.call('HMGET', meta, 'e', 'o', 'd')
local epoch, top, due = m[1], tonumber(m[2] or '0'), m[3]
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream, KEYS[3], KEYS[4])
  redis.call('HSET', meta, 'e', epoch)
  top, due = 0, nil
end
redis.call('PEXPIRE', meta, tonumber(ARGV[5]))
trim(stream, meta, now, max_age, due)
local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
local first = top + 1
if oldest then
  first = tonumber(string.match(oldest[1], '^(%d+)'))
end
local reply = {epoch, top, first}
local limit = tonumber(ARGV[3])
if limit > 0 and tonumber(ARGV[2]) < top then
  local rows = redis.call('XRANGE', stream, '(' .. ARGV[2] .. '-0', '+', 'COUNT', limit)
  for _, row in ipairs(rows) do
    -- Fields: t, <ms>, p, <positioned tail>.
    reply[#reply + 1] = row[2][4]
  end
end
return reply
