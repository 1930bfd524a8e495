//! The lock store: every lock decision on PostgreSQL or SQLite (sqlx).
//!
//! One implementation serves both databases through sqlx's `Any` driver; the few differences
//! (the clock expression, row locks, placeholders) live in `Dialect`. On PostgreSQL each
//! single-item decision is one statement, a function of `0004_lock_decisions.sql` that locks
//! the item's row (`SELECT … FOR UPDATE`, so concurrent nodes serialize per item), decides and
//! writes in one commit. SQLite, the embedded default, runs on one connection, so decisions are
//! short transactions here and serialize outright. Time is always the database's clock, read
//! once the item's row is locked.
//!
//! Every state change writes its events into `lock_events` in the same transaction (a
//! transactional outbox), and every decision returns its item's rows still there; see
//! `outbox`.

use super::event::{LockEvent, Reason};
use crate::webhooks::LockForward;
use dashmap::DashMap;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row, Transaction};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use thiserror::Error;

/// A grant, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockState {
    pub team: String,
    pub item: String,
    pub holder: String,
    pub session: Option<String>,
    pub token: i64,
    pub acquired_at: i64,
    pub expires_at: i64,
}

/// An event written in a decision's transaction, to publish after commit.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: i64,
    pub topic: String,
    pub event_type: String,
    pub data: String,
}

/// The store failed: a database error (the request answers 503; nothing was written).
#[derive(Debug, Error)]
pub enum StoreError {
    // Not `#[source]`: the message already carries sqlx's, whose own errors repeat their
    // sources in their messages, so a printed chain would say everything two or three times.
    #[error("lock store unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error("lock store busy: the decision could not be made, try again")]
    Contended,
}

impl StoreError {
    /// A decision function answered what this build does not know (a database migrated by a
    /// different version): refuse rather than guess.
    fn unexpected(outcome: &str) -> StoreError {
        StoreError::Unavailable(sqlx::Error::Protocol(format!(
            "unexpected lock decision outcome '{outcome}'"
        )))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> StoreError {
        StoreError::Unavailable(err)
    }
}

/// The WebSocket session a lock is bound to, from a verified session id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound<'a> {
    pub session: &'a str,
    /// The node hosting the session.
    pub node: &'a str,
}

/// What `acquire` decided.
#[derive(Debug)]
pub enum Acquired {
    /// Granted; `extended` when the caller already held it (same token, later expiry).
    Granted {
        lock: LockState,
        extended: bool,
        events: Vec<StoredEvent>,
    },
    /// Someone else holds it.
    Held(LockState),
    /// The session to bind it to is on a node the cluster took for dead: that session is over.
    SessionGone,
}

/// What a decision on a caller's token found.
#[derive(Debug)]
pub enum TokenCheck {
    /// The token is the live grant's; the change was made.
    Done {
        lock: LockState,
        events: Vec<StoredEvent>,
    },
    /// Another caller holds the item now.
    HeldByOther(LockState),
    /// The token's grant is over (expired, released, taken over): acquire again.
    Lost,
}

/// What `acquire_batch` decided.
#[derive(Debug)]
pub enum BatchAcquired {
    Granted {
        locks: Vec<LockState>,
        events: Vec<StoredEvent>,
    },
    /// Nothing was granted; these items are held by others.
    Blocked(Vec<LockState>),
    /// The session to bind them to is on a node the cluster took for dead.
    SessionGone,
}

/// SQL differences between the two databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    /// Milliseconds since the Unix epoch on the database's clock.
    fn now(self) -> &'static str {
        match self {
            Dialect::Postgres => "(extract(epoch from clock_timestamp()) * 1000)::bigint",
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    /// Locks the selected rows until commit (PostgreSQL); SQLite's single connection already
    /// serializes transactions.
    fn for_update(self) -> &'static str {
        match self {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        }
    }

    /// Lets concurrent sweepers on several nodes take disjoint rows.
    fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        }
    }

    /// The text of a query in this dialect. Queries are written once, with `$1` placeholders
    /// (SQLite wants `?1`) and `{now}`, `{columns}`, `{for_update}`, `{skip_locked}`; each is
    /// rewritten on its first use and kept for the life of the process (a few dozen texts),
    /// so a decision does no string work and sqlx's statement cache, keyed by the text,
    /// prepares each once per connection.
    pub(crate) fn sql(self, template: &'static str) -> &'static str {
        static TEXTS: LazyLock<DashMap<(Dialect, &'static str), &'static str>> =
            LazyLock::new(DashMap::new);
        if let Some(text) = TEXTS.get(&(self, template)) {
            return *text;
        }
        *TEXTS
            .entry((self, template))
            .or_insert_with(|| Box::leak(self.rewrite(template).into_boxed_str()))
    }

    /// [`Dialect::sql`] for a query whose text varies (a list of placeholders): made per call.
    pub(crate) fn rewrite(self, template: &str) -> String {
        let sql = template
            .replace("{columns}", COLUMNS)
            .replace("{now}", self.now())
            .replace("{for_update}", self.for_update())
            .replace("{skip_locked}", self.skip_locked());
        match self {
            Dialect::Postgres => sql,
            Dialect::Sqlite => sql.replace('$', "?"),
        }
    }
}

/// Settings of the lock store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `postgres://…` or `sqlite://path`.
    pub url: String,
    /// Connections to PostgreSQL (SQLite always uses one).
    pub max_connections: u32,
    /// How long a claimed outbox event is left to its claimer before another node publishes it.
    pub event_lease: Duration,
}

