//! The webhook deliveries table (`migrations/*/…_webhooks.sql`): deliveries queued per
//! endpoint, the lease that lets one node at a time deliver an endpoint's queue, and dead
//! letters. Times are the database's clock, like the locks'.

use crate::locks::store::{Dialect, LockStore, StoreError};
use sqlx::{Row as _, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Queues `events` (each one event's JSON) as deliveries to each of `endpoints`, at most
/// `batch` events per delivery, inside `tx`.
///
/// On PostgreSQL the transaction first takes a lock per endpoint (held until commit), so an
/// endpoint's ids are handed out in commit order: without it a delivery with a higher id could
/// commit, be delivered and deleted before a lower one commits, and the lower one would then go
/// out after it. SQLite serializes writers already.
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn enqueue(
    tx: &mut Transaction<'static, sqlx::Any>,
    dialect: Dialect,
    endpoints: &[String],
    events: &[String],
    batch: usize,
) -> Result<(), StoreError> {
    let mut sorted: Vec<&String> = endpoints.iter().collect();
    // One order for every transaction, so two of them never wait on each other's locks.
    sorted.sort();
    for endpoint in sorted {
        if dialect == Dialect::Postgres {
            // 4711 keeps these locks apart from any other advisory lock of the database.
            sqlx::query(
                "SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock(4711, hashtext($1))) AS l",
            )
            .bind(endpoint)
            .fetch_one(&mut **tx)
            .await?;
        }
        for part in events.chunks(batch.max(1)) {
            sqlx::query(dialect.sql(
                "INSERT INTO webhook_deliveries (endpoint, ts, events) VALUES ($1, {now}, $2)",
            ))
            .bind(endpoint)
            .bind(format!("[{}]", part.join(",")))
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// The endpoints with deliveries queued that no URL of this configuration names (a URL was
/// changed or removed): nobody delivers them.
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn stranded(
    store: &LockStore,
    endpoints: &[String],
) -> Result<Vec<String>, StoreError> {
    let rows = sqlx::query("SELECT DISTINCT endpoint FROM webhook_deliveries")
        .fetch_all(store.pool())
        .await?;
    let mut stranded = Vec::new();
    for row in &rows {
        let endpoint: String = row.try_get("endpoint")?;
        if !endpoints.contains(&endpoint) {
            stranded.push(endpoint);
        }
    }
    Ok(stranded)
}

/// Takes or renews `node`'s lease on `endpoint`'s queue for `lease_ms`; false when another
/// node holds it.
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn lease(
    store: &LockStore,
    endpoint: &str,
    node: &str,
    lease_ms: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(store.dialect().sql(
        "INSERT INTO webhook_leases (endpoint, node, until_ms) VALUES ($1, $2, {now} + $3) \
         ON CONFLICT (endpoint) DO UPDATE SET node = excluded.node, until_ms = excluded.until_ms \
         WHERE webhook_leases.node = excluded.node OR webhook_leases.until_ms <= {now}",
    ))
    .bind(endpoint)
    .bind(node)
    .bind(lease_ms)
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives up `node`'s lease on `endpoint` (shutdown), so another node takes over at once.
pub(crate) async fn release(store: &LockStore, endpoint: &str, node: &str) {
    let released = sqlx::query(
        store
            .dialect()
            .sql("UPDATE webhook_leases SET until_ms = 0 WHERE endpoint = $1 AND node = $2"),
    )
    .bind(endpoint)
    .bind(node)
    .execute(store.pool())
    .await;
    if let Err(err) = released {
        debug!(%err, "could not release the webhook lease; it lapses by itself");
    }
}

/// The oldest delivery of an endpoint, with the database's time.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) id: i64,
    pub(crate) ts: i64,
    pub(crate) events: String,
    pub(crate) attempts: i64,
    pub(crate) next_attempt_at: i64,
    pub(crate) now: i64,
}

/// The oldest delivery queued for `endpoint`.
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn head(store: &LockStore, endpoint: &str) -> Result<Option<Head>, StoreError> {
    let row = sqlx::query(store.dialect().sql(
        "SELECT id, ts, events, attempts, next_attempt_at, {now} AS now FROM webhook_deliveries \
         WHERE endpoint = $1 ORDER BY id LIMIT 1",
    ))
    .bind(endpoint)
    .fetch_optional(store.pool())
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(Head {
        id: row.try_get("id")?,
        ts: row.try_get("ts")?,
        events: row.try_get("events")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        now: row.try_get("now")?,
    }))
}

/// How many deliveries wait for `endpoint`.
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn depth(store: &LockStore, endpoint: &str) -> Result<i64, StoreError> {
    let row = sqlx::query(
        store
            .dialect()
            .sql("SELECT COUNT(*) AS n FROM webhook_deliveries WHERE endpoint = $1"),
    )
    .bind(endpoint)
    .fetch_one(store.pool())
    .await?;
    Ok(row.try_get("n")?)
}

/// The delivery went out.
///
/// # Errors
///
/// [`StoreError`] when the database fails (it will be sent again: at least once).
pub(crate) async fn delivered(store: &LockStore, id: i64) -> Result<(), StoreError> {
    sqlx::query(
        store
            .dialect()
            .sql("DELETE FROM webhook_deliveries WHERE id = $1"),
    )
    .bind(id)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// The lease a failure is recorded under: only the node holding the endpoint's lease records
/// one, so a node that lost it during a slow attempt cannot overwrite (or dead-letter) the row
/// the new holder is working on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Holder<'a> {
    pub(crate) endpoint: &'a str,
    pub(crate) node: &'a str,
}

/// The condition "this node holds the endpoint's lease", with the endpoint and node as
/// parameters `$e` and `$n`.
fn holds_lease(e: u8, n: u8) -> String {
    format!(
        "EXISTS (SELECT 1 FROM webhook_leases WHERE endpoint = ${e} AND node = ${n} AND until_ms > {{now}})"
    )
}

/// An attempt failed: try again in `delay_ms`. False when this node no longer holds the lease
/// (nothing was recorded).
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn failed(
    store: &LockStore,
    holder: Holder<'_>,
    id: i64,
    attempts: i64,
    delay_ms: i64,
    error: &str,
) -> Result<bool, StoreError> {
    let sql = store.dialect().rewrite(&format!(
        "UPDATE webhook_deliveries SET attempts = $1, next_attempt_at = {{now}} + $2, \
         last_error = $3 WHERE id = $4 AND {}",
        holds_lease(5, 6)
    ));
    let done = sqlx::query(&sql)
        .bind(attempts)
        .bind(delay_ms)
        .bind(error)
        .bind(id)
        .bind(holder.endpoint)
        .bind(holder.node)
        .execute(store.pool())
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The delivery's retry budget is spent: move it to the dead letters. False when this node
/// no longer holds the lease (nothing was moved).
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn dead(
    store: &LockStore,
    holder: Holder<'_>,
    id: i64,
    attempts: i64,
    error: &str,
) -> Result<bool, StoreError> {
    let mut tx = store.begin().await?;
    let sql = store.dialect().rewrite(&format!(
        "INSERT INTO webhook_dead_letters (id, endpoint, ts, events, attempts, last_error, dead_at) \
         SELECT id, endpoint, ts, events, $2, $3, {{now}} FROM webhook_deliveries WHERE id = $1 AND {}",
        holds_lease(4, 5)
    ));
    let moved = sqlx::query(&sql)
        .bind(id)
        .bind(attempts)
        .bind(error)
        .bind(holder.endpoint)
        .bind(holder.node)
        .execute(&mut *tx)
        .await?;
    if moved.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        store
            .dialect()
            .sql("DELETE FROM webhook_deliveries WHERE id = $1"),
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Writes the events [`super::Webhooks::emit`] queued into the database, a batch of up to
/// `batch` per delivery, until `shutdown`; then writes what is left once. A batch the
/// database refuses is retried (new events wait in the bounded queue meanwhile), so an
/// outage delays events instead of losing them, up to the queue's size.
pub(crate) async fn run_writer(
    store: LockStore,
    endpoints: Vec<String>,
    mut queued: mpsc::Receiver<String>,
    batch: usize,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    match stranded(&store, &endpoints).await {
        Ok(stranded) => {
            for endpoint in stranded {
                warn!(
                    endpoint = %super::label(&endpoint),
                    "webhook deliveries are queued for an endpoint no longer configured; nobody delivers them (see webhook_deliveries)"
                );
            }
        }
        Err(err) => debug!(%err, "could not look for stranded webhook deliveries"),
    }
    // A batch the shutdown interrupted: written once more below.
    let mut unwritten = Vec::new();
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            first = queued.recv() => first,
        };
        let Some(first) = first else { break };
        let mut events = vec![first];
        while events.len() < batch {
            match queued.try_recv() {
                Ok(more) => events.push(more),
                Err(_) => break,
            }
        }
        let mut delay = Duration::from_millis(50);
        loop {
            match write(&store, &endpoints, &events, batch).await {
                Ok(()) => break,
                Err(err) => {
                    warn!(%err, n = events.len(), ?delay, "could not queue webhook events; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => {
                            unwritten = std::mem::take(&mut events);
                            break;
                        }
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        wake.notify_waiters();
    }
    // Shutting down: one attempt for what is still queued.
    let mut rest = unwritten;
    while let Ok(event) = queued.try_recv() {
        rest.push(event);
    }
    for events in rest.chunks(batch.max(1)) {
        if let Err(err) = write(&store, &endpoints, events, batch).await {
            warn!(%err, n = events.len(), "webhook events not queued at shutdown");
        }
    }
}

async fn write(
    store: &LockStore,
    endpoints: &[String],
    events: &[String],
    batch: usize,
) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    enqueue(&mut tx, store.dialect(), endpoints, events, batch).await?;
    tx.commit().await?;
    Ok(())
}
