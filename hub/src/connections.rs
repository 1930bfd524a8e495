//! The node's table of connections: who is connected, with which session, to which topics,
//! and a way to tell a session to end.
//!
//! It is indexed by session, by user (a user's connections on this node) and by topic (the
//! users subscribed to it here, with how many of their connections and since when): the
//! per-node half of presence (DESIGN §14), and what the control API and the console read.
//!
//! Sessions stay the only writers of their sockets: the table never touches one. It holds a
//! small handle per connection that anything on the node (the lock service's liveness checks,
//! a node that finds it was taken for dead, later the control API) can read, and through which
//! it can ask a session to close; the session notices at its next turn and closes itself.
//!
//! It also admits connections that have not sent `CONNECT` yet. Those are counted apart from
//! the authenticated ones, in a small pool: when the pool is full, the oldest waiting
//! connection is closed to make room, so a flood of silent or half-open upgrades can neither
//! take the slots of real clients nor keep a real client from connecting (a real client sends
//! `CONNECT` within a round trip and is out of the pool long before it would be evicted).

use crate::control::{ConnectionInfo, Revocation};
use crate::registry::ConnId;
use dashmap::DashMap;
use parking_lot::Mutex;
use protocol::Disconnect;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::Notify;

/// One connection, as the rest of the node sees it.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    pub(crate) conn: ConnId,
    /// Set once `CONNECT` succeeded.
    pub(crate) user: parking_lot::RwLock<Option<Connected>>,
    /// A close asked of the session; taken by the session when it wakes. A `parking_lot`
    /// mutex, held for a store or a take.
    closing: Mutex<Option<Disconnect>>,
    /// Revocations of topics whose subscriptions the node asked the session to end (the
    /// control API); taken by the session when it wakes. One per topic (the latest cutoff),
    /// so bounded by the topics there are.
    ending: Mutex<Vec<Revocation>>,
    /// Wakes the session. A `Notify` keeps one permit, so a request made while the session is
    /// busy is seen at its next turn.
    wake: Notify,
    /// Topics this connection subscribes to, with how many of its subscriptions each.
    topics: Mutex<HashMap<Arc<str>, u32>>,
}

/// Who an authenticated connection is.
#[derive(Debug, Clone)]
pub(crate) struct Connected {
    pub(crate) session: Arc<str>,
    pub(crate) user: Arc<str>,
    /// When its current token was issued (it changes when the token is refreshed).
    pub(crate) issued_at: Option<u64>,
    pub(crate) since: SystemTime,
}

/// What the node asks of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Close(Disconnect),
    /// End the subscriptions to these revocations' topics (a team topic: and its items), if
    /// they still cover the session's token when it looks (it may have been refreshed since).
    End(Vec<Revocation>),
}

/// A user subscribed to a topic on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: Arc<str>,
    /// How many of the user's connections here subscribe to the topic.
    pub connections: u32,
    /// Since when (the first of those connections to subscribe).
    pub since: SystemTime,
}

/// What a subscription change did to its user's membership of the topic on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Membership {
    /// The user's first connection here subscribed to the topic.
    Joined,
    /// The user's last connection here left the topic.
    Left,
    Unchanged,
}

impl ConnHandle {
    /// Asks the session to close with `disconnect` (the first request wins).
    pub(crate) fn close(&self, disconnect: Disconnect) {
        let mut closing = self.closing.lock();
        if closing.is_none() {
            *closing = Some(disconnect);
        }
        drop(closing);
        self.wake.notify_one();
    }

    /// Asks the session to end its subscriptions to the revocation's topic.
    pub(crate) fn end_topic(&self, revocation: Revocation) {
        let mut ending = self.ending.lock();
        match ending.iter_mut().find(|r| r.topic == revocation.topic) {
            Some(known) if known.cutoff >= revocation.cutoff => {}
            Some(known) => *known = revocation,
            None => ending.push(revocation),
        }
        drop(ending);
        self.wake.notify_one();
    }

    /// Resolves when something was asked of the session: a close first, if one was.
    pub(crate) async fn next_request(&self) -> Request {
        loop {
            if let Some(disconnect) = *self.closing.lock() {
                return Request::Close(disconnect);
            }
            let ending = std::mem::take(&mut *self.ending.lock());
            if !ending.is_empty() {
                return Request::End(ending);
            }
            self.wake.notified().await;
        }
    }

    /// When the connection's token was issued (`None` before `CONNECT`, or when it says not).
    pub(crate) fn issued_at(&self) -> Option<u64> {
        self.user.read().as_ref().and_then(|c| c.issued_at)
    }

