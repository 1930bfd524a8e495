-- The same pair as `loadtest locks --raw` makes it (its PG_ACQUIRE and PG_RELEASE): one CTE each.
WITH now AS (SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS t),
granted AS (
  INSERT INTO raw_locks (team, item, holder, token, acquired_at, expires_at, state)
  SELECT 'tb', 'i' || :client_id, 'h' || :client_id, 1, t, t + 30000, 'held' FROM now
  ON CONFLICT (team, item) DO UPDATE SET holder = excluded.holder,
    token = raw_locks.token + 1, acquired_at = excluded.acquired_at,
    expires_at = excluded.expires_at, state = 'held'
  WHERE raw_locks.state <> 'held' OR raw_locks.expires_at <= excluded.acquired_at
  RETURNING token),
event AS (
  INSERT INTO raw_lock_events (topic, event_type, data)
  SELECT '/team/tb', 'lock.acquired',
    json_build_object('team', 'tb', 'item', 'i' || :client_id, 'holder', 'h', 'token', token)::text
  FROM granted)
SELECT token AS t FROM granted \gset
WITH now AS (SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS t),
released AS (
  UPDATE raw_locks SET state = 'released', expires_at = (SELECT t FROM now)
  WHERE team = 'tb' AND item = 'i' || :client_id AND holder = 'h' || :client_id AND token = :t AND state = 'held'
    AND expires_at > (SELECT t FROM now)
  RETURNING token),
event AS (
  INSERT INTO raw_lock_events (topic, event_type, data)
  SELECT '/team/tb', 'lock.released',
    json_build_object('team', 'tb', 'item', 'i' || :client_id, 'holder', 'h', 'token', token)::text
  FROM released)
SELECT token FROM released;