/// The lock store.
#[derive(Debug, Clone)]
pub struct LockStore {
    pool: AnyPool,
    /// One connection of its own for the node's heartbeat (PostgreSQL): a node whose main pool
    /// is busy with requests and sweeps must not look dead to the others.
    heartbeat: AnyPool,
    dialect: Dialect,
    event_lease_ms: i64,
    /// Where lock events also go once published: the webhook queue, when endpoints want
    /// them. Set by [`LockStore::forwarding`].
    forward: Option<Arc<LockForward>>,
}

const COLUMNS: &str =
    "team, item, holder, session, token, acquired_at, expires_at, state, expiry_announced";

/// What one grant inside a transaction came to.
enum Grant {
    /// Granted, or `extended` for its holder (same token).
    Granted { lock: LockState, extended: bool },
    /// Held by another.
    Held(LockState),
    /// A concurrent first grant won the insert: retry in a new transaction.
    Raced,
}

/// A row read for a decision, with the database's current time.
struct Current {
    lock: LockState,
    /// Ended by a release or a takeover (as opposed to live or expired).
    released: bool,
    /// Ended by the holder's own release (a repeated release with its token succeeds).
    released_by_holder: bool,
    expiry_announced: bool,
    now: i64,
}

impl Current {
    fn live(&self) -> bool {
        !self.released && self.lock.expires_at > self.now
    }
}