    /// The connection refreshed its token.
    pub(crate) fn refreshed(&self, issued_at: Option<u64>) {
        if let Some(c) = self.user.write().as_mut() {
            c.issued_at = issued_at;
        }
    }
}

/// Connections of this node.
#[derive(Debug)]
pub(crate) struct Connections {
    all: DashMap<ConnId, Arc<ConnHandle>>,
    /// Session id → connection, for authenticated connections.
    sessions: DashMap<Arc<str>, ConnId>,
    /// Connections waiting for `CONNECT`, oldest first, at most `max_pending`.
    pending: Mutex<VecDeque<ConnId>>,
    max_pending: usize,
    /// User → their authenticated connections here.
    users: DashMap<Arc<str>, Vec<ConnId>>,
    /// Topic → user → membership: who subscribes to the topic here. A topic without members
    /// has no entry.
    topics: DashMap<Arc<str>, Members>,
}

/// A topic's members here: user → (connections subscribed, since when).
type Members = HashMap<Arc<str>, (u32, SystemTime)>;

/// Why a session must close before it sent `CONNECT`.
pub(crate) const EVICTED: Disconnect = Disconnect::UNAUTHORIZED;

impl Connections {
    pub(crate) fn new(max_pending: usize) -> Connections {
        Connections {
            all: DashMap::new(),
            sessions: DashMap::new(),
            pending: Mutex::new(VecDeque::new()),
            max_pending: max_pending.max(1),
            users: DashMap::new(),
            topics: DashMap::new(),
        }
    }

    /// Admits a new, unauthenticated connection. When the waiting pool is full, its oldest
    /// member is asked to close.
    pub(crate) fn admit(&self, conn: ConnId) -> Arc<ConnHandle> {
        let handle = Arc::new(ConnHandle {
            conn,
            user: parking_lot::RwLock::new(None),
            closing: Mutex::new(None),
            ending: Mutex::new(Vec::new()),
            wake: Notify::new(),
            topics: Mutex::new(HashMap::new()),
        });
        self.all.insert(conn, handle.clone());
        let evicted = {
            let mut pending = self.pending.lock();
            let evicted = (pending.len() >= self.max_pending)
                .then(|| pending.pop_front())
                .flatten();
            pending.push_back(conn);
            evicted
        };
        if let Some(old) = evicted
            && let Some(handle) = self.all.get(&old)
        {
            metrics::counter!(crate::metrics::PENDING_EVICTED).increment(1);
            handle.close(EVICTED);
        }
        handle
    }

    /// Number of connections waiting for `CONNECT`.
    pub(crate) fn pending(&self) -> usize {
        self.pending.lock().len()
    }

    /// The connection sent a valid `CONNECT`: it leaves the waiting pool and is known by its
    /// session id from now on.
    pub(crate) fn authenticated(&self, handle: &ConnHandle, connected: Connected) {
        self.leave_pending(handle.conn);
        self.sessions.insert(connected.session.clone(), handle.conn);
        self.users
            .entry(connected.user.clone())
            .or_default()
            .push(handle.conn);
        *handle.user.write() = Some(connected);
    }

    /// The connection subscribed to `topic` (once more, if it already did).
    pub(crate) fn subscribed(&self, handle: &ConnHandle, topic: &str) -> Membership {
        let Some(user) = handle.user.read().as_ref().map(|c| c.user.clone()) else {
            return Membership::Unchanged;
        };
        let mut topics = handle.topics.lock();
        if let Some(count) = topics.get_mut(topic) {
            *count += 1;
            return Membership::Unchanged;
        }
        let topic: Arc<str> = topic.into();
        topics.insert(topic.clone(), 1);
        // Still under the connection's lock: its own subscribe and unsubscribe stay in order.
        let mut members = self.topics.entry(topic).or_default();
        let (connections, _) = members
            .entry(user)
            .or_insert_with(|| (0, SystemTime::now()));
        *connections += 1;
        if *connections == 1 {
            Membership::Joined
        } else {
            Membership::Unchanged
        }
    }

    /// One of the connection's subscriptions to `topic` ended.
    pub(crate) fn unsubscribed(&self, handle: &ConnHandle, topic: &str) -> Membership {
        let Some(user) = handle.user.read().as_ref().map(|c| c.user.clone()) else {
            return Membership::Unchanged;
        };
        let mut topics = handle.topics.lock();
        match topics.get_mut(topic) {
            Some(count) if *count > 1 => {
                *count -= 1;
                Membership::Unchanged
            }
            Some(_) => {
                topics.remove(topic);
                self.leave(topic, &user)
            }
            None => Membership::Unchanged,
        }
    }

