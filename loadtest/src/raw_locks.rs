//! `loadtest locks --raw <database-url>`: the reference for Lockstep's lock decisions. The same
//! acquire+release pairs as `loadtest locks` (each client on its own item, closed loop), as plain
//! SQL straight to the database: no HTTP, no auth, no JSON, no broker. Each decision is what
//! Lockstep's decision must at least do: grant if free or expired (bumping the fencing token)
//! or refuse, on the database's clock, and write its event to an outbox in the same
//! transaction. So `lockstep / raw` shows what Lockstep adds to the database's own cost.
//!
//! PostgreSQL: one statement per decision (a data-modifying CTE). SQLite (in-process, WAL,
//! `synchronous=NORMAL` and one connection, as Lockstep's embedded store): an immediate
//! transaction of two statements. The reference's tables (`raw_locks`, `raw_lock_events`) are
//! created fresh beside Lockstep's and dropped at the end.

use crate::api_load::{ApiReport, closed_loop, report};
use anyhow::Context as _;
use sqlx::Row as _;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

const PG_TABLES: &[&str] = &[
    "DROP TABLE IF EXISTS raw_locks, raw_lock_events",
    "CREATE TABLE raw_locks (team TEXT NOT NULL, item TEXT NOT NULL, holder TEXT NOT NULL, \
     token BIGINT NOT NULL, acquired_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, \
     state TEXT NOT NULL, PRIMARY KEY (team, item))",
    "CREATE TABLE raw_lock_events (id BIGSERIAL PRIMARY KEY, topic TEXT NOT NULL, \
     event_type TEXT NOT NULL, data TEXT NOT NULL)",
];

/// Grant if free or expired, else nothing; the event in the same statement. $1 team, $2 item,
/// $3 holder, $4 TTL ms.
const PG_ACQUIRE: &str = "\
WITH now AS (SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS t),
granted AS (
  INSERT INTO raw_locks (team, item, holder, token, acquired_at, expires_at, state)
  SELECT $1, $2, $3, 1, t, t + $4, 'held' FROM now
  ON CONFLICT (team, item) DO UPDATE SET holder = excluded.holder,
    token = raw_locks.token + 1, acquired_at = excluded.acquired_at,
    expires_at = excluded.expires_at, state = 'held'
  WHERE raw_locks.state <> 'held' OR raw_locks.expires_at <= excluded.acquired_at
  RETURNING token),
event AS (
  INSERT INTO raw_lock_events (topic, event_type, data)
  SELECT '/team/' || $1, 'lock.acquired',
    json_build_object('team', $1, 'item', $2, 'holder', $3, 'token', token)::text
  FROM granted)
SELECT token FROM granted";

/// Release if the caller holds this token and it is live, with its event. $1 team, $2 item, $3 holder,
/// $4 token.
const PG_RELEASE: &str = "\
WITH now AS (SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS t),
released AS (
  UPDATE raw_locks SET state = 'released', expires_at = (SELECT t FROM now)
  WHERE team = $1 AND item = $2 AND holder = $3 AND token = $4 AND state = 'held'
    AND expires_at > (SELECT t FROM now)
  RETURNING token),
event AS (
  INSERT INTO raw_lock_events (topic, event_type, data)
  SELECT '/team/' || $1, 'lock.released',
    json_build_object('team', $1, 'item', $2, 'holder', $3, 'token', token)::text
  FROM released)
SELECT token FROM released";

const SQLITE_TABLES: &[&str] = &[
    "DROP TABLE IF EXISTS raw_locks",
    "DROP TABLE IF EXISTS raw_lock_events",
    "CREATE TABLE raw_locks (team TEXT NOT NULL, item TEXT NOT NULL, holder TEXT NOT NULL, \
     token INTEGER NOT NULL, acquired_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, \
     state TEXT NOT NULL, PRIMARY KEY (team, item))",
    "CREATE TABLE raw_lock_events (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, \
     event_type TEXT NOT NULL, data TEXT NOT NULL)",
];

const SQLITE_NOW: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

