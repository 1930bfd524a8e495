//! The control plane (DESIGN §15): the platform acts on a user's connections on every node at
//! once, and the act holds on a node that missed the message.
//!
//! A call does two things. It keeps a [`Revocation`] in the broker, for as long as the tokens
//! it covers can live (`control.revocation_ttl`), which every node checks on `CONNECT`,
//! `SUBSCRIBE` and token refresh; and it broadcasts a control message (`Message`), on which
//! every node acts on the connections it has now: closes them with 4011, or ends their
//! subscriptions to a topic with a final `lockstep.unsubscribed`. The broadcast is pub/sub, so it can be lost (most
//! likely while a node is reconnecting to Redis); a node that reconnects reads the revocations
//! of every user connected to it and applies them, so what it missed meanwhile still ends.
//!
//! A revocation covers tokens *issued* at or before its cutoff (their `iat`, else `nbf`; a
//! token that says neither is covered), so the platform's next token works at once: a member
//! put back on a team gets a token issued after the call.
//!
//! The call answers once the second of its cutoff is over, so every token minted after the
//! answer is issued later and accepted. Sessions also check their `SEND`s against the
//! revocations they read, and the API checks publishing and topic reads through
//! [`Hub::is_revoked`] (cached for a second per user).
//!
//! `GET /users/{id}/connections` is a survey: the asking node broadcasts a `Message::List`,
//! every node answers with the user's connections it holds, and the answer is complete when
//! every node known to be alive answered. Nodes know each other from a `Message::Node` each
//! broadcasts every [`NODE_INTERVAL`] (as Centrifuge's nodes do).

use crate::broker::BrokerError;
use crate::{Hub, metrics};
use dashmap::DashMap;
use protocol::Disconnect;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, warn};

/// How often a node says it is alive.
pub const NODE_INTERVAL: Duration = Duration::from_secs(1);

/// A node not heard from for this long is taken as gone (surveys stop waiting for it).
const NODE_SILENCE: Duration = Duration::from_millis(3500);

/// Longest a survey waits for the nodes' answers.
pub const SURVEY_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the API's view of a user's revocations may be: DESIGN §15's "within a second".
const CACHE_FOR: Duration = Duration::from_secs(1);

/// Most users whose revocations the API keeps at once.
const MAX_CACHED: usize = 10_000;

/// Most surveys of one node in flight; more are refused as overloaded.
const MAX_SURVEYS: usize = 256;

/// A revocation of a user's tokens, kept by the broker until `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// `None`: every connection (`disconnect`); else a topic (a team topic covers its item
    /// topics).
    pub topic: Option<String>,
    /// Tokens issued at or before this second (Unix time) are refused.
    pub cutoff: u64,
    /// When it lapses (Unix seconds): by then every token it covers has expired.
    pub until: u64,
}

impl Revocation {
    /// Whether it covers a token issued at `issued_at`, whatever for.
    pub fn covers_token(&self, issued_at: Option<u64>) -> bool {
        issued_at.is_none_or(|at| at <= self.cutoff)
    }

    /// Whether it refuses a token issued at `issued_at` for `topic` (`None`: connecting).
    pub fn covers(&self, topic: Option<&str>, issued_at: Option<u64>) -> bool {
        self.covers_token(issued_at)
            && match (&self.topic, topic) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(revoked), Some(topic)) => covers_topic(revoked, topic),
            }
    }
}

/// Whether ending `revoked` ends `topic`: the same topic, or an item topic of a revoked team
/// topic (a member removed from a team leaves its items too).
pub(crate) fn covers_topic(revoked: &str, topic: &str) -> bool {
    topic == revoked
        || (revoked.starts_with("/team/")
            && revoked.matches('/').count() == 2
            && topic
                .strip_prefix(revoked)
                .is_some_and(|rest| rest.starts_with("/items/")))
}

