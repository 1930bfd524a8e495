//! One WebSocket connection speaking STOMP: the per-connection state machine.
//!
//! A session is a single task that `select!`s over everything that can happen to it: a message
//! from the client, frames queued for it by fan-out, its one timer (connect deadline,
//! heart-beats, token expiry), a slow-consumer mark, and node shutdown. One task rather than a
//! reader and a writer keeps an idle connection to one small future.
//!
//! Every way a session ends is an [`Ending`]; [`run`] turns it into the right `ERROR` frame and
//! close code, then removes the session's subscriptions.

use crate::outbox::{Outbox, Ready};
use crate::registry::{ConnId, Subscriber};
use crate::{Hub, PublishError};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::BytesMut;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use protocol::client::{ClientCommand, ClientFrame, Connect};
use protocol::rate::TokenBucket;
use protocol::{Decoder, Disconnect, EventType, Frame, Principal, Topic, server};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, debug, field};

/// Most queued frames written per wake-up before flushing. Bounds the WebSocket write buffer.
const MAX_BATCH: usize = 256;

/// A dead peer is declared after this many missed heart-beat intervals.
const HEARTBEAT_MISSES: u32 = 2;

/// Most `SEND`s of one connection waiting for the broker's confirmation. Beyond it the session
/// stops reading the socket until the oldest is confirmed: backpressure, not buffering.
const MAX_PENDING_PUBLISHES: usize = 256;

/// A `SEND` the broker has taken but not yet confirmed, and the receipt it owes.
type PendingPublish = (
    Option<String>,
    BoxFuture<'static, Result<String, PublishError>>,
);

/// What the upgrade handler learned about the connection.
#[derive(Debug)]
pub(crate) struct SessionContext {
    pub(crate) peer: Option<SocketAddr>,
    /// A token from the upgrade request (`Authorization` or `access_token`), used when
    /// `CONNECT` carries none.
    pub(crate) upgrade_token: Option<String>,
    /// This connection's slot under `max_connections`, held until the session is dropped.
    pub(crate) _permit: OwnedSemaphorePermit,
}

/// How a session ends.
#[derive(Debug)]
enum Ending {
    /// The peer closed or the transport failed: nothing more can be said to it.
    Gone,
    /// Close with `disconnect`, after an `ERROR` frame when `error` is set.
    Close {
        disconnect: Disconnect,
        error: Option<ErrorFrame>,
    },
}

#[derive(Debug)]
struct ErrorFrame {
    message: &'static str,
    details: String,
    receipt: Option<String>,
}

impl Ending {
    fn error(
        disconnect: Disconnect,
        message: &'static str,
        details: impl Into<String>,
        receipt: Option<&str>,
    ) -> Ending {
        let error = ErrorFrame {
            message,
            details: details.into(),
            receipt: receipt.map(str::to_owned),
        };
        Ending::Close {
            disconnect,
            error: Some(error),
        }
    }

    fn close(disconnect: Disconnect) -> Ending {
        Ending::Close {
            disconnect,
            error: None,
        }
    }
}

/// Closing because the peer's heart-beats stopped.
pub(crate) const HEARTBEAT_TIMEOUT: Disconnect = Disconnect {
    code: 4003,
    reason: "heart-beat timeout",
};
/// Closing because the cluster broker is unavailable (RFC 6455 "try again later").
pub(crate) const UNAVAILABLE: Disconnect = Disconnect {
    code: 1013,
    reason: "broker unavailable",
};

/// State that exists once `CONNECT` succeeded.
#[derive(Debug)]
struct Connected {
    principal: Principal,
    session_id: String,
    /// Interval at which we send heart-beats, if any.
    send_every: Option<Duration>,
    /// Interval at which the client promised heart-beats, if any.
    recv_every: Option<Duration>,
    /// When the token expires, on the monotonic clock.
    expires: Instant,
}