fn lock_from(row: &AnyRow) -> Result<LockState, sqlx::Error> {
    Ok(LockState {
        team: row.try_get("team")?,
        item: row.try_get("item")?,
        holder: row.try_get("holder")?,
        session: row.try_get("session")?,
        token: row.try_get("token")?,
        acquired_at: row.try_get("acquired_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

impl LockStore {
    /// Creates the store without connecting: connections are made on first use, so a node
    /// starts (not ready) while its database is still down. Call [`LockStore::migrate`] (and
    /// retry it) before serving.
    ///
    /// # Errors
    ///
    /// When the URL is not a `postgres://` or `sqlite:` URL.
    pub fn open(config: &StoreConfig) -> Result<LockStore, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = if config.url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            Dialect::Postgres
        };
        let pool = |connections: u32| -> Result<AnyPool, sqlx::Error> {
            let options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(3));
            match dialect {
                Dialect::Postgres => options
                    .max_connections(connections.max(1))
                    .connect_lazy(&config.url),
                Dialect::Sqlite => options
                    .max_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL: readers do not block the writer; NORMAL is durable across
                            // process crashes, which is what a lock table needs.
                            for pragma in [
                                "PRAGMA journal_mode = WAL",
                                "PRAGMA synchronous = NORMAL",
                                "PRAGMA busy_timeout = 5000",
                            ] {
                                sqlx::query(pragma).execute(&mut *conn).await?;
                            }
                            Ok(())
                        })
                    })
                    .connect_lazy(&config.url),
            }
        };
        let main = pool(config.max_connections)?;
        // SQLite serves one node, whose pauses stall every connection alike, and a second
        // writer would make the main connection's read-then-write transactions fail with
        // SQLITE_BUSY_SNAPSHOT: the heartbeat shares the one connection there.
        let heartbeat = match dialect {
            Dialect::Postgres => pool(1)?,
            Dialect::Sqlite => main.clone(),
        };
        let pool = main;
        Ok(LockStore {
            pool,
            heartbeat,
            dialect,
            event_lease_ms: super::millis(config.event_lease),
            forward: None,
        })
    }

    /// This store, forwarding the lock events webhooks want into their queue as the outbox
    /// lets them go (`delete_events`), in the same transaction: an event leaves the outbox
    /// only into the webhook queue, so a node's death between the two loses none.
    #[must_use]
    pub fn forwarding(mut self, forward: Option<LockForward>) -> LockStore {
        self.forward = forward.map(Arc::new);
        self
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Runs the migrations of this database.
    ///
    /// # Errors
    ///
    /// When a migration fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.dialect {
            Dialect::Postgres => sqlx::migrate!("./migrations/postgres"),
            Dialect::Sqlite => sqlx::migrate!("./migrations/sqlite"),
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Unavailable(e.into()))
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// The database's clock, ms since the epoch.
    ///
    /// # Errors
    ///
    /// When the database is unreachable.
    pub async fn now(&self) -> Result<i64, StoreError> {
        let row = sqlx::query(self.dialect.sql("SELECT {now} AS now"))
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("now")?)
    }

    pub(crate) async fn begin(&self) -> Result<Transaction<'static, sqlx::Any>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// Reads an item's row under a row lock, with the database time read once the lock is held
    /// (a decision that waited for the row must not judge expiry by the time it started
    /// waiting).
    async fn current(
        &self,
        tx: &mut Transaction<'static, sqlx::Any>,
        team: &str,
        item: &str,
    ) -> Result<(Option<Current>, i64), StoreError> {
        let sql = match self.dialect {
            // The outer projection, and so the clock, is evaluated on rows the materialized
            // (locking) CTE produced, after any wait for the row lock.
            Dialect::Postgres => self.dialect.sql("WITH cur AS MATERIALIZED (SELECT {columns} FROM locks WHERE team = $1 AND item = $2 FOR UPDATE) \
                 SELECT cur.*, {now} AS now FROM cur"),
            // One connection: nothing is waited for inside a transaction.
            Dialect::Sqlite => self.dialect.sql("SELECT {columns}, {now} AS now FROM locks WHERE team = $1 AND item = $2"),
        };
        match sqlx::query(sql)
            .bind(team)
            .bind(item)
            .fetch_optional(&mut **tx)
            .await?
        {
            Some(row) => {
                let now: i64 = row.try_get("now")?;
                let state: String = row.try_get("state")?;
                let announced: i64 = row.try_get("expiry_announced")?;
                Ok((
                    Some(Current {
                        lock: lock_from(&row)?,
                        released: state != "held",
                        released_by_holder: state == "released",
                        expiry_announced: announced != 0,
                        now,
                    }),
                    now,
                ))
            }
            None => {
                let row = sqlx::query(self.dialect.sql("SELECT {now} AS now"))
                    .fetch_one(&mut **tx)
                    .await?;
                Ok((None, row.try_get("now")?))
            }
        }
    }

    /// Writes an event into the outbox, one row per topic, claimed by the caller for the
    /// lease.
    async fn event(
        &self,
        tx: &mut Transaction<'static, sqlx::Any>,
        now: i64,
        event: LockEvent<'_>,
    ) -> Result<(), StoreError> {
        let data = event.data();
        let key = event.lock_key();
        for topic in event.topics() {
            sqlx::query(self.dialect.sql(
                "INSERT INTO lock_events (topic, event_type, data, claimed_until, lock_key) VALUES ($1, $2, $3, $4, $5)",
            ))
            .bind(topic)
            .bind(event.event_type())
            .bind(&data)
            .bind(now + self.event_lease_ms)
            .bind(&key)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Every outbox row of the locks `keys` (`{team}/{item}`), in id order: what a decision
    /// publishes. Rows of earlier decisions still there (their node has not published them
    /// yet) go first, so an item's events reach the broker in commit order; the broker drops
    /// the late copy by version.
    async fn outbox_of(
        &self,
        tx: &mut Transaction<'static, sqlx::Any>,
        keys: &[String],
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut keys: Vec<&String> = keys.iter().collect();
        keys.sort();
        keys.dedup();
        let sql = self.dialect.sql(
            "SELECT id, topic, event_type, data FROM lock_events WHERE lock_key = $1 ORDER BY id",
        );
        let mut events = Vec::new();
        for key in keys {
            let rows = sqlx::query(sql).bind(key).fetch_all(&mut **tx).await?;
            for row in &rows {
                events.push(stored_event(row, OUTBOX_COLUMNS)?);
            }
        }
        events.sort_by_key(|e| e.id);
        Ok(events)
    }

    /// Grants `item` to `holder` for `ttl_ms`, or says who holds it.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails; nothing was written.
    pub async fn acquire(
        &self,
        team: &str,
        item: &str,
        holder: &str,
        session: Option<Bound<'_>>,
        ttl_ms: i64,
    ) -> Result<Acquired, StoreError> {
        if self.dialect == Dialect::Postgres {
            let answer = self
                .acquire_pg(&self.pool, team, item, holder, session, ttl_ms)
                .await?;
            return answer.acquired();
        }
        // A first grant races other first grants on the INSERT; the loser retries and then
        // finds the row to lock. (SQLite's one connection never races; the loop costs nothing.)
        for _ in 0..3 {
            let mut tx = self.begin().await?;
            if !self.session_node_alive(&mut tx, session).await? {
                return Ok(Acquired::SessionGone);
            }
            let mut touched = Vec::new();
            match self
                .grant(&mut tx, team, item, holder, session, ttl_ms, &mut touched)
                .await?
            {
                Grant::Granted { lock, extended } => {
                    let events = self.outbox_of(&mut tx, &touched).await?;
                    tx.commit().await?;
                    return Ok(Acquired::Granted {
                        lock,
                        extended,
                        events,
                    });
                }
                Grant::Held(held) => return Ok(Acquired::Held(held)),
                Grant::Raced => continue,
            }
        }
        Err(StoreError::Contended)
    }

    /// One acquire on PostgreSQL: one statement, `lockstep_acquire`, on the pool (its own
    /// commit) or inside a batch's transaction.
    async fn acquire_pg<'e, E>(
        &self,
        executor: E,
        team: &str,
        item: &str,
        holder: &str,
        session: Option<Bound<'_>>,
        ttl_ms: i64,
    ) -> Result<Answer, StoreError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let rows = sqlx::query("SELECT * FROM lockstep_acquire($1, $2, $3, $4, $5, $6, $7)")
            .bind(team)
            .bind(item)
            .bind(holder)
            .bind(session.map(|b| b.session))
            .bind(session.map(|b| b.node))
            .bind(ttl_ms)
            .bind(self.event_lease_ms)
            .fetch_all(executor)
            .await?;
        Answer::from_rows(&rows, team, item)
    }

    /// One release on PostgreSQL, `lockstep_release`.
    async fn release_pg<'e, E>(
        &self,
        executor: E,
        team: &str,
        item: &str,
        holder: &str,
        token: i64,
    ) -> Result<Answer, StoreError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let rows = sqlx::query("SELECT * FROM lockstep_release($1, $2, $3, $4, $5)")
            .bind(team)
            .bind(item)
            .bind(holder)
            .bind(token)
            .bind(self.event_lease_ms)
            .fetch_all(executor)
            .await?;
        Answer::from_rows(&rows, team, item)
    }

    /// Whether the node hosting `session` is registered (alive, or not yet found dead), once
    /// per granting transaction. Rows of `nodes` are only ever written by the nodes themselves:
    /// a session of a node the cluster took for dead is over, and binding a lock to it would
    /// leave the lock to its TTL. (A node that stalled and came back registers again and closes
    /// the sessions it had, so their ids are never good again either; see `node_heartbeat`.)
    async fn session_node_alive(
        &self,
        tx: &mut Transaction<'static, sqlx::Any>,
        session: Option<Bound<'_>>,
    ) -> Result<bool, StoreError> {
        let Some(bound) = session else {
            return Ok(true);
        };
        let row = sqlx::query(
            self.dialect
                .sql("SELECT 1 AS alive FROM nodes WHERE node = $1"),
        )
        .bind(bound.node)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.is_some())
    }

    /// One grant inside a transaction.
    #[allow(clippy::too_many_arguments)]
    async fn grant(
        &self,
        tx: &mut Transaction<'static, sqlx::Any>,
        team: &str,
        item: &str,
        holder: &str,
        session: Option<Bound<'_>>,
        ttl_ms: i64,
        touched: &mut Vec<String>,
    ) -> Result<Grant, StoreError> {
        let (current, now) = self.current(tx, team, item).await?;
        let expires_at = now + ttl_ms;
        let lock = match current {
            None => {
                let sql = self.dialect.sql("INSERT INTO locks ({columns}, node) VALUES ($1, $2, $3, $4, 1, $5, $6, 'held', 0, $7) \
                     ON CONFLICT (team, item) DO NOTHING RETURNING token");
                let inserted = sqlx::query(sql)
                    .bind(team)
                    .bind(item)
                    .bind(holder)
                    .bind(session.map(|b| b.session))
                    .bind(now)
                    .bind(expires_at)
                    .bind(session.map(|b| b.node))
                    .fetch_optional(&mut **tx)
                    .await?;
                if inserted.is_none() {
                    return Ok(Grant::Raced);
                }
                let lock = LockState {
                    team: team.to_owned(),
                    item: item.to_owned(),
                    holder: holder.to_owned(),
                    session: session.map(|b| b.session.to_owned()),
                    token: 1,
                    acquired_at: now,
                    expires_at,
                };
                self.event(tx, now, LockEvent::Acquired(&lock)).await?;
                touched.push(LockEvent::Acquired(&lock).lock_key());
                lock
            }
            Some(c) if c.live() && c.lock.holder == holder => {
                // The holder asks again: extend, keep the token, move to the new session (a
                // request without one keeps the lock's session and node as they are).
                let node = session.map(|b| b.node);
                let session = session
                    .map(|b| b.session.to_owned())
                    .or(c.lock.session.clone());
                sqlx::query(self.dialect.sql(
                    "UPDATE locks SET expires_at = $1, session = $2, node = COALESCE($3, node) \
                     WHERE team = $4 AND item = $5",
                ))
                .bind(expires_at)
                .bind(session.as_deref())
                .bind(node)
                .bind(team)
                .bind(item)
                .execute(&mut **tx)
                .await?;
                return Ok(Grant::Granted {
                    lock: LockState {
                        expires_at,
                        session,
                        ..c.lock
                    },
                    extended: true,
                });
            }
            Some(c) if c.live() => return Ok(Grant::Held(c.lock)),
            Some(c) => {
                // Free: released, or expired. An expiry nobody announced yet is announced now,
                // before the new grant's event, so it is never lost or doubled.
                if !c.released && !c.expiry_announced {
                    self.event(tx, now, LockEvent::Expired(&c.lock)).await?;
                }
                let token = c.lock.token + 1;
                sqlx::query(self.dialect.sql(
                    "UPDATE locks SET holder = $1, session = $2, token = $3, acquired_at = $4, expires_at = $5, \
                     state = 'held', expiry_announced = 0, node = $8 WHERE team = $6 AND item = $7",
                ))
                .bind(holder)
                .bind(session.map(|b| b.session))
                .bind(token)
                .bind(now)
                .bind(expires_at)
                .bind(team)
                .bind(item)
                .bind(session.map(|b| b.node))
                .execute(&mut **tx)
                .await?;
                let lock = LockState {
                    team: team.to_owned(),
                    item: item.to_owned(),
                    holder: holder.to_owned(),
                    session: session.map(|b| b.session.to_owned()),
                    token,
                    acquired_at: now,
                    expires_at,
                };
                self.event(tx, now, LockEvent::Acquired(&lock)).await?;
                touched.push(LockEvent::Acquired(&lock).lock_key());
                lock
            }
        };
        Ok(Grant::Granted {
            lock,
            extended: false,
        })
    }

    /// Extends the caller's grant if `token` is still the live one.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails; nothing was written.
    pub async fn renew(
        &self,
        team: &str,
        item: &str,
        holder: &str,
        token: i64,
        ttl_ms: i64,
    ) -> Result<TokenCheck, StoreError> {
        if self.dialect == Dialect::Postgres {
            let rows = sqlx::query("SELECT * FROM lockstep_renew($1, $2, $3, $4, $5)")
                .bind(team)
                .bind(item)
                .bind(holder)
                .bind(token)
                .bind(ttl_ms)
                .fetch_all(&self.pool)
                .await?;
            return Answer::from_rows(&rows, team, item)?.token_check();
        }
        let mut tx = self.begin().await?;
        let (current, now) = self.current(&mut tx, team, item).await?;
        match current {
            Some(c) if c.live() && c.lock.token == token && c.lock.holder == holder => {
                let expires_at = now + ttl_ms;
                sqlx::query(
                    self.dialect
                        .sql("UPDATE locks SET expires_at = $1 WHERE team = $2 AND item = $3"),
                )
                .bind(expires_at)
                .bind(team)
                .bind(item)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(TokenCheck::Done {
                    lock: LockState {
                        expires_at,
                        ..c.lock
                    },
                    events: Vec::new(),
                })
            }
            Some(c) if c.live() && c.lock.holder != holder => Ok(TokenCheck::HeldByOther(c.lock)),
            _ => Ok(TokenCheck::Lost),
        }
    }

    /// Releases the caller's grant if `token` is still the live one. Releasing a grant that was
    /// already released with this token succeeds again (idempotent).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails; nothing was written.
    pub async fn release(
        &self,
        team: &str,
        item: &str,
        holder: &str,
        token: i64,
    ) -> Result<TokenCheck, StoreError> {
        if self.dialect == Dialect::Postgres {
            return self
                .release_pg(&self.pool, team, item, holder, token)
                .await?
                .token_check();
        }
        let mut tx = self.begin().await?;
        let mut touched = Vec::new();
        let outcome = self
            .release_in(&mut tx, team, item, holder, token, &mut touched)
            .await?;
        let events = self.outbox_of(&mut tx, &touched).await?;
        if matches!(outcome, TokenCheck::Done { .. }) {
            tx.commit().await?;
        }
        Ok(match outcome {
            TokenCheck::Done { lock, .. } => TokenCheck::Done { lock, events },
            other => other,
        })
    }

    /// One release inside a transaction (SQLite).
    async fn release_in(
        &self,
        tx: &mut Transaction<'static, sqlx::Any>,
        team: &str,
        item: &str,
        holder: &str,
        token: i64,
        touched: &mut Vec<String>,
    ) -> Result<TokenCheck, StoreError> {
        let (current, now) = self.current(tx, team, item).await?;
        match current {
            Some(c) if c.live() && c.lock.token == token && c.lock.holder == holder => {
                self.set_released(tx, team, item, now).await?;
                let event = LockEvent::Released {
                    lock: &c.lock,
                    reason: Reason::Released,
                    at: now,
                };
                self.event(tx, now, event).await?;
                touched.push(event.lock_key());
                Ok(TokenCheck::Done {
                    lock: LockState {
                        expires_at: now,
                        ..c.lock
                    },
                    events: Vec::new(),
                })
            }
            Some(c) if c.released_by_holder && c.lock.token == token && c.lock.holder == holder => {
                Ok(TokenCheck::Done {
                    lock: c.lock,
                    events: Vec::new(),
                })
            }
            Some(c) if c.live() && c.lock.holder != holder => Ok(TokenCheck::HeldByOther(c.lock)),
            _ => Ok(TokenCheck::Lost),
        }
    }

    async fn set_released(
        &self,
        tx: &mut Transaction<'static, sqlx::Any>,
        team: &str,
        item: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(self.dialect.sql(
            "UPDATE locks SET state = 'released', expires_at = $1 WHERE team = $2 AND item = $3",
        ))
        .bind(now)
        .bind(team)
        .bind(item)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Ends whoever's grant is live on `item` (an admin's takeover). `None` when none is.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails; nothing was written.
    pub async fn take_over(
        &self,
        team: &str,
        item: &str,
        admin: &str,
    ) -> Result<Option<(LockState, Vec<StoredEvent>)>, StoreError> {
        if self.dialect == Dialect::Postgres {
            let rows = sqlx::query("SELECT * FROM lockstep_take_over($1, $2, $3, $4)")
                .bind(team)
                .bind(item)
                .bind(admin)
                .bind(self.event_lease_ms)
                .fetch_all(&self.pool)
                .await?;
            let answer = Answer::from_rows(&rows, team, item)?;
            return match (answer.outcome.as_str(), answer.lock) {
                ("done", Some(lock)) => Ok(Some((lock, answer.events))),
                ("none", _) => Ok(None),
                (other, _) => Err(StoreError::unexpected(other)),
            };
        }
        let mut tx = self.begin().await?;
        let (current, now) = self.current(&mut tx, team, item).await?;
        let Some(c) = current.filter(Current::live) else {
            return Ok(None);
        };
        sqlx::query(self.dialect.sql(
            "UPDATE locks SET state = 'taken_over', expires_at = $1 WHERE team = $2 AND item = $3",
        ))
        .bind(now)
        .bind(team)
        .bind(item)
        .execute(&mut *tx)
        .await?;
        let event = LockEvent::TakenOver {
            lock: &c.lock,
            by: admin,
            at: now,
        };
        self.event(&mut tx, now, event).await?;
        let events = self.outbox_of(&mut tx, &[event.lock_key()]).await?;
        tx.commit().await?;
        Ok(Some((c.lock, events)))
    }

    /// The live grant on `item`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn get(&self, team: &str, item: &str) -> Result<Option<LockState>, StoreError> {
        let sql = self.dialect.sql("SELECT {columns} FROM locks WHERE team = $1 AND item = $2 AND state = 'held' AND expires_at > {now}");
        let row = sqlx::query(sql)
            .bind(team)
            .bind(item)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| lock_from(&r)).transpose()?)
    }

    /// Every live grant of `team`, by item.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn list(&self, team: &str) -> Result<Vec<LockState>, StoreError> {
        let sql = self.dialect.sql("SELECT {columns} FROM locks WHERE team = $1 AND state = 'held' AND expires_at > {now} ORDER BY item");
        let rows = sqlx::query(sql).bind(team).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(lock_from).collect::<Result<_, _>>()?)
    }

    /// The live locks among `items` of `team`, and the database's time they were judged live
    /// at, in one indexed read (what a write URL or a commit checks its token against).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn live(
        &self,
        team: &str,
        items: &[&str],
    ) -> Result<(Vec<LockState>, i64), StoreError> {
        let placeholders: Vec<String> = (0..items.len().max(1))
            .map(|i| format!("${}", i + 2))
            .collect();
        // The one-row subquery gives the time even when no lock matches.
        let sql = self.dialect.rewrite(&format!(
            "SELECT n.now AS now, {{columns}} FROM (SELECT {{now}} AS now) n LEFT JOIN locks \
             ON team = $1 AND item IN ({}) AND state = 'held' AND expires_at > n.now",
            placeholders.join(", ")
        ));
        let mut query = sqlx::query(&sql).bind(team);
        if items.is_empty() {
            query = query.bind("");
        }
        for item in items {
            query = query.bind(*item);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut now = 0;
        let mut live = Vec::with_capacity(rows.len());
        for row in &rows {
            now = row.try_get("now")?;
            if row.try_get::<Option<String>, _>("item")?.is_some() {
                live.push(lock_from(row)?);
            }
        }
        Ok((live, now))
    }

    /// Grants every item or none.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails; nothing was written.
    pub async fn acquire_batch(
        &self,
        team: &str,
        items: &[String],
        holder: &str,
        session: Option<Bound<'_>>,
        ttl_ms: i64,
    ) -> Result<BatchAcquired, StoreError> {
        // Rows are locked in one order on every node, so two batches cannot deadlock.
        let mut sorted: Vec<&String> = items.iter().collect();
        sorted.sort();
        sorted.dedup();
        'attempt: for _ in 0..3 {
            let mut tx = self.begin().await?;
            let mut events = Vec::new();
            let mut granted = Vec::new();
            let mut blocked = Vec::new();
            if self.dialect == Dialect::Postgres {
                // One statement per item in one transaction.
                for item in &sorted {
                    let answer = self
                        .acquire_pg(&mut *tx, team, item, holder, session, ttl_ms)
                        .await?;
                    match answer.acquired()? {
                        Acquired::Granted {
                            lock, events: mine, ..
                        } => {
                            granted.push(lock);
                            events.extend(mine);
                        }
                        Acquired::Held(held) => blocked.push(held),
                        Acquired::SessionGone => return Ok(BatchAcquired::SessionGone),
                    }
                }
            } else {
                if !self.session_node_alive(&mut tx, session).await? {
                    return Ok(BatchAcquired::SessionGone);
                }
                let mut touched = Vec::new();
                for item in &sorted {
                    match self
                        .grant(&mut tx, team, item, holder, session, ttl_ms, &mut touched)
                        .await?
                    {
                        Grant::Granted { lock, .. } => granted.push(lock),
                        Grant::Held(held) => blocked.push(held),
                        Grant::Raced => continue 'attempt,
                    }
                }
                events = self.outbox_of(&mut tx, &touched).await?;
            }
            if !blocked.is_empty() {
                // Dropping the transaction rolls back every grant made above.
                return Ok(BatchAcquired::Blocked(blocked));
            }
            tx.commit().await?;
            // Answer in request order.
            granted.sort_by_key(|l| items.iter().position(|i| *i == l.item));
            return Ok(BatchAcquired::Granted {
                locks: granted,
                events: in_id_order(events),
            });
        }
        Err(StoreError::Contended)
    }

    /// Releases several of the caller's grants in one transaction; reports each.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails; nothing was written.
    pub async fn release_batch(
        &self,
        team: &str,
        items: &[(String, i64)],
        holder: &str,
    ) -> Result<(Vec<(String, TokenCheck)>, Vec<StoredEvent>), StoreError> {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|a, b| items[*a].0.cmp(&items[*b].0));
        let mut tx = self.begin().await?;
        let mut events = Vec::new();
        let mut touched = Vec::new();
        let mut outcomes: Vec<Option<(String, TokenCheck)>> =
            (0..items.len()).map(|_| None).collect();
        for i in order {
            let (item, token) = &items[i];
            let outcome = if self.dialect == Dialect::Postgres {
                match self
                    .release_pg(&mut *tx, team, item, holder, *token)
                    .await?
                    .token_check()?
                {
                    TokenCheck::Done { lock, events: mine } => {
                        events.extend(mine);
                        TokenCheck::Done {
                            lock,
                            events: Vec::new(),
                        }
                    }
                    other => other,
                }
            } else {
                self.release_in(&mut tx, team, item, holder, *token, &mut touched)
                    .await?
            };
            outcomes[i] = Some((item.clone(), outcome));
        }
        events.extend(self.outbox_of(&mut tx, &touched).await?);
        tx.commit().await?;
        Ok((
            outcomes.into_iter().flatten().collect(),
            in_id_order(events),
        ))
    }

    /// Announces up to `limit` expiries nobody announced yet; each is claimed in the database,
    /// so with many nodes sweeping every expiry is announced once.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn sweep_expired(&self, limit: i64) -> Result<Vec<StoredEvent>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = self.dialect.sql("SELECT {columns}, {now} AS now FROM locks WHERE state = 'held' AND expiry_announced = 0 \
             AND expires_at <= {now} ORDER BY expires_at LIMIT $1{skip_locked}");
        let rows = sqlx::query(sql).bind(limit).fetch_all(&mut *tx).await?;
        let mut touched = Vec::new();
        for row in &rows {
            let lock = lock_from(row)?;
            let now: i64 = row.try_get("now")?;
            sqlx::query(self.dialect.sql("UPDATE locks SET expiry_announced = 1 WHERE team = $1 AND item = $2 AND token = $3"))
                .bind(&lock.team)
                .bind(&lock.item)
                .bind(lock.token)
                .execute(&mut *tx)
                .await?;
            let event = LockEvent::Expired(&lock);
            self.event(&mut tx, now, event).await?;
            touched.push(event.lock_key());
        }
        let events = self.outbox_of(&mut tx, &touched).await?;
        tx.commit().await?;
        Ok(events)
    }

    /// Records that a WebSocket session closed; its session-bound locks are released after
    /// `grace` unless re-acquired by then. Does nothing for sessions without locks.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn session_closed(&self, session: &str, grace_ms: i64) -> Result<(), StoreError> {
        let sql = self.dialect.sql(
            "INSERT INTO closed_sessions (session, release_at) SELECT $1, {now} + $2 \
             WHERE EXISTS (SELECT 1 FROM locks WHERE session = $3 AND state = 'held') \
             ON CONFLICT (session) DO NOTHING",
        );
        sqlx::query(sql)
            .bind(session)
            .bind(grace_ms)
            .bind(session)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Releases the locks of sessions whose grace has passed.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn release_closed_sessions(
        &self,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = self.dialect.sql("SELECT session, {now} AS now FROM closed_sessions WHERE release_at <= {now} ORDER BY release_at LIMIT $1{skip_locked}");
        let rows = sqlx::query(sql).bind(limit).fetch_all(&mut *tx).await?;
        let mut touched = Vec::new();
        for row in &rows {
            let session: String = row.try_get("session")?;
            let now: i64 = row.try_get("now")?;
            let held = sqlx::query(self.dialect.sql("SELECT {columns} FROM locks WHERE session = $1 AND state = 'held' AND expires_at > $2 ORDER BY team, item{for_update}"))
            .bind(&session)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            for lock in held.iter().map(lock_from) {
                let lock = lock?;
                self.set_released(&mut tx, &lock.team, &lock.item, now)
                    .await?;
                let event = LockEvent::Released {
                    lock: &lock,
                    reason: Reason::SessionClosed,
                    at: now,
                };
                self.event(&mut tx, now, event).await?;
                touched.push(event.lock_key());
            }
            sqlx::query(
                self.dialect
                    .sql("DELETE FROM closed_sessions WHERE session = $1"),
            )
            .bind(&session)
            .execute(&mut *tx)
            .await?;
        }
        let events = self.outbox_of(&mut tx, &touched).await?;
        tx.commit().await?;
        Ok(events)
    }

    /// Registers `node` as alive (the database's clock), on the heartbeat connection.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn register_node(&self, node: &str) -> Result<(), StoreError> {
        let sql = self.dialect.sql(
            "INSERT INTO nodes (node, seen_at) VALUES ($1, {now}) \
             ON CONFLICT (node) DO UPDATE SET seen_at = excluded.seen_at",
        );
        sqlx::query(sql).bind(node).execute(&self.heartbeat).await?;
        Ok(())
    }

    /// Stamps `node`'s row, on the heartbeat connection (never queued behind requests or
    /// sweeps on the main pool). Returns `false` when the row is gone: the other nodes took
    /// this one for dead (it stalled for longer than the node timeout) and are releasing its
    /// sessions' locks, so it must close those sessions and register again.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn node_heartbeat(&self, node: &str) -> Result<bool, StoreError> {
        let sql = self
            .dialect
            .sql("UPDATE nodes SET seen_at = {now} WHERE node = $1");
        let done = sqlx::query(sql).bind(node).execute(&self.heartbeat).await?;
        Ok(done.rows_affected() > 0)
    }

    /// Sessions of `node` that hold live locks: the node checks them against the sessions it
    /// has open, so a lock bound to a session that closed unseen (before the grant committed,
    /// or when the close could not be recorded) is still released after the grace.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn node_sessions(&self, node: &str) -> Result<Vec<String>, StoreError> {
        let sql = self.dialect.sql(
            "SELECT DISTINCT session FROM locks WHERE node = $1 AND state = 'held' \
             AND session IS NOT NULL AND expires_at > {now}",
        );
        Ok(sqlx::query_scalar(sql)
            .bind(node)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Takes nodes silent for longer than `timeout_ms` for dead: every session-bound lock of a
    /// session they hosted (its `node` column names them exactly) is released `grace_ms` from
    /// now, as if the session had closed now. Returns the dead nodes.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn close_dead_nodes(
        &self,
        timeout_ms: i64,
        grace_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = self.dialect.sql("SELECT node FROM nodes WHERE seen_at < {now} - $1 ORDER BY node LIMIT 100{skip_locked}");
        let dead: Vec<String> = sqlx::query_scalar(sql)
            .bind(timeout_ms)
            .fetch_all(&mut *tx)
            .await?;
        for node in &dead {
            // An exact match: no pattern, no case folding, so no other node's sessions.
            sqlx::query(self.dialect.sql(
                "INSERT INTO closed_sessions (session, release_at) \
                 SELECT DISTINCT session, {now} + $1 FROM locks \
                 WHERE state = 'held' AND node = $2 AND session IS NOT NULL \
                 ON CONFLICT (session) DO NOTHING",
            ))
            .bind(grace_ms)
            .bind(node)
            .execute(&mut *tx)
            .await?;
            sqlx::query(self.dialect.sql("DELETE FROM nodes WHERE node = $1"))
                .bind(node)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(dead)
    }

    /// Claims outbox events whose claim lapsed (their node died before publishing them).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn claim_orphaned_events(&self, limit: i64) -> Result<Vec<StoredEvent>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = self.dialect.sql("SELECT id, topic, event_type, data, {now} AS now FROM lock_events WHERE claimed_until <= {now} ORDER BY id LIMIT $1{skip_locked}");
        let rows = sqlx::query(sql).bind(limit).fetch_all(&mut *tx).await?;
        let mut events = Vec::new();
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let now: i64 = row.try_get("now")?;
            sqlx::query(
                self.dialect
                    .sql("UPDATE lock_events SET claimed_until = $1 WHERE id = $2"),
            )
            .bind(now + self.event_lease_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            events.push(stored_event(row, OUTBOX_COLUMNS)?);
        }
        tx.commit().await?;
        Ok(events)
    }

    /// Deletes published events.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn delete_events(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = ids.iter().map(i64::to_string).collect();
        let list = list.join(",");
        // Ids are integers we produced, never user input, so inlining them is safe.
        let delete = format!("DELETE FROM lock_events WHERE id IN ({list})");
        let Some(forward) = &self.forward else {
            sqlx::query(&delete).execute(&self.pool).await?;
            return Ok(());
        };
        // The rows this statement deleted, and only those: the same ids may be deleted
        // concurrently (the batch deleter, a later decision of the item, a sweeper), and each
        // event must enter the webhook queue once.
        let mut tx = self.begin().await?;
        let sql = self.dialect.rewrite(&format!(
            "{delete} RETURNING id, topic, event_type, data, {{now}} AS now"
        ));
        let rows = sqlx::query(&sql).fetch_all(&mut *tx).await?;
        let mut deleted = Vec::with_capacity(rows.len());
        for row in &rows {
            let now: i64 = row.try_get("now")?;
            deleted.push((stored_event(row, OUTBOX_COLUMNS)?, now));
        }
        deleted.sort_by_key(|(e, _)| e.id);
        let events: Vec<String> = deleted
            .iter()
            .filter(|(e, _)| forward.filter.matches(&e.event_type))
            .map(|(e, now)| crate::webhooks::event_json(&e.event_type, &e.topic, *now, &e.data))
            .collect();
        if !events.is_empty() {
            crate::webhooks::queue::enqueue(
                &mut tx,
                self.dialect,
                &forward.endpoints,
                &events,
                forward.batch,
            )
            .await?;
        }
        tx.commit().await?;
        if !events.is_empty() {
            forward.queued(events.len());
        }
        Ok(())
    }
}