    /// One connection of `user` no longer subscribes to `topic`.
    fn leave(&self, topic: &str, user: &Arc<str>) -> Membership {
        let mut left = Membership::Unchanged;
        self.topics.remove_if_mut(topic, |_, members| {
            if let Some((connections, _)) = members.get_mut(user) {
                *connections -= 1;
                if *connections == 0 {
                    members.remove(user);
                    left = Membership::Left;
                }
            }
            members.is_empty()
        });
        left
    }

    /// The users subscribed to `topic` on this node, in no particular order.
    pub(crate) fn members(&self, topic: &str) -> Vec<Member> {
        self.topics.get(topic).map_or_else(Vec::new, |members| {
            members
                .iter()
                .map(|(user, (connections, since))| Member {
                    user: user.clone(),
                    connections: *connections,
                    since: *since,
                })
                .collect()
        })
    }

    /// The user's membership of `topic` here: connections subscribed, and since when.
    pub(crate) fn member(&self, topic: &str, user: &str) -> Option<(u32, SystemTime)> {
        self.topics.get(topic)?.get(user).copied()
    }

    /// Every topic with presence (team and item topics) that has members here, with them.
    pub(crate) fn presence_members(&self) -> Vec<(Arc<str>, Vec<Member>)> {
        self.topics
            .iter()
            .filter(|entry| crate::presence::has_presence(entry.key()))
            .map(|entry| {
                let members = entry
                    .value()
                    .iter()
                    .map(|(user, (connections, since))| Member {
                        user: user.clone(),
                        connections: *connections,
                        since: *since,
                    })
                    .collect();
                (entry.key().clone(), members)
            })
            .collect()
    }

    /// How many distinct users are connected to this node.
    pub(crate) fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The connections `user` has on this node.
    pub(crate) fn handles_of(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        let Some(conns) = self.users.get(user) else {
            return Vec::new();
        };
        conns
            .iter()
            .filter_map(|conn| self.all.get(conn).map(|h| h.clone()))
            .collect()
    }

    /// Every user connected to this node.
    pub(crate) fn users(&self) -> Vec<Arc<str>> {
        self.users.iter().map(|e| e.key().clone()).collect()
    }

    /// `user`'s connections here, as the control API lists them.
    pub(crate) fn describe(&self, user: &str, node: &str) -> Vec<ConnectionInfo> {
        self.handles_of(user)
            .iter()
            .filter_map(|handle| {
                let (session, since) = handle
                    .user
                    .read()
                    .as_ref()
                    .map(|c| (c.session.to_string(), c.since))?;
                let mut topics: Vec<String> =
                    handle.topics.lock().keys().map(|t| t.to_string()).collect();
                topics.sort();
                Some(ConnectionInfo {
                    node: node.to_owned(),
                    session,
                    since_ms: since
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    topics,
                })
            })
            .collect()
    }

    /// The sessions `user` has open on this node.
    pub(crate) fn sessions_of(&self, user: &str) -> Vec<Arc<str>> {
        let Some(conns) = self.users.get(user) else {
            return Vec::new();
        };
        conns
            .iter()
            .filter_map(|conn| self.all.get(conn))
            .filter_map(|handle| handle.user.read().as_ref().map(|c| c.session.clone()))
            .collect()
    }

    fn leave_pending(&self, conn: ConnId) {
        let mut pending = self.pending.lock();
        // Usually near the back: connections authenticate in the order they arrived.
        if let Some(i) = pending.iter().rposition(|c| *c == conn) {
            pending.remove(i);
        }
    }

    /// The session ended: its subscriptions end with it. Returns the topics its user left.
    pub(crate) fn remove(&self, handle: &ConnHandle) -> Vec<Arc<str>> {
        self.leave_pending(handle.conn);
        let mut left = Vec::new();
        if let Some(connected) = handle.user.read().as_ref() {
            self.sessions.remove(&connected.session);
            for (topic, _) in handle.topics.lock().drain() {
                if self.leave(&topic, &connected.user) == Membership::Left {
                    left.push(topic);
                }
            }
            self.users.remove_if_mut(&connected.user, |_, conns| {
                conns.retain(|c| *c != handle.conn);
                conns.is_empty()
            });
        }
        self.all.remove(&handle.conn);
        left
    }

    /// Whether the session with this id is open on this node.
    pub(crate) fn is_open(&self, session: &str) -> bool {
        self.sessions.contains_key(session)
    }

