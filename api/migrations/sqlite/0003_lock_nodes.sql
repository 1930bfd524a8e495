-- The node hosting a session-bound lock's session, taken from the verified session id. Dead
-- nodes' sessions are found by an exact match on it (never a pattern over the session text),
-- and each node finds the locks of its own sessions that are no longer open.
ALTER TABLE locks ADD COLUMN node TEXT;
UPDATE locks SET node = substr(session, 1, instr(session, '.') - 1)
    WHERE session IS NOT NULL AND instr(session, '.') > 0;
CREATE INDEX IF NOT EXISTS locks_by_node ON locks (node) WHERE state = 'held';