/// Events of several decisions, each once, in id order.
fn in_id_order(mut events: Vec<StoredEvent>) -> Vec<StoredEvent> {
    events.sort_by_key(|e| e.id);
    events.dedup_by_key(|e| e.id);
    events
}

/// The columns an outbox row is read from: `lock_events`' own, or a decision function's.
const OUTBOX_COLUMNS: [&str; 4] = ["id", "topic", "event_type", "data"];
const ANSWER_COLUMNS: [&str; 4] = ["event_id", "event_topic", "event_type", "event_data"];

fn stored_event(
    row: &AnyRow,
    [id, topic, event_type, data]: [&str; 4],
) -> Result<StoredEvent, sqlx::Error> {
    Ok(StoredEvent {
        id: row.try_get(id)?,
        topic: row.try_get(topic)?,
        event_type: row.try_get(event_type)?,
        data: row.try_get(data)?,
    })
}

/// What a PostgreSQL decision function answered (see `0004_lock_decisions.sql`): its outcome,
/// the lock it is about, and the item's outbox rows to publish.
struct Answer {
    outcome: String,
    lock: Option<LockState>,
    events: Vec<StoredEvent>,
}

impl Answer {
    fn from_rows(rows: &[AnyRow], team: &str, item: &str) -> Result<Answer, StoreError> {
        let first = rows
            .first()
            .ok_or_else(|| StoreError::unexpected("no row"))?;
        let outcome: String = first.try_get("outcome")?;
        let lock = match first.try_get::<Option<i64>, _>("token")? {
            Some(token) => Some(LockState {
                team: team.to_owned(),
                item: item.to_owned(),
                holder: first.try_get("holder")?,
                session: first.try_get("session")?,
                token,
                acquired_at: first.try_get("acquired_at")?,
                expires_at: first.try_get("expires_at")?,
            }),
            None => None,
        };
        let mut events = Vec::new();
        for row in rows {
            if row.try_get::<Option<i64>, _>("event_id")?.is_some() {
                events.push(stored_event(row, ANSWER_COLUMNS)?);
            }
        }
        Ok(Answer {
            outcome,
            lock,
            events,
        })
    }

    fn acquired(self) -> Result<Acquired, StoreError> {
        match (self.outcome.as_str(), self.lock) {
            ("granted", Some(lock)) => Ok(Acquired::Granted {
                lock,
                extended: false,
                events: self.events,
            }),
            ("extended", Some(lock)) => Ok(Acquired::Granted {
                lock,
                extended: true,
                events: self.events,
            }),
            ("held", Some(lock)) => Ok(Acquired::Held(lock)),
            ("session_gone", _) => Ok(Acquired::SessionGone),
            (other, _) => Err(StoreError::unexpected(other)),
        }
    }

    fn token_check(self) -> Result<TokenCheck, StoreError> {
        match (self.outcome.as_str(), self.lock) {
            ("done", Some(lock)) => Ok(TokenCheck::Done {
                lock,
                events: self.events,
            }),
            ("held", Some(lock)) => Ok(TokenCheck::HeldByOther(lock)),
            ("lost", _) => Ok(TokenCheck::Lost),
            (other, _) => Err(StoreError::unexpected(other)),
        }
    }
}
