-- The raw reference's tables, as `loadtest locks --raw` creates them.
DROP TABLE IF EXISTS raw_locks, raw_lock_events;
CREATE TABLE raw_locks (team TEXT NOT NULL, item TEXT NOT NULL, holder TEXT NOT NULL, token BIGINT NOT NULL, acquired_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (team, item));
CREATE TABLE raw_lock_events (id BIGSERIAL PRIMARY KEY, topic TEXT NOT NULL, event_type TEXT NOT NULL, data TEXT NOT NULL);
