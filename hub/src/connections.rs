//! The node's table of connections: who is connected, with which session, and a way to tell a
//! session to end.
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

use crate::registry::ConnId;
use dashmap::DashMap;
use parking_lot::Mutex;
use protocol::Disconnect;
use std::collections::VecDeque;
use std::sync::Arc;
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
    /// Wakes the session. A `Notify` keeps one permit, so a request made while the session is
    /// busy is seen at its next turn.
    wake: Notify,
}

/// Who an authenticated connection is.
#[derive(Debug, Clone)]
pub(crate) struct Connected {
    pub(crate) session: Arc<str>,
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

    /// Resolves when a close was asked; returns it.
    pub(crate) async fn closed(&self) -> Disconnect {
        loop {
            if let Some(disconnect) = *self.closing.lock() {
                return disconnect;
            }
            self.wake.notified().await;
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
}

/// Why a session must close before it sent `CONNECT`.
pub(crate) const EVICTED: Disconnect = Disconnect::UNAUTHORIZED;

impl Connections {
    pub(crate) fn new(max_pending: usize) -> Connections {
        Connections {
            all: DashMap::new(),
            sessions: DashMap::new(),
            pending: Mutex::new(VecDeque::new()),
            max_pending: max_pending.max(1),
        }
    }

    /// Admits a new, unauthenticated connection. When the waiting pool is full, its oldest
    /// member is asked to close.
    pub(crate) fn admit(&self, conn: ConnId) -> Arc<ConnHandle> {
        let handle = Arc::new(ConnHandle {
            conn,
            user: parking_lot::RwLock::new(None),
            closing: Mutex::new(None),
            wake: Notify::new(),
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
        *handle.user.write() = Some(connected);
    }

    fn leave_pending(&self, conn: ConnId) {
        let mut pending = self.pending.lock();
        // Usually near the back: connections authenticate in the order they arrived.
        if let Some(i) = pending.iter().rposition(|c| *c == conn) {
            pending.remove(i);
        }
    }

    /// The session ended.
    pub(crate) fn remove(&self, handle: &ConnHandle) {
        self.leave_pending(handle.conn);
        if let Some(connected) = handle.user.read().as_ref() {
            self.sessions.remove(&connected.session);
        }
        self.all.remove(&handle.conn);
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
        table.authenticated(
            &b,
            Connected {
                session: "s-b".into(),
            },
        );
        let _d = table.admit(4);
        let _e = table.admit(5);
        assert!(b.closing.lock().is_none());
        assert_eq!(*c.closing.lock(), Some(EVICTED));
        assert!(table.is_open("s-b"));
        table.remove(&b);
        assert!(!table.is_open("s-b"));
    }

    #[tokio::test]
    async fn a_close_request_is_not_lost() {
        let table = Connections::new(10);
        let a = table.admit(1);
        // Asked before the session waits: the permit is kept.
        a.close(Disconnect::NODE_EXPIRED);
        a.close(Disconnect::SHUTTING_DOWN);
        assert_eq!(a.closed().await, Disconnect::NODE_EXPIRED);
        let b = table.admit(2);
        table.close_all(Disconnect::NODE_EXPIRED);
        assert_eq!(b.closed().await, Disconnect::NODE_EXPIRED);
    }
}