    /// Asks every session to close.
    pub(crate) fn close_all(&self, disconnect: Disconnect) {
        for handle in &self.all {
            handle.close(disconnect);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_waiting_connection_makes_room() {
        let table = Connections::new(2);
        let a = table.admit(1);
        let b = table.admit(2);
        let c = table.admit(3);
        assert_eq!(table.pending(), 2);
        assert_eq!(*a.closing.lock(), Some(EVICTED));
        assert!(b.closing.lock().is_none() && c.closing.lock().is_none());
        // Authenticated connections leave the pool and are never evicted.
        table.authenticated(&b, connected("s-b", "bo"));
        let _d = table.admit(4);
        let _e = table.admit(5);
        assert!(b.closing.lock().is_none());
        assert_eq!(*c.closing.lock(), Some(EVICTED));
        assert!(table.is_open("s-b"));
        table.remove(&b);
        assert!(!table.is_open("s-b"));
    }

    fn connected(session: &str, user: &str) -> Connected {
        Connected {
            session: session.into(),
            user: user.into(),
            issued_at: Some(1),
            since: SystemTime::now(),
        }
    }

    #[test]
    fn members_are_users_with_connections_subscribed() {
        let table = Connections::new(10);
        let (a1, a2, b) = (table.admit(1), table.admit(2), table.admit(3));
        table.authenticated(&a1, connected("s-a1", "ana"));
        table.authenticated(&a2, connected("s-a2", "ana"));
        table.authenticated(&b, connected("s-b", "bo"));
        assert_eq!(table.user_count(), 2);
        let mut sessions = table.sessions_of("ana");
        sessions.sort();
        assert_eq!(sessions, [Arc::from("s-a1"), Arc::from("s-a2")]);

        let t = "/team/t1/items/doc-1";
        assert_eq!(table.subscribed(&a1, t), Membership::Joined);
        // A second subscription of the same connection, a second tab: no change.
        assert_eq!(table.subscribed(&a1, t), Membership::Unchanged);
        assert_eq!(table.subscribed(&a2, t), Membership::Unchanged);
        assert_eq!(table.subscribed(&b, t), Membership::Joined);
        let mut members = table.members(t);
        members.sort_by(|x, y| x.user.cmp(&y.user));
        let counts: Vec<_> = members.iter().map(|m| (&*m.user, m.connections)).collect();
        assert_eq!(counts, [("ana", 2), ("bo", 1)]);

        assert_eq!(table.unsubscribed(&a1, t), Membership::Unchanged);
        assert_eq!(table.unsubscribed(&a1, t), Membership::Unchanged);
        assert_eq!(table.unsubscribed(&a1, t), Membership::Unchanged, "unknown");
        assert_eq!(table.members(t).len(), 2);
        // Ana's last connection on the topic ends: she left; Bo's session ends: he left.
        assert_eq!(table.remove(&a2), vec![Arc::from(t)]);
        assert_eq!(table.remove(&b), vec![Arc::from(t)]);
        assert!(table.members(t).is_empty());
        assert!(
            table.topics.is_empty(),
            "no entry for a topic without members"
        );
        assert_eq!((table.user_count(), table.sessions_of("bo").len()), (1, 0));
        table.remove(&a1);
        assert_eq!(table.user_count(), 0);
    }

    #[tokio::test]
    async fn a_close_request_is_not_lost() {
        let table = Connections::new(10);
        let a = table.admit(1);
        // Asked before the session waits: the permit is kept.
        let revoked = |topic: &str, cutoff| Revocation {
            topic: Some(topic.to_owned()),
            cutoff,
            until: u64::MAX,
        };
        a.end_topic(revoked("/team/t1", 5));
        a.end_topic(revoked("/team/t1", 7));
        a.end_topic(revoked("/team/t1", 6));
        a.end_topic(revoked("/team/t2", 5));
        assert_eq!(
            a.next_request().await,
            Request::End(vec![revoked("/team/t1", 7), revoked("/team/t2", 5)]),
            "one per topic, the latest cutoff"
        );
        a.close(Disconnect::NODE_EXPIRED);
        a.close(Disconnect::SHUTTING_DOWN);
        a.end_topic(revoked("/team/t3", 5));
        // A close comes first, whatever else was asked.
        assert_eq!(
            a.next_request().await,
            Request::Close(Disconnect::NODE_EXPIRED)
        );
        let b = table.admit(2);
        table.close_all(Disconnect::NODE_EXPIRED);
        assert_eq!(
            b.next_request().await,
            Request::Close(Disconnect::NODE_EXPIRED)
        );
    }
}