struct Session {
    hub: Hub,
    conn: ConnId,
    ws: WebSocket,
    context: SessionContext,
    decoder: Decoder,
    inbuf: BytesMut,
    outbox: Outbox,
    /// Subscription id → topic.
    subscriptions: HashMap<Arc<str>, Topic>,
    connected: Option<Box<Connected>>,
    /// Publishes in flight, oldest first; their receipts go out in this order.
    pending: VecDeque<PendingPublish>,
    rate: TokenBucket,
    started: Instant,
    last_read: Instant,
    last_write: Instant,
}

/// Runs a session to its end.
pub(crate) async fn run(ws: WebSocket, hub: Hub, context: SessionContext) {
    let _task = hub.inner.tracker.token();
    let conn = hub.next_conn_id();
    // At info, the default level, so that whatever a session logs carries its connection, peer
    // and user. (At warn or error the span is off, and costs no memory per connection.)
    let span = tracing::info_span!(
        "conn",
        conn.id = conn,
        peer.addr = field::Empty,
        user.id = field::Empty
    );
    if let Some(peer) = context.peer {
        span.record("peer.addr", field::display(peer));
    }
    let now = Instant::now();
    let config = &hub.inner.config;
    let session = Session {
        conn,
        decoder: Decoder::new(config.limits),
        rate: TokenBucket::new(config.publish_rate, config.publish_burst, 0.0),
        hub: hub.clone(),
        ws,
        context,
        inbuf: BytesMut::new(),
        outbox: Outbox::new(config.outbound_queue),
        subscriptions: HashMap::new(),
        connected: None,
        pending: VecDeque::new(),
        started: now,
        last_read: now,
        last_write: now,
    };
    metrics::counter!(crate::metrics::CONNECTIONS_OPENED).increment(1);
    session.serve_and_close().instrument(span).await;
}

impl Session {
    async fn serve_and_close(mut self) {
        let ending = self.serve().await;
        debug!(?ending, "session ending");
        crate::metrics::closed(match &ending {
            Ending::Close { disconnect, .. } => Some(*disconnect),
            Ending::Gone => None,
        });
        self.finish(ending).await;
        self.cleanup();
    }

    async fn serve(&mut self) -> Ending {
        let timer = sleep_until(self.started + self.hub.inner.config.connect_timeout);
        tokio::pin!(timer);
        // Created once: a fresh `cancelled()` future per loop turn would register and deregister
        // a waiter on the node-wide token (under its lock) on every wake-up of every session.
        let shutdown = self.hub.inner.shutdown.clone();
        let shutting_down = shutdown.cancelled();
        tokio::pin!(shutting_down);
        loop {
            tokio::select! {
                biased;
                () = &mut shutting_down => return Ending::close(Disconnect::SHUTTING_DOWN),
                () = &mut timer => {
                    match self.on_timer() {
                        Ok(Some(next)) => timer.as_mut().reset(next),
                        Ok(None) => {
                            if let Err(ending) = self.write_batch(Some(Utf8Bytes::from_static("\n"))).await {
                                return ending;
                            }
                            timer.as_mut().reset(self.next_deadline());
                        }
                        Err(ending) => return ending,
                    }
                }
                result = next_confirmation(&mut self.pending), if !self.pending.is_empty() => {
                    let (receipt, _) = self.pending.pop_front().expect("a pending publish");
                    if let Err(ending) = self.publish_done(receipt, result).await {
                        return ending;
                    }
                }
                message = self.ws.next(), if self.pending.len() < MAX_PENDING_PUBLISHES => {
                    let message = match message {
                        Some(Ok(message)) => message,
                        Some(Err(err)) => return self.transport_error(err),
                        None => return Ending::Gone,
                    };
                    self.last_read = Instant::now();
                    let was_connected = self.connected.is_some();
                    if let Err(ending) = self.on_message(message).await {
                        return ending;
                    }
                    if !was_connected && self.connected.is_some() {
                        timer.as_mut().reset(self.next_deadline());
                    }
                }
                ready = std::future::poll_fn(|cx| self.outbox.poll_ready(cx)) => match ready {
                    Ready::Frames => {
                        if let Err(ending) = self.write_batch(None).await {
                            return ending;
                        }
                    }
                    Ready::Slow => return Ending::close(Disconnect::SLOW_CONSUMER),
                },
            }
        }
    }

