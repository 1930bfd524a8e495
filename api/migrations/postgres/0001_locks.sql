-- Edit locks: one row per (team, item) ever locked. The row outlives its grants so that the next
-- grant's fencing token continues from the last one. Times are milliseconds since the Unix
-- epoch, always taken from the database's clock.
CREATE TABLE IF NOT EXISTS locks (
    team TEXT NOT NULL,
    item TEXT NOT NULL,
    holder TEXT NOT NULL,
    -- The STOMP session the lock is bound to, if any.
    session TEXT,
    token BIGINT NOT NULL,
    acquired_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    -- 'held' while granted (live until expires_at), then 'released' (by the holder or its
    -- closed session) or 'taken_over' (by a team admin).
    state TEXT NOT NULL,
    -- 1 once this grant's expiry has been announced (exactly one lock.expired per expiry).
    expiry_announced BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (team, item)
);
CREATE INDEX IF NOT EXISTS locks_unannounced_expiry ON locks (expires_at) WHERE state = 'held' AND expiry_announced = 0;
CREATE INDEX IF NOT EXISTS locks_by_session ON locks (session) WHERE session IS NOT NULL;

-- Events of committed state changes, written in the same transaction (a transactional outbox):
-- the node that made the change publishes and deletes them right after commit; if it dies
-- first, any node publishes them once their claim has lapsed.
CREATE TABLE IF NOT EXISTS lock_events (
    id BIGSERIAL PRIMARY KEY,
    topic TEXT NOT NULL,
    event_type TEXT NOT NULL,
    data TEXT NOT NULL,
    claimed_until BIGINT NOT NULL
);

-- WebSocket sessions that closed while holding session-bound locks, and when to release them.
CREATE TABLE IF NOT EXISTS closed_sessions (
    session TEXT PRIMARY KEY,
    release_at BIGINT NOT NULL
);
