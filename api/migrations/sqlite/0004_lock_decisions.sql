-- Each outbox row names the lock it is about, '{team}/{item}': every decision publishes all of
-- its item's rows still in the outbox, in id order, so an item's events reach the broker in
-- commit order even when an earlier one's publish is slow (see the PostgreSQL migration).
ALTER TABLE lock_events ADD COLUMN lock_key TEXT;
CREATE INDEX IF NOT EXISTS lock_events_by_lock ON lock_events (lock_key, id);
