-- One acquire+release pair through Lockstep's PostgreSQL decision functions, as a node makes
-- it (the node deletes published outbox rows in batches; here each pair deletes its own).
-- pgbench client :client_id works on an item of its own, like `loadtest locks`.
SELECT token AS t FROM lockstep_acquire('tb', 'i' || :client_id, 'h' || :client_id, NULL, NULL, 30000, 5000) LIMIT 1 \gset
SELECT count(*) FROM lockstep_release('tb', 'i' || :client_id, 'h' || :client_id, :t, 5000);
DELETE FROM lock_events WHERE lock_key = 'tb/i' || :client_id;
