-- Lists who is present in a topic: the entries not expired, with their details.
--
-- KEYS: 1 entries {T}:pe, 2 details {T}:pd, 3 users {T}:pu, 4 version {T}:pv (as
--   presence.lua; unused here).
-- ARGV: 1 most users listed.
-- Returns {users (HLEN: may still count a dead node's users not swept yet), 0} when more
--   than the maximum are present, else {users, 1, then per live entry: '<user> <node>',
--   '<connections>:<since ms>'}.
local entries, details, users = KEYS[1], KEYS[2], KEYS[3]
local count = redis.call('HLEN', users)
if count > tonumber(ARGV[1]) then
  return {count, 0}
end
local reply = {count, 1}
local live = redis.call('ZRANGEBYSCORE', entries, '(' .. now_ms(), '+inf')
for _, member in ipairs(live) do
  reply[#reply + 1] = member
  reply[#reply + 1] = redis.call('HGET', details, member) or '0:0'
end
return reply
