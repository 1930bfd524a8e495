-- The event-data helpers of 0004 were declared IMMUTABLE, but their bodies call to_char and
-- to_json, which are only STABLE. PostgreSQL inlines a SQL function into the calling statement
-- only when the body is no more volatile than the declaration; so these were never inlined,
-- and a SQL function that is not inlined is parsed and planned again on every call (before
-- PostgreSQL 18). Measured on PostgreSQL 15: 37.7 µs per call of lockstep_acquired_data
-- declared IMMUTABLE, 2.3 µs declared STABLE (two such calls per acquire+release pair, out of
-- about 1.7 ms of CPU per pair in all). STABLE is also what they are.
ALTER FUNCTION lockstep_time(BIGINT) STABLE;
ALTER FUNCTION lockstep_acquired_data(TEXT, TEXT, TEXT, BIGINT, BIGINT, BIGINT) STABLE;
ALTER FUNCTION lockstep_expired_data(TEXT, TEXT, TEXT, BIGINT, BIGINT) STABLE;
ALTER FUNCTION lockstep_released_data(TEXT, TEXT, TEXT, BIGINT, TEXT, BIGINT) STABLE;
ALTER FUNCTION lockstep_taken_over_data(TEXT, TEXT, TEXT, BIGINT, TEXT, BIGINT) STABLE;

-- Both tables churn: every decision writes a new version of its lock's row (no update is HOT:
-- each changes an indexed column) and inserts outbox rows that are deleted moments later.
-- Dead versions make every lookup of the item slower until a vacuum removes them, and the
-- default trigger (20 % of the table's size) is meant for tables that grow, not for a small
-- table rewritten all the time: vacuum these after a fixed number of dead rows, unthrottled.
-- (This takes effect where autovacuum runs; operators who turn it off must vacuum these
-- tables themselves, see README.)
ALTER TABLE locks SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE lock_events SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);
