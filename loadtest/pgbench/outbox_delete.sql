-- The node's batched delete of published outbox rows (see decisions.sql).
DELETE FROM lock_events;
