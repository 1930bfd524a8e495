-- Lock decisions in one round trip. Each function below is one decision: it locks the item's
-- row, reads the clock once the lock is held, grants or refuses, bumps the fencing token, writes
-- the outbox rows and returns the answer, in one statement (so one commit). PL/pgSQL rather than
-- one data-modifying CTE: every statement in it sees the rows as of its own start, so the
-- decision is made on the row as it is once locked, and a first grant that loses the race for
-- the INSERT simply reads the winner's row; a CTE works on one snapshot taken before the wait.
-- SQLite runs the same decisions as short transactions in `store.rs` (one connection, in
-- process: round trips cost nothing there); the contention checkers run on both.

-- Each outbox row names the lock it is about, '{team}/{item}' (ids never contain '/'): every
-- decision returns all of its item's rows still in the outbox, in id order, and its node
-- publishes them all, so an item's events reach the broker in commit order even when the node
-- that wrote an earlier one is slow to publish it (the broker drops the late copy by version).
ALTER TABLE lock_events ADD COLUMN IF NOT EXISTS lock_key TEXT;
CREATE INDEX IF NOT EXISTS lock_events_by_lock ON lock_events (lock_key, id);

-- Milliseconds since the epoch as RFC 3339 UTC with milliseconds, as the API writes times
-- (integer arithmetic: no float rounding of the milliseconds).
CREATE OR REPLACE FUNCTION lockstep_time(ms BIGINT) RETURNS TEXT
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT to_char(to_timestamp(ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || '.' || lpad((ms % 1000)::TEXT, 3, '0') || 'Z'
$$;

-- The events' `data`, byte for byte what the API's Rust side writes (`LockEvent`): compact
-- JSON with its keys in sorted order.
CREATE OR REPLACE FUNCTION lockstep_acquired_data(team TEXT, item TEXT, holder TEXT, token BIGINT, acquired_at BIGINT, expires_at BIGINT)
RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT '{"acquired_at":' || to_json(lockstep_time(acquired_at))::TEXT
        || ',"expires_at":' || to_json(lockstep_time(expires_at))::TEXT
        || ',"holder":' || to_json(holder)::TEXT
        || ',"item":' || to_json(item)::TEXT
        || ',"team":' || to_json(team)::TEXT
        || ',"token":' || token::TEXT || '}'
$$;

CREATE OR REPLACE FUNCTION lockstep_expired_data(team TEXT, item TEXT, holder TEXT, token BIGINT, expired_at BIGINT)
RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT '{"expired_at":' || to_json(lockstep_time(expired_at))::TEXT
        || ',"holder":' || to_json(holder)::TEXT
        || ',"item":' || to_json(item)::TEXT
        || ',"team":' || to_json(team)::TEXT
        || ',"token":' || token::TEXT || '}'
$$;

CREATE OR REPLACE FUNCTION lockstep_released_data(team TEXT, item TEXT, holder TEXT, token BIGINT, reason TEXT, released_at BIGINT)
RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT '{"holder":' || to_json(holder)::TEXT
        || ',"item":' || to_json(item)::TEXT
        || ',"reason":' || to_json(reason)::TEXT
        || ',"released_at":' || to_json(lockstep_time(released_at))::TEXT
        || ',"team":' || to_json(team)::TEXT
        || ',"token":' || token::TEXT || '}'
$$;

CREATE OR REPLACE FUNCTION lockstep_taken_over_data(team TEXT, item TEXT, holder TEXT, token BIGINT, by_admin TEXT, released_at BIGINT)
RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT '{"by":' || to_json(by_admin)::TEXT
        || ',"holder":' || to_json(holder)::TEXT
        || ',"item":' || to_json(item)::TEXT
        || ',"released_at":' || to_json(lockstep_time(released_at))::TEXT
        || ',"team":' || to_json(team)::TEXT
        || ',"token":' || token::TEXT || '}'
$$;

-- What every decision answers: its outcome and the lock it is about (the grant, the holder that
-- refused it, or nothing), one row per outbox row of the item to publish (in id order), or one
-- row with NULL event columns when there is none.
--   acquire:   'granted' | 'extended' | 'held' | 'session_gone'
--   renew:     'done' | 'held' | 'lost'
--   release:   'done' | 'held' | 'lost'
--   take_over: 'done' | 'none'
CREATE OR REPLACE FUNCTION lockstep_answer(a_outcome TEXT, a_lock locks, a_key TEXT)
RETURNS TABLE (outcome TEXT, holder TEXT, session TEXT, token BIGINT, acquired_at BIGINT, expires_at BIGINT,
               event_id BIGINT, event_topic TEXT, event_type TEXT, event_data TEXT)
LANGUAGE sql STABLE AS $$
    SELECT a_outcome, (a_lock).holder, (a_lock).session, (a_lock).token, (a_lock).acquired_at,
           (a_lock).expires_at, e.id, e.topic, e.event_type, e.data
    FROM (SELECT 1) AS one
    LEFT JOIN lock_events e ON a_key IS NOT NULL AND e.lock_key = a_key
    ORDER BY e.id
$$;

CREATE OR REPLACE FUNCTION lockstep_now() RETURNS BIGINT
LANGUAGE sql VOLATILE AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;

-- Grants the item to the holder for `ttl` ms, bound to `session` on `node` if given.
CREATE OR REPLACE FUNCTION lockstep_acquire(p_team TEXT, p_item TEXT, p_holder TEXT, p_session TEXT, p_node TEXT, p_ttl BIGINT, p_lease BIGINT)
RETURNS TABLE (outcome TEXT, holder TEXT, session TEXT, token BIGINT, acquired_at BIGINT, expires_at BIGINT,
               event_id BIGINT, event_topic TEXT, event_type TEXT, event_data TEXT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    cur locks;
    found_row BOOLEAN;
    now_ms BIGINT;
    v_key TEXT := p_team || '/' || p_item;
BEGIN
    -- A session of a node the cluster took for dead is over: binding a lock to it would leave
    -- the lock to its TTL (rows of `nodes` are only written by the nodes themselves).
    IF p_node IS NOT NULL AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node = p_node) THEN
        RETURN QUERY SELECT * FROM lockstep_answer('session_gone', NULL::locks, NULL);
        RETURN;
    END IF;
    LOOP
        SELECT * INTO cur FROM locks l WHERE l.team = p_team AND l.item = p_item FOR UPDATE;
        found_row := FOUND;
        now_ms := lockstep_now();
        IF NOT found_row THEN
            INSERT INTO locks AS l (team, item, holder, session, token, acquired_at, expires_at, state, expiry_announced, node)
            VALUES (p_team, p_item, p_holder, p_session, 1, now_ms, now_ms + p_ttl, 'held', 0, p_node)
            ON CONFLICT (team, item) DO NOTHING
            RETURNING l.* INTO cur;
            -- A concurrent first grant won the insert: lock and judge its row.
            CONTINUE WHEN NOT FOUND;
        ELSIF cur.state = 'held' AND cur.expires_at > now_ms AND cur.holder = p_holder THEN
            -- The holder asks again: extend, keep the token, move to the new session (a
            -- request without one keeps the lock's session and node as they are).
            UPDATE locks l SET expires_at = now_ms + p_ttl, session = COALESCE(p_session, l.session),
                node = COALESCE(p_node, l.node)
            WHERE l.team = p_team AND l.item = p_item
            RETURNING l.* INTO cur;
            RETURN QUERY SELECT * FROM lockstep_answer('extended', cur, v_key);
            RETURN;
        ELSIF cur.state = 'held' AND cur.expires_at > now_ms THEN
            RETURN QUERY SELECT * FROM lockstep_answer('held', cur, NULL);
            RETURN;
        ELSE
            -- Free: released, or expired. An expiry nobody announced yet is announced now,
            -- before the new grant's event, so it is never lost or doubled.
            IF cur.state = 'held' AND cur.expiry_announced = 0 THEN
                INSERT INTO lock_events (topic, event_type, data, claimed_until, lock_key)
                SELECT t, 'lock.expired', lockstep_expired_data(p_team, p_item, cur.holder, cur.token, cur.expires_at), now_ms + p_lease, v_key
                FROM unnest(ARRAY['/team/' || p_team, '/user/' || cur.holder]) AS t;
            END IF;
            UPDATE locks l SET holder = p_holder, session = p_session, token = l.token + 1, acquired_at = now_ms,
                expires_at = now_ms + p_ttl, state = 'held', expiry_announced = 0, node = p_node
            WHERE l.team = p_team AND l.item = p_item
            RETURNING l.* INTO cur;
        END IF;
        INSERT INTO lock_events (topic, event_type, data, claimed_until, lock_key)
        VALUES ('/team/' || p_team, 'lock.acquired',
                lockstep_acquired_data(p_team, p_item, p_holder, cur.token, cur.acquired_at, cur.expires_at),
                now_ms + p_lease, v_key);
        RETURN QUERY SELECT * FROM lockstep_answer('granted', cur, v_key);
        RETURN;
    END LOOP;
END
$$;

-- Extends the holder's grant if `token` is still the live one.
CREATE OR REPLACE FUNCTION lockstep_renew(p_team TEXT, p_item TEXT, p_holder TEXT, p_token BIGINT, p_ttl BIGINT)
RETURNS TABLE (outcome TEXT, holder TEXT, session TEXT, token BIGINT, acquired_at BIGINT, expires_at BIGINT,
               event_id BIGINT, event_topic TEXT, event_type TEXT, event_data TEXT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    cur locks;
    now_ms BIGINT;
BEGIN
    SELECT * INTO cur FROM locks l WHERE l.team = p_team AND l.item = p_item FOR UPDATE;
    now_ms := lockstep_now();
    IF cur.state = 'held' AND cur.expires_at > now_ms AND cur.token = p_token AND cur.holder = p_holder THEN
        UPDATE locks l SET expires_at = now_ms + p_ttl WHERE l.team = p_team AND l.item = p_item
        RETURNING l.* INTO cur;
        RETURN QUERY SELECT * FROM lockstep_answer('done', cur, NULL);
    ELSIF cur.state = 'held' AND cur.expires_at > now_ms AND cur.holder <> p_holder THEN
        RETURN QUERY SELECT * FROM lockstep_answer('held', cur, NULL);
    ELSE
        RETURN QUERY SELECT * FROM lockstep_answer('lost', NULL::locks, NULL);
    END IF;
END
$$;

-- Releases the holder's grant if `token` is still the live one; releasing a grant already
-- released with this token succeeds again (idempotent).
CREATE OR REPLACE FUNCTION lockstep_release(p_team TEXT, p_item TEXT, p_holder TEXT, p_token BIGINT, p_lease BIGINT)
RETURNS TABLE (outcome TEXT, holder TEXT, session TEXT, token BIGINT, acquired_at BIGINT, expires_at BIGINT,
               event_id BIGINT, event_topic TEXT, event_type TEXT, event_data TEXT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    cur locks;
    now_ms BIGINT;
    v_key TEXT := p_team || '/' || p_item;
BEGIN
    SELECT * INTO cur FROM locks l WHERE l.team = p_team AND l.item = p_item FOR UPDATE;
    now_ms := lockstep_now();
    IF cur.state = 'held' AND cur.expires_at > now_ms AND cur.token = p_token AND cur.holder = p_holder THEN
        UPDATE locks l SET state = 'released', expires_at = now_ms WHERE l.team = p_team AND l.item = p_item
        RETURNING l.* INTO cur;
        INSERT INTO lock_events (topic, event_type, data, claimed_until, lock_key)
        VALUES ('/team/' || p_team, 'lock.released',
                lockstep_released_data(p_team, p_item, p_holder, p_token, 'released', now_ms),
                now_ms + p_lease, v_key);
        RETURN QUERY SELECT * FROM lockstep_answer('done', cur, v_key);
    ELSIF cur.state = 'released' AND cur.token = p_token AND cur.holder = p_holder THEN
        RETURN QUERY SELECT * FROM lockstep_answer('done', cur, NULL);
    ELSIF cur.state = 'held' AND cur.expires_at > now_ms AND cur.holder <> p_holder THEN
        RETURN QUERY SELECT * FROM lockstep_answer('held', cur, NULL);
    ELSE
        RETURN QUERY SELECT * FROM lockstep_answer('lost', NULL::locks, NULL);
    END IF;
END
$$;

-- Ends whoever's grant is live on the item (a team admin's takeover).
CREATE OR REPLACE FUNCTION lockstep_take_over(p_team TEXT, p_item TEXT, p_admin TEXT, p_lease BIGINT)
RETURNS TABLE (outcome TEXT, holder TEXT, session TEXT, token BIGINT, acquired_at BIGINT, expires_at BIGINT,
               event_id BIGINT, event_topic TEXT, event_type TEXT, event_data TEXT)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    cur locks;
    now_ms BIGINT;
    v_key TEXT := p_team || '/' || p_item;
BEGIN
    SELECT * INTO cur FROM locks l WHERE l.team = p_team AND l.item = p_item FOR UPDATE;
    now_ms := lockstep_now();
    IF cur.state = 'held' AND cur.expires_at > now_ms THEN
        UPDATE locks l SET state = 'taken_over', expires_at = now_ms WHERE l.team = p_team AND l.item = p_item;
        INSERT INTO lock_events (topic, event_type, data, claimed_until, lock_key)
        SELECT t, 'lock.taken_over', lockstep_taken_over_data(p_team, p_item, cur.holder, cur.token, p_admin, now_ms),
               now_ms + p_lease, v_key
        FROM unnest(ARRAY['/team/' || p_team, '/user/' || cur.holder]) AS t;
        -- The grant as it was: its holder, token and the expiry it had.
        RETURN QUERY SELECT * FROM lockstep_answer('done', cur, v_key);
    ELSE
        RETURN QUERY SELECT * FROM lockstep_answer('none', NULL::locks, NULL);
    END IF;
END
$$;