    /// A read error. Oversized messages get a protocol error; anything else means the
    /// transport is gone.
    fn transport_error(&self, err: axum::Error) -> Ending {
        debug!(%err, "websocket read failed");
        let inner = err.into_inner();
        if let Some(tungstenite::Error::Capacity(_)) = inner.downcast_ref::<tungstenite::Error>() {
            let limit = self.hub.inner.config.limits.max_frame_bytes;
            return Ending::error(
                Disconnect::PROTOCOL_ERROR,
                "frame too large",
                format!("WebSocket message is larger than {} bytes", limit * 4),
                None,
            );
        }
        Ending::Gone
    }

    /// The earliest moment something must happen without any input: a heart-beat is due, the
    /// peer's heart-beat is overdue, or the token expires.
    fn next_deadline(&self) -> Instant {
        let Some(c) = &self.connected else {
            return self.started + self.hub.inner.config.connect_timeout;
        };
        let mut next = c.expires;
        if let Some(every) = c.send_every {
            next = next.min(self.last_write + every);
        }
        if let Some(every) = c.recv_every {
            next = next.min(self.last_read + every * HEARTBEAT_MISSES);
        }
        next
    }

    /// The timer fired. Returns the next deadline, `None` when a heart-beat must be sent now, or
    /// the ending when the session must stop.
    fn on_timer(&self) -> Result<Option<Instant>, Ending> {
        let now = Instant::now();
        let Some(c) = &self.connected else {
            return Err(Ending::error(
                Disconnect::UNAUTHORIZED,
                "connect timeout",
                "no CONNECT frame within the connect timeout",
                None,
            ));
        };
        if now >= c.expires {
            return Err(token_expired());
        }
        if let Some(every) = c.recv_every
            && now >= self.last_read + every * HEARTBEAT_MISSES
        {
            debug!(?every, "peer missed its heart-beats");
            return Err(Ending::close(HEARTBEAT_TIMEOUT));
        }
        if let Some(every) = c.send_every
            && now >= self.last_write + every
        {
            return Ok(None);
        }
        Ok(Some(self.next_deadline()))
    }

    /// Writes `first` (a frame of the session's own) and whatever fan-out queued, then flushes
    /// once: one write per wake-up however many frames arrived meanwhile.
    async fn write_batch(&mut self, first: Option<Utf8Bytes>) -> Result<(), Ending> {
        // The delivery path enforces the token's lifetime, not just the timer.
        if let Some(c) = &self.connected
            && Instant::now() >= c.expires
        {
            return Err(token_expired());
        }
        let Session {
            ws, outbox, hub, ..
        } = self;
        let write = async {
            let mut written = 0;
            if let Some(frame) = first {
                ws.feed(Message::Text(frame)).await?;
                written += 1;
            }
            let mut messages = 0;
            while written < MAX_BATCH {
                let Some(frame) = outbox.pop() else { break };
                ws.feed(Message::Text(frame)).await?;
                written += 1;
                messages += 1;
            }
            hub.inner.metrics.messages_out.increment(messages);
            ws.flush().await
        };
        tokio::pin!(write);
        // Usually the socket takes the batch at once; only a write that has to wait gets the
        // timeout and the slow-consumer and shutdown checks (and their timers).
        let result = match (&mut write).now_or_never() {
            Some(result) => result,
            None => tokio::select! {
                result = &mut write => result,
                () = std::future::poll_fn(|cx| outbox.poll_slow(cx)) => {
                    return Err(Ending::close(Disconnect::SLOW_CONSUMER));
                }
                () = hub.inner.shutdown.cancelled() => return Err(Ending::close(Disconnect::SHUTTING_DOWN)),
                () = tokio::time::sleep(hub.inner.config.write_timeout) => {
                    return Err(Ending::close(Disconnect::SLOW_CONSUMER));
                }
            },
        };
        match result {
            Ok(()) => {
                self.last_write = Instant::now();
                Ok(())
            }
            Err(err) => {
                debug!(%err, "websocket write failed");
                Err(Ending::Gone)
            }
        }
    }

