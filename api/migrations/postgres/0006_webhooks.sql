-- Webhook deliveries (DESIGN §15), queued durably beside the locks: every deployment has this
-- database (the embedded SQLite file, or the PostgreSQL a cluster shares), so an event queued
-- by a node that dies is delivered by another. One row is one delivery: its id is the body's
-- `id` and its events are fixed when it is queued, so a retry sends the same body and a
-- receiver can dedupe by id. Deliveries of an endpoint go out in id order, one at a time.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id BIGSERIAL PRIMARY KEY,
    -- The endpoint's URL: each endpoint has its own queue, so a receiver that is down holds
    -- back only its own deliveries.
    endpoint TEXT NOT NULL,
    -- When it was queued, ms since the Unix epoch: the body's `ts`, and the start of its retry
    -- budget (`webhooks.retry_for`).
    ts BIGINT NOT NULL,
    -- The body's `events`, a JSON array.
    events TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_queue ON webhook_deliveries (endpoint, id);

-- Which node delivers an endpoint's queue, until when: one at a time keeps the id order; a
-- node that stops renewing (it died) loses its lease to another after `webhooks.lease`.
CREATE TABLE IF NOT EXISTS webhook_leases (
    endpoint TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);

-- Deliveries given up after `webhooks.retry_for`, kept for the operator to inspect or replay.
CREATE TABLE IF NOT EXISTS webhook_dead_letters (
    id BIGINT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    ts BIGINT NOT NULL,
    events TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    last_error TEXT,
    dead_at BIGINT NOT NULL
);