/// Acquire+release pairs as plain SQL against `url` (`postgres://…` or `sqlite://path`),
/// `concurrency` clients on items of their own for `duration`; the PostgreSQL pool has
/// `pool_size` connections (Lockstep's `database.max_connections`).
///
/// # Errors
///
/// When the database cannot be reached or the tables cannot be made.
pub async fn locks_raw(
    url: &str,
    concurrency: usize,
    duration: Duration,
    pool_size: u32,
) -> anyhow::Result<ApiReport> {
    let ttl_ms = 60_000_i64;
    if url.starts_with("sqlite:") {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .context("opening the SQLite file")?;
        for sql in SQLITE_TABLES {
            sqlx::query(sql).execute(&pool).await?;
        }
        let (acquire, release, event) = sqlite_statements();
        let statements = Arc::new((acquire, release, event));
        let run = {
            let pool = pool.clone();
            closed_loop(concurrency, duration, move |w| {
                let (pool, statements) = (pool.clone(), statements.clone());
                async move {
                    let (acquire, release, event) = &*statements;
                    let (item, holder) = (format!("lt-{w}"), format!("lt{w}"));
                    let decide = async |sql: &str, kind: &str, arg: i64| {
                        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                        let token: Option<i64> = sqlx::query(sql)
                            .bind("t0")
                            .bind(&item)
                            .bind(&holder)
                            .bind(arg)
                            .fetch_optional(&mut *tx)
                            .await?
                            .map(|row| row.get(0));
                        if let Some(token) = token {
                            sqlx::query(event)
                                .bind("t0")
                                .bind(kind)
                                .bind(&item)
                                .bind(&holder)
                                .bind(token)
                                .execute(&mut *tx)
                                .await?;
                            tx.commit().await?;
                        }
                        Ok::<_, sqlx::Error>(token)
                    };
                    let Ok(Some(token)) = decide(acquire, "lock.acquired", ttl_ms).await else {
                        return false;
                    };
                    matches!(decide(release, "lock.released", token).await, Ok(Some(_)))
                }
            })
            .await
        };
        drop_tables(&pool, &SQLITE_TABLES[..2]).await;
        return Ok(report(
            "locks",
            "raw SQLite".to_owned(),
            concurrency,
            run?,
            None,
        ));
    }
    let pool = PgPoolOptions::new()
        .max_connections(pool_size.max(1))
        .acquire_timeout(Duration::from_secs(3))
        .connect(url)
        .await
        .context("connecting to PostgreSQL")?;
    for sql in PG_TABLES {
        sqlx::query(sql).execute(&pool).await?;
    }
    let run = {
        let pool = pool.clone();
        closed_loop(concurrency, duration, move |w| {
            let pool = pool.clone();
            async move {
                let (item, holder) = (format!("lt-{w}"), format!("lt{w}"));
                let decide = async |sql: &str, arg: i64| {
                    sqlx::query(sql)
                        .bind("t0")
                        .bind(&item)
                        .bind(&holder)
                        .bind(arg)
                        .fetch_optional(&pool)
                        .await
                        .map(|row| row.map(|row| row.get::<i64, _>(0)))
                };
                let Ok(Some(token)) = decide(PG_ACQUIRE, ttl_ms).await else {
                    return false;
                };
                matches!(decide(PG_RELEASE, token).await, Ok(Some(_)))
            }
        })
        .await
    };
    drop_tables(&pool, &PG_TABLES[..1]).await;
    Ok(report(
        "locks",
        "raw PostgreSQL".to_owned(),
        concurrency,
        run?,
        None,
    ))
}

/// SQLite's acquire (grant if free or expired, else no row), release (if the caller holds this
/// token, else no row) and event insert, each run inside one immediate transaction.
fn sqlite_statements() -> (String, String, &'static str) {
    let acquire = format!(
        "INSERT INTO raw_locks (team, item, holder, token, acquired_at, expires_at, state) \
         VALUES (?1, ?2, ?3, 1, {SQLITE_NOW}, {SQLITE_NOW} + ?4, 'held') \
         ON CONFLICT (team, item) DO UPDATE SET holder = excluded.holder, \
         token = raw_locks.token + 1, acquired_at = excluded.acquired_at, \
         expires_at = excluded.expires_at, state = 'held' \
         WHERE raw_locks.state <> 'held' OR raw_locks.expires_at <= excluded.acquired_at \
         RETURNING token"
    );
    let release = format!(
        "UPDATE raw_locks SET state = 'released', expires_at = {SQLITE_NOW} \
         WHERE team = ?1 AND item = ?2 AND holder = ?3 AND token = ?4 AND state = 'held' \
         AND expires_at > {SQLITE_NOW} \
         RETURNING token"
    );
    let event: &'static str = "INSERT INTO raw_lock_events (topic, event_type, data) \
             VALUES ('/team/' || ?1, ?2, json_object('team', ?1, 'item', ?3, 'holder', ?4, 'token', ?5))";
    (acquire, release, event)
}

/// Leaves the database as it was (best effort: the figures are already taken).
async fn drop_tables<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, drops: &[&str])
where
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    for sql in drops {
        let _ = sqlx::query(sql).execute(pool).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference makes the decisions Lockstep makes: a held lock is refused, a release
    /// needs the holder's token, the next grant bumps the token.
    #[tokio::test]
    async fn sqlite_decisions_refuse_and_fence() {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        for sql in SQLITE_TABLES {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        let (acquire, release, _) = sqlite_statements();
        let run = async |sql: &str, holder: &str, arg: i64| -> Option<i64> {
            sqlx::query(sql)
                .bind("t0")
                .bind("doc")
                .bind(holder)
                .bind(arg)
                .fetch_optional(&pool)
                .await
                .unwrap()
                .map(|row| row.get(0))
        };
        assert_eq!(run(&acquire, "ana", 60_000).await, Some(1));
        assert_eq!(run(&acquire, "bo", 60_000).await, None, "held");
        assert_eq!(run(&release, "bo", 1).await, None, "not the holder");
        assert_eq!(run(&release, "ana", 2).await, None, "not the token");
        assert_eq!(run(&release, "ana", 1).await, Some(1));
        assert_eq!(run(&acquire, "bo", 60_000).await, Some(2));
        // An expired grant is free: a TTL of -1 ms has already passed.
        assert_eq!(run(&release, "bo", 2).await, Some(2));
        assert_eq!(run(&acquire, "ana", -1).await, Some(3));
        assert_eq!(run(&acquire, "bo", 60_000).await, Some(4));
    }
}