    /// Sends a server frame directly (receipts, `CONNECTED`), bypassing the queue.
    async fn send_frame(&mut self, frame: &Frame) -> Result<(), Ending> {
        crate::metrics::frame_out(&frame.command);
        self.write_batch(Some(Utf8Bytes::from(server::to_text(frame))))
            .await
    }

    async fn on_message(&mut self, message: Message) -> Result<(), Ending> {
        match message {
            Message::Text(text) => self.inbuf.extend_from_slice(text.as_bytes()),
            Message::Binary(bytes) => self.inbuf.extend_from_slice(&bytes),
            // tungstenite answers pings itself; any message already counted as a sign of life.
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(_) => return Err(Ending::Gone),
        }
        loop {
            match self.decoder.decode(&mut self.inbuf) {
                Ok(Some(frame)) => self.on_frame(frame).await?,
                Ok(None) => break,
                Err(err) => {
                    debug!(%err, "malformed frame");
                    let message = match err {
                        protocol::DecodeError::FrameTooLarge { .. }
                        | protocol::DecodeError::BodyTooLarge { .. } => "frame too large",
                        _ => "malformed frame",
                    };
                    return Err(Ending::error(
                        Disconnect::PROTOCOL_ERROR,
                        message,
                        err.to_string(),
                        None,
                    ));
                }
            }
        }
        // An idle connection should not keep a large buffer from one big frame.
        if self.inbuf.is_empty() && self.inbuf.capacity() > 8 * 1024 {
            self.inbuf = BytesMut::new();
        }
        Ok(())
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), Ending> {
        crate::metrics::frame_in(&frame.command);
        let receipt = frame.header("receipt").map(str::to_owned);
        let frame = ClientFrame::try_from(frame).map_err(|err| {
            Ending::error(
                Disconnect::PROTOCOL_ERROR,
                "malformed frame",
                err.to_string(),
                receipt.as_deref(),
            )
        })?;
        let receipt = frame.receipt.as_deref();
        if self.connected.is_none() {
            return match frame.command {
                ClientCommand::Connect(connect) => self.on_connect(&connect).await,
                ClientCommand::Unknown { command } => Err(unknown_command(&command, receipt)),
                _ => Err(Ending::error(
                    Disconnect::UNAUTHORIZED,
                    "not connected",
                    "send CONNECT with a token first",
                    receipt,
                )),
            };
        }
        match frame.command {
            ClientCommand::Connect(_) => {
                return Err(Ending::error(
                    Disconnect::PROTOCOL_ERROR,
                    "already connected",
                    "CONNECT was already accepted on this connection",
                    receipt,
                ));
            }
            ClientCommand::Subscribe {
                id, destination, ..
            } => {
                self.on_subscribe(id, &destination, receipt).await?;
            }
            ClientCommand::Unsubscribe { id } => self.on_unsubscribe(&id),
            ClientCommand::Send {
                destination,
                event_type,
                content_type,
                body,
            } => {
                // Its receipt waits for the broker's confirmation.
                return self
                    .on_send(
                        &destination,
                        event_type.as_deref(),
                        content_type.as_deref(),
                        &body,
                        receipt,
                    )
                    .await;
            }
            // Subscriptions are ack:auto, so acknowledgements have nothing to do.
            ClientCommand::Ack { .. } | ClientCommand::Nack { .. } => {}
            ClientCommand::Transaction { .. } => {
                return Err(Ending::error(
                    Disconnect::PROTOCOL_ERROR,
                    "transactions are not supported",
                    "BEGIN, COMMIT and ABORT are not supported; send frames without a transaction",
                    receipt,
                ));
            }
            ClientCommand::Disconnect => {
                // Whatever was accepted is confirmed before the goodbye.
                while let Some((receipt, confirmed)) = self.pending.pop_front() {
                    let result = confirmed.await;
                    self.publish_done(receipt, result).await?;
                }
                if let Some(id) = receipt {
                    self.send_frame(&server::receipt(id)).await?;
                }
                return Err(Ending::close(Disconnect::NORMAL));
            }
            ClientCommand::Unknown { command } => return Err(unknown_command(&command, receipt)),
        }
        if let Some(id) = receipt {
            self.send_frame(&server::receipt(id)).await?;
        }
        Ok(())
    }

