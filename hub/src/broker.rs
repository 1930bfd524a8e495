//! The cluster broker: how an event published on one node reaches every node with subscribers.
//!
//! [`Broker`] is deliberately narrow (publish, subscribe, unsubscribe, readiness) so that a
//! history store can sit beside it later. A broker hands inbound events to the node's
//! [`Registry`]; it knows nothing about sessions.

use crate::registry::Registry;
use futures_util::future::BoxFuture;
use protocol::MessageTemplate;
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::watch;

/// A broker failure. Publishing callers turn it into 503 / an `ERROR` frame; the subscription
/// manager retries.
#[derive(Debug, Clone, Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker overloaded: too many events waiting to be published")]
    Overloaded,
}

/// Moves events between nodes.
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes an encoded event on `topic` to every node, this one included; the future
    /// resolves when the broker confirmed it.
    ///
    /// The event takes its place in the order when `publish` is *called*, not when the future is
    /// first polled: events one caller publishes on one topic arrive everywhere in call order,
    /// even when the caller keeps several publishes in flight (a pipelining STOMP session).
    fn publish(
        &self,
        topic: &str,
        message: &MessageTemplate,
    ) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Starts delivering `topics` to this node. Returns once the broker confirmed.
    fn subscribe<'a>(&'a self, topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Stops delivering `topics` to this node.
    fn unsubscribe<'a>(&'a self, topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Whether the broker is reachable and its subscriptions are live.
    fn is_ready(&self) -> bool;

    /// Changes whenever the broker (re)connected and may have lost this node's subscriptions;
    /// the subscription manager then resubscribes every topic. `None`: subscriptions are never
    /// lost.
    fn connection_epoch(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// The single-node broker: publishing delivers straight into the local registry.
#[derive(Debug)]
pub struct MemoryBroker {
    registry: Arc<Registry>,
}

impl MemoryBroker {
    pub fn new(registry: Arc<Registry>) -> MemoryBroker {
        MemoryBroker { registry }
    }
}

impl Broker for MemoryBroker {
    fn publish(
        &self,
        topic: &str,
        message: &MessageTemplate,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.registry.deliver(topic, message);
        Box::pin(std::future::ready(Ok(())))
    }

    fn subscribe<'a>(&'a self, _topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe<'a>(&'a self, _topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_ready(&self) -> bool {
        true
    }
}
