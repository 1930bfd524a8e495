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

/// Queues `events` (each one event's JSON) as one delivery to each of `endpoints`, inside
/// `tx`.
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn enqueue(
    tx: &mut Transaction<'static, sqlx::Any>,
    dialect: Dialect,
    endpoints: &[String],
    events: &[String],
) -> Result<(), StoreError> {
    let body = format!("[{}]", events.join(","));
    for endpoint in endpoints {
        sqlx::query(
            dialect.sql(
                "INSERT INTO webhook_deliveries (endpoint, ts, events) VALUES ($1, {now}, $2)",
            ),
        )
        .bind(endpoint)
        .bind(&body)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
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

/// An attempt failed: try again in `delay_ms`.
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn failed(
    store: &LockStore,
    id: i64,
    attempts: i64,
    delay_ms: i64,
    error: &str,
) -> Result<(), StoreError> {
    sqlx::query(store.dialect().sql(
        "UPDATE webhook_deliveries SET attempts = $1, next_attempt_at = {now} + $2, \
         last_error = $3 WHERE id = $4",
    ))
    .bind(attempts)
    .bind(delay_ms)
    .bind(error)
    .bind(id)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// The delivery's retry budget is spent: move it to the dead letters.
///
/// # Errors
///
/// [`StoreError`] when the database fails.
pub(crate) async fn dead(
    store: &LockStore,
    id: i64,
    attempts: i64,
    error: &str,
) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    sqlx::query(store.dialect().sql(
        "INSERT INTO webhook_dead_letters (id, endpoint, ts, events, attempts, last_error, dead_at) \
         SELECT id, endpoint, ts, events, $2, $3, {now} FROM webhook_deliveries WHERE id = $1",
    ))
    .bind(id)
    .bind(attempts)
    .bind(error)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        store
            .dialect()
            .sql("DELETE FROM webhook_deliveries WHERE id = $1"),
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
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
            match write(&store, &endpoints, &events).await {
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
        if let Err(err) = write(&store, &endpoints, events).await {
            warn!(%err, n = events.len(), "webhook events not queued at shutdown");
        }
    }
}

async fn write(
    store: &LockStore,
    endpoints: &[String],
    events: &[String],
) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    enqueue(&mut tx, store.dialect(), endpoints, events).await?;
    tx.commit().await?;
    Ok(())
}