    async fn on_connect(&mut self, connect: &Connect) -> Result<(), Ending> {
        let Some(version) = connect.negotiate_version() else {
            return Err(Ending::error(
                Disconnect::PROTOCOL_ERROR,
                "unsupported protocol version",
                "supported versions are 1.0, 1.1 and 1.2",
                None,
            ));
        };
        let token = connect.token().or(self.context.upgrade_token.as_deref());
        let Some(token) = token else {
            return Err(Ending::error(
                Disconnect::UNAUTHORIZED,
                "unauthorized",
                protocol::AuthError::Missing.to_string(),
                None,
            ));
        };
        let now_unix = unix_now();
        let principal = self.hub.inner.auth.verify(token, now_unix).map_err(|err| {
            debug!(%err, "token refused");
            Ending::error(
                Disconnect::UNAUTHORIZED,
                "unauthorized",
                err.to_string(),
                None,
            )
        })?;
        tracing::Span::current().record("user.id", field::display(&principal.sub));
        let (send_ms, recv_ms) = self
            .hub
            .inner
            .config
            .heart_beat
            .negotiate(connect.heart_beat);
        let expires = Instant::now() + Duration::from_secs(principal.exp.saturating_sub(now_unix));
        let session_id = match self.hub.inner.config.node_id.as_str() {
            "" => self.hub.new_id(),
            node => format!("{node}.{}", self.hub.new_id()),
        };
        let offered = self.hub.inner.config.heart_beat;
        // Tell the client what we will actually do in each direction.
        let heart_beat = protocol::HeartBeat {
            send_ms: if connect.heart_beat.recv_ms == 0 {
                0
            } else {
                offered.send_ms
            },
            recv_ms: if connect.heart_beat.send_ms == 0 {
                0
            } else {
                offered.recv_ms
            },
        };
        let connected = server::connected(version, &session_id, heart_beat);
        self.connected = Some(Box::new(Connected {
            principal,
            session_id,
            send_every: send_ms.map(|ms| Duration::from_millis(ms.into())),
            recv_every: recv_ms.map(|ms| Duration::from_millis(ms.into())),
            expires,
        }));
        self.send_frame(&connected).await
    }