/// What nodes tell each other on the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Message {
    /// Close the user's connections whose tokens were issued at or before `cutoff`.
    Disconnect { user: String, cutoff: u64 },
    /// End those connections' subscriptions to `topic` (and, for a team, its items).
    Unsubscribe {
        user: String,
        topic: String,
        cutoff: u64,
    },
    /// The sender is alive.
    Node { node: String },
    /// Survey `id` from node `from`: list `user`'s connections.
    List {
        id: String,
        from: String,
        user: String,
    },
    /// A node's answer to survey `id`.
    Listed {
        id: String,
        to: String,
        node: String,
        connections: Vec<ConnectionInfo>,
    },
}

/// One connection of a user, as the control API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub node: String,
    pub session: String,
    /// When it connected, Unix milliseconds.
    pub since_ms: u64,
    /// Topics it subscribes to, sorted.
    pub topics: Vec<String>,
}

/// A user's connections across the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connections {
    /// Sorted by node, then session.
    pub connections: Vec<ConnectionInfo>,
    /// Nodes that answered, and nodes known to be alive that did not in time.
    pub answered: usize,
    pub missing: Vec<String>,
}

/// The node's side of the control plane: who else is alive, and the surveys in flight.
#[derive(Debug)]
pub(crate) struct Control {
    /// Node id → when it was last heard from.
    nodes: DashMap<String, Instant>,
    /// When this node last heard its own announcement: the control channel works both ways.
    /// A `parking_lot` mutex held for a store or a read.
    heard_self: parking_lot::Mutex<Instant>,
    /// User → their revocations and when they were read: what the API checks its requests
    /// against, at most [`CACHE_FOR`] old (dropped when a control message for the user
    /// arrives; cleared whole past [`MAX_CACHED`] users).
    cached: DashMap<String, (Instant, Arc<Vec<Revocation>>)>,
    /// Survey id → where its answers go.
    surveys: DashMap<String, mpsc::Sender<(String, Vec<ConnectionInfo>)>>,
}

impl Default for Control {
    fn default() -> Control {
        Control {
            nodes: DashMap::new(),
            // A grace of one silence at start, before the first announcement came back.
            heard_self: parking_lot::Mutex::new(Instant::now()),
            cached: DashMap::new(),
            surveys: DashMap::new(),
        }
    }
}

