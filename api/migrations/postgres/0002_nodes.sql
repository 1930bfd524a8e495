-- Nodes and when each last swept: a node silent for longer than `locks.node_timeout` is taken
-- for dead, and the sessions it hosted (session ids start with its id) count as closed.
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
