-- One acquire+release pair through Lockstep's PostgreSQL decision functions, as a node makes
-- it. pgbench client :client_id works on an item of its own, like `loadtest locks`. A node
-- deletes published outbox rows in batches off the request path; `outbox_delete.sql`, run
-- beside this at a tenth of its rate (`-f decisions.sql@10 -f outbox_delete.sql@1`), plays
-- that part, so each pair pays for two commits, as the raw reference's does.
SELECT token AS t FROM lockstep_acquire('tb', 'i' || :client_id, 'h' || :client_id, NULL, NULL, 30000, 5000) LIMIT 1 \gset
SELECT count(*) FROM lockstep_release('tb', 'i' || :client_id, 'h' || :client_id, :t, 5000);
