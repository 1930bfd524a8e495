-- Keeps one revocation of a user's tokens (crate::control::Revocation) in the user's hash.
-- KEYS[1]: the user's revocations; ARGV: field (the topic, or * for every connection),
-- the revocation as JSON, how long to keep the hash (ms).
-- A later revocation of the same field replaces the earlier one; the hash lives as long as
-- its longest-lived revocation.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