impl Control {
    /// Nodes heard from recently, this one included.
    fn alive(&self, me: &str) -> Vec<String> {
        let now = Instant::now();
        self.nodes
            .retain(|_, seen| now.duration_since(*seen) < NODE_SILENCE);
        let mut nodes: Vec<String> = self.nodes.iter().map(|e| e.key().clone()).collect();
        if !nodes.iter().any(|n| n == me) {
            nodes.push(me.to_owned());
        }
        nodes.sort();
        nodes
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Hub {
    /// Closes every connection of `user` on every node with 4011, and refuses the tokens it
    /// had (issued up to now) on `CONNECT` from now on.
    ///
    /// # Errors
    ///
    /// When the broker cannot keep the revocation (nothing was done then) or the broadcast
    /// fails after it was kept (nodes still enforce it on `CONNECT`, `SUBSCRIBE` and after a
    /// reconnect, but connections open now stay until then).
    pub async fn disconnect_user(&self, user: &str) -> Result<Revocation, BrokerError> {
        self.revoke(user, None).await
    }

    /// Ends `user`'s subscriptions to `topic` (a team topic: and its item topics) on every
    /// node, each with a final `lockstep.unsubscribed`, and refuses re-subscribing with the
    /// tokens the user had.
    ///
    /// # Errors
    ///
    /// As [`Hub::disconnect_user`].
    pub async fn unsubscribe_user(
        &self,
        user: &str,
        topic: &protocol::Topic,
    ) -> Result<Revocation, BrokerError> {
        self.revoke(user, Some(topic.as_str())).await
    }

    async fn revoke(&self, user: &str, topic: Option<&str>) -> Result<Revocation, BrokerError> {
        let now = unix_now();
        let ttl = self.inner.config.revocation_ttl.as_secs().max(1);
        let revocation = Revocation {
            topic: topic.map(str::to_owned),
            cutoff: now,
            until: now.saturating_add(ttl),
        };
        let broker = &self.inner.broker;
        broker.revoke(user, &revocation).await?;
        let (message, kind) = match topic {
            None => (
                Message::Disconnect {
                    user: user.to_owned(),
                    cutoff: now,
                },
                "disconnect",
            ),
            Some(topic) => (
                Message::Unsubscribe {
                    user: user.to_owned(),
                    topic: topic.to_owned(),
                    cutoff: now,
                },
                "unsubscribe",
            ),
        };
        ::metrics::counter!(metrics::CONTROL_CALLS, "op" => kind).increment(1);
        self.broadcast(&message).await?;
        // Tokens issued in the call's own second are covered (`iat` has whole seconds): answer
        // once that second is over, so every token the platform mints after the answer is
        // issued later and accepted. The nodes act on the broadcast meanwhile.
        let next_second = UNIX_EPOCH + Duration::from_secs(now + 1);
        if let Ok(wait) = next_second.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        Ok(revocation)
    }

    async fn broadcast(&self, message: &Message) -> Result<(), BrokerError> {
        let text = serde_json::to_string(message).expect("control messages serialize");
        self.inner.broker.control(&text).await
    }

    /// `user`'s connections on every node that answers within [`SURVEY_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// When the survey cannot be sent, or too many are in flight.
    pub async fn user_connections(&self, user: &str) -> Result<Connections, BrokerError> {
        let control = &self.inner.control;
        if control.surveys.len() >= MAX_SURVEYS {
            return Err(BrokerError::Overloaded);
        }
        let me = self.inner.config.node_id.clone();
        let mut waiting = control.alive(&me);
        let id = self.new_id();
        // One answer per node; a node answering twice (a duplicate delivery) cannot block it.
        let (tx, mut rx) = mpsc::channel(waiting.len() + 4);
        control.surveys.insert(id.clone(), tx);
        // Removed however this future ends, so an abandoned request leaves nothing behind.
        let _guard = SurveyGuard {
            control,
            id: id.clone(),
        };
        self.broadcast(&Message::List {
            id: id.clone(),
            from: me,
            user: user.to_owned(),
        })
        .await?;
        let mut found = Vec::new();
        let mut answered = 0;
        let deadline = tokio::time::Instant::now() + SURVEY_TIMEOUT;
        while !waiting.is_empty() {
            let Ok(Some((node, connections))) = tokio::time::timeout_at(deadline, rx.recv()).await
            else {
                break;
            };
            // A node that started after the survey began is counted too.
            if let Some(i) = waiting.iter().position(|n| *n == node) {
                waiting.remove(i);
            }
            answered += 1;
            found.extend(connections);
        }
        found.sort_by(|a, b| (&a.node, &a.session).cmp(&(&b.node, &b.session)));
        Ok(Connections {
            connections: found,
            answered,
            missing: waiting,
        })
    }

    /// Whether this node hears the control channel: its own announcement came back recently.
    /// A node that does not misses disconnects and unsubscribes (it still enforces them on
    /// `CONNECT` and `SUBSCRIBE`); `/readyz` says so.
    pub fn control_in_step(&self) -> bool {
        self.inner.control.heard_self.lock().elapsed() < NODE_SILENCE
    }

    /// A control message arrived from the broker.
    pub(crate) fn on_control(&self, text: &str) {
        let message = match serde_json::from_str::<Message>(text) {
            Ok(message) => message,
            Err(err) => {
                warn!(%err, "ignoring a control message that does not parse");
                return;
            }
        };
        let inner = &self.inner;
        if let Message::Disconnect { user, .. } | Message::Unsubscribe { user, .. } = &message {
            inner.control.cached.remove(user);
        }
        match message {
            Message::Disconnect { user, cutoff } => {
                let revocation = Revocation {
                    topic: None,
                    cutoff,
                    until: u64::MAX,
                };
                self.apply(&user, &[revocation]);
            }
            Message::Unsubscribe {
                user,
                topic,
                cutoff,
            } => {
                let revocation = Revocation {
                    topic: Some(topic),
                    cutoff,
                    until: u64::MAX,
                };
                self.apply(&user, &[revocation]);
            }
            Message::Node { node } => {
                if node == inner.config.node_id {
                    *inner.control.heard_self.lock() = Instant::now();
                }
                inner.control.nodes.insert(node, Instant::now());
            }
            Message::List { id, from, user } => {
                let node = inner.config.node_id.clone();
                let connections = inner.connections.describe(&user, &node);
                let hub = self.clone();
                tokio::spawn(
                    async move {
                        let answer = Message::Listed {
                            id,
                            to: from,
                            node,
                            connections,
                        };
                        if let Err(err) = hub.broadcast(&answer).await {
                            debug!(%err, "could not answer a connections survey");
                        }
                    }
                    .instrument(tracing::debug_span!("control.survey_answer")),
                );
            }
            Message::Listed {
                id,
                to,
                node,
                connections,
            } => {
                if to != inner.config.node_id {
                    return;
                }
                inner.control.nodes.insert(node.clone(), Instant::now());
                if let Some(tx) = inner.control.surveys.get(&id) {
                    let _ = tx.try_send((node, connections));
                }
            }
        }
    }

    /// Applies revocations of `user`'s tokens to the user's connections here: those they cover
    /// close (4011) or end the covered subscriptions.
    pub(crate) fn apply(&self, user: &str, revocations: &[Revocation]) {
        let connections = &self.inner.connections;
        for handle in connections.handles_of(user) {
            let issued_at = handle.issued_at();
            for revocation in revocations {
                if !revocation.covers_token(issued_at) {
                    continue;
                }
                match &revocation.topic {
                    None => {
                        ::metrics::counter!(metrics::CONTROL_APPLIED, "op" => "disconnect")
                            .increment(1);
                        handle.close(Disconnect::REMOVED);
                    }
                    Some(_) => {
                        ::metrics::counter!(metrics::CONTROL_APPLIED, "op" => "unsubscribe")
                            .increment(1);
                        handle.end_topic(revocation.clone());
                    }
                }
            }
        }
    }

    /// Says this node is alive every [`NODE_INTERVAL`], and after every broker reconnection
    /// (when broadcasts may have been lost) applies the revocations of every user connected
    /// here.
    pub(crate) fn spawn_control(&self) {
        let hub = self.clone();
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(
            async move {
                let mut ticker = tokio::time::interval(NODE_INTERVAL);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let node = Message::Node {
                    node: hub.inner.config.node_id.clone(),
                };
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        _ = ticker.tick() => {}
                    }
                    if let Err(err) = hub.broadcast(&node).await {
                        debug!(%err, "could not say this node is alive");
                    }
                }
            }
            .instrument(tracing::info_span!("control.announce")),
        );
        let Some(mut epoch) = self.inner.broker.connection_epoch() else {
            return;
        };
        let hub = self.clone();
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        changed = epoch.changed() => if changed.is_err() { return },
                    }
                    // Wait until the broker is back before reading.
                    while !hub.inner.broker.is_ready() {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                    hub.recheck_all().await;
                }
            }
            .instrument(tracing::info_span!("control.recheck")),
        );
    }

    /// Reads the revocations of every user connected here and applies them.
    async fn recheck_all(&self) {
        use futures_util::StreamExt as _;
        let users = self.inner.connections.users();
        let checked = futures_util::stream::iter(users)
            .map(|user| async move {
                match self.inner.broker.revocations(&user).await {
                    Ok(revocations) => self.apply(&user, &revocations),
                    Err(err) => debug!(%err, user = %user, "could not read revocations"),
                }
            })
            .buffer_unordered(32)
            .count()
            .await;
        debug!(
            users = checked,
            "revocations rechecked after a broker reconnection"
        );
    }

    /// `user`'s revocations in force, read from the broker (the check of every `CONNECT`,
    /// `SUBSCRIBE` and refresh: one read, timed).
    pub(crate) async fn revocations_of(&self, user: &str) -> Result<Vec<Revocation>, BrokerError> {
        let started = Instant::now();
        let read = tokio::time::timeout(
            crate::broker::HISTORY_TIMEOUT,
            self.inner.broker.revocations(user),
        )
        .await
        .map_err(|_| BrokerError::Unavailable("revocation read timed out".to_owned()))??;
        self.inner
            .metrics
            .revocation_check_seconds
            .record(started.elapsed());
        Ok(read)
    }

    /// Whether one of `user`'s revocations refuses a token issued at `issued_at` for `topic`
    /// (the API's check before it publishes to or reads a topic).
    ///
    /// # Errors
    ///
    /// When the broker cannot be read.
    ///
    /// The user's revocations are read at most once a second per node (and again at once
    /// when a control message for the user arrives), so the check costs the API's hot paths
    /// (publishing) little.
    pub async fn is_revoked(
        &self,
        user: &str,
        topic: &protocol::Topic,
        issued_at: Option<u64>,
    ) -> Result<bool, BrokerError> {
        let cached = &self.inner.control.cached;
        let fresh = cached
            .get(user)
            .filter(|e| e.0.elapsed() < CACHE_FOR)
            .map(|e| e.1.clone());
        let revocations = match fresh {
            Some(revocations) => revocations,
            None => {
                let read = Arc::new(self.revocations_of(user).await?);
                if cached.len() >= MAX_CACHED {
                    cached.clear();
                }
                cached.insert(user.to_owned(), (Instant::now(), read.clone()));
                read
            }
        };
        Ok(revocations
            .iter()
            .any(|r| r.covers(Some(topic.as_str()), issued_at)))
    }
}