    async fn on_subscribe(
        &mut self,
        id: String,
        destination: &str,
        receipt: Option<&str>,
    ) -> Result<(), Ending> {
        let topic = Topic::parse(destination).map_err(|err| {
            Ending::error(
                Disconnect::PROTOCOL_ERROR,
                "invalid destination",
                err.to_string(),
                receipt,
            )
        })?;
        let principal = &self.connected.as_ref().expect("connected").principal;
        if let Err(err) = principal.can_subscribe(&topic) {
            return Err(Ending::error(
                Disconnect::FORBIDDEN,
                "forbidden",
                format!("cannot subscribe to {destination}: {err}"),
                receipt,
            ));
        }
        if self.subscriptions.contains_key(id.as_str()) {
            return Err(Ending::error(
                Disconnect::PROTOCOL_ERROR,
                "duplicate subscription id",
                format!("subscription id '{id}' is already in use on this connection"),
                receipt,
            ));
        }
        let max = self.hub.inner.config.max_subscriptions;
        if self.subscriptions.len() >= max {
            return Err(Ending::error(
                Disconnect::PROTOCOL_ERROR,
                "too many subscriptions",
                format!("at most {max} subscriptions per connection"),
                receipt,
            ));
        }
        let sub_id: Arc<str> = id.into();
        let subscriber = Subscriber {
            conn: self.conn,
            sub_id: sub_id.clone(),
            prefix: server::subscription_prefix(&sub_id).into(),
            outbox: self.outbox.clone(),
        };
        let hub = &self.hub.inner;
        // Watch the manager's epoch before looking, so a confirmation cannot slip between.
        let mut epoch = hub.subscriptions.watch_epoch();
        if hub.registry.add(topic.as_str(), subscriber) {
            hub.subscriptions.mark(topic.as_str());
        }
        self.subscriptions.insert(sub_id, topic.clone());
        if receipt.is_none() {
            return Ok(());
        }
        // A receipt promises the subscription is live in the cluster, so wait for the broker.
        let confirmed = async {
            while !hub.registry.is_confirmed(topic.as_str()) {
                if epoch.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        match tokio::time::timeout(hub.config.subscribe_timeout, confirmed).await {
            Ok(true) => Ok(()),
            _ => Err(Ending::error(
                UNAVAILABLE,
                "broker unavailable",
                format!(
                    "the subscription to {destination} could not be confirmed; reconnect later"
                ),
                receipt,
            )),
        }
    }

    fn on_unsubscribe(&mut self, id: &str) {
        // Unknown ids are ignored: the subscription is gone either way.
        let hub = &self.hub.inner;
        if let Some(topic) = self.subscriptions.remove(id)
            && hub.registry.remove(topic.as_str(), self.conn, id)
        {
            hub.subscriptions.mark(topic.as_str());
        }
    }

    async fn on_send(
        &mut self,
        destination: &str,
        event_type: Option<&str>,
        content_type: Option<&str>,
        body: &[u8],
        receipt: Option<&str>,
    ) -> Result<(), Ending> {
        let protocol_error = |message: &'static str, details: String| {
            Ending::error(Disconnect::PROTOCOL_ERROR, message, details, receipt)
        };
        let topic = Topic::parse(destination)
            .map_err(|e| protocol_error("invalid destination", e.to_string()))?;
        let principal = &self.connected.as_ref().expect("connected").principal;
        if let Err(err) = principal.can_publish(&topic) {
            return Err(Ending::error(
                Disconnect::FORBIDDEN,
                "forbidden",
                format!("cannot publish to {destination}: {err}"),
                receipt,
            ));
        }
        let event_type = event_type.ok_or_else(|| {
            protocol_error(
                "missing event-type",
                "SEND needs an 'event-type' header naming the event type".to_owned(),
            )
        })?;
        let event_type = EventType::parse(event_type)
            .map_err(|e| protocol_error("invalid event-type", e.to_string()))?;
        if let Some(ct) = content_type
            && !ct.trim_start().starts_with("application/json")
        {
            return Err(protocol_error(
                "unsupported content-type",
                format!("content-type '{ct}' is not application/json"),
            ));
        }
        let data: &RawValue = serde_json::from_slice(body).map_err(|e| {
            protocol_error(
                "invalid JSON body",
                format!("the SEND body must be JSON: {e}"),
            )
        })?;
        self.throttle().await?;
        let mut confirmed = self.hub.publish(&topic, &event_type, data);
        let receipt = receipt.map(str::to_owned);
        // The in-process broker confirms at once; skip the queue then (it is empty, or the
        // receipts would go out of order).
        if self.pending.is_empty()
            && let Some(result) = (&mut confirmed).now_or_never()
        {
            return self.publish_done(receipt, result).await;
        }
        self.pending.push_back((receipt, confirmed));
        Ok(())
    }

    /// A publish was confirmed (or failed): send its receipt, or end with an error.
    async fn publish_done(
        &mut self,
        receipt: Option<String>,
        result: Result<String, PublishError>,
    ) -> Result<(), Ending> {
        match result {
            Ok(_) => match receipt {
                Some(id) => self.send_frame(&server::receipt(&id)).await,
                None => Ok(()),
            },
            Err(err) => Err(Ending::error(
                UNAVAILABLE,
                "broker unavailable",
                err.to_string(),
                receipt.as_deref(),
            )),
        }
    }

    /// Applies the per-connection publish rate: a client over its rate is slowed down (its
    /// frames wait), not disconnected, so nothing it sent is lost.
    async fn throttle(&mut self) -> Result<(), Ending> {
        let now = self.started.elapsed().as_secs_f64();
        if let Err(wait) = self.rate.take(now) {
            let wait = Duration::from_secs_f64(wait.min(60.0));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.hub.inner.shutdown.cancelled() => return Err(Ending::close(Disconnect::SHUTTING_DOWN)),
            }
            let _ = self.rate.take(self.started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Says goodbye: the `ERROR` frame if any, the close frame, then reads until the client
    /// answers the close, so unread input does not turn our close into a TCP reset.
    async fn finish(&mut self, ending: Ending) {
        let Ending::Close { disconnect, error } = ending else {
            return;
        };
        let timeout = self
            .hub
            .inner
            .config
            .write_timeout
            .min(Duration::from_secs(5));
        let ws = &mut self.ws;
        let goodbye = async {
            if let Some(e) = error {
                let frame = server::error(e.message, e.receipt.as_deref(), &e.details);
                crate::metrics::frame_out(&frame.command);
                ws.feed(Message::Text(server::to_text(&frame).into()))
                    .await?;
            }
            let close = CloseFrame {
                code: disconnect.code,
                reason: disconnect.reason.into(),
            };
            ws.send(Message::Close(Some(close))).await
        };
        if tokio::time::timeout(timeout, goodbye).await.is_err() {
            return;
        }
        let drain = async { while let Some(Ok(_)) = ws.next().await {} };
        let _ = tokio::time::timeout(timeout.min(Duration::from_secs(5)), drain).await;
    }

    fn cleanup(&mut self) {
        self.outbox.close();
        let hub = &self.hub.inner;
        for (id, topic) in self.subscriptions.drain() {
            if hub.registry.remove(topic.as_str(), self.conn, &id) {
                hub.subscriptions.mark(topic.as_str());
            }
        }
        if let (Some(c), Some(observer)) = (&self.connected, &hub.observer) {
            observer.session_closed(&c.session_id, &c.principal.sub);
        }
    }
}

/// The oldest pending publish's confirmation.
fn next_confirmation(
    pending: &mut VecDeque<PendingPublish>,
) -> impl Future<Output = Result<String, PublishError>> + '_ {
    std::future::poll_fn(move |cx| match pending.front_mut() {
        Some((_, confirmed)) => confirmed.as_mut().poll(cx),
        None => std::task::Poll::Pending,
    })
}

fn token_expired() -> Ending {
    Ending::error(
        Disconnect::TOKEN_EXPIRED,
        "token expired",
        "the token's exp has passed; reconnect with a fresh token",
        None,
    )
}

fn unknown_command(command: &str, receipt: Option<&str>) -> Ending {
    let shown: String = command.chars().take(40).collect();
    Ending::error(
        Disconnect::PROTOCOL_ERROR,
        "unknown command",
        format!("unknown command '{shown}'"),
        receipt,
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