/// Removes a survey's entry when its request ends.
struct SurveyGuard<'a> {
    control: &'a Control,
    id: String,
}

impl Drop for SurveyGuard<'_> {
    fn drop(&mut self) {
        self.control.surveys.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_team_revocation_covers_its_items_and_nothing_else() {
        assert!(covers_topic("/team/t1", "/team/t1"));
        assert!(covers_topic("/team/t1", "/team/t1/items/doc-1"));
        assert!(!covers_topic("/team/t1", "/team/t10"));
        assert!(!covers_topic("/team/t1", "/team/t10/items/doc-1"));
        assert!(!covers_topic("/team/t1/items/doc-1", "/team/t1"));
        assert!(covers_topic("/team/t1/items/doc-1", "/team/t1/items/doc-1"));
        assert!(!covers_topic("/user/ana", "/user/ana2"));
    }

    #[test]
    fn tokens_issued_later_are_not_covered() {
        let r = Revocation {
            topic: Some("/team/t1".into()),
            cutoff: 1000,
            until: 5000,
        };
        assert!(r.covers(Some("/team/t1"), Some(999)));
        assert!(r.covers(Some("/team/t1"), Some(1000)), "same second");
        assert!(r.covers(Some("/team/t1"), None), "no iat: taken as old");
        assert!(!r.covers(Some("/team/t1"), Some(1001)));
        assert!(
            !r.covers(None, Some(999)),
            "a topic revocation lets it connect"
        );
        let all = Revocation { topic: None, ..r };
        assert!(all.covers(None, Some(999)) && all.covers(Some("/global"), Some(999)));
    }

    #[test]
    fn messages_keep_their_wire_form() {
        let m = Message::Unsubscribe {
            user: "ana".into(),
            topic: "/team/t1".into(),
            cutoff: 7,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"op":"unsubscribe","user":"ana","topic":"/team/t1","cutoff":7}"#
        );
        assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), m);
    }
}
