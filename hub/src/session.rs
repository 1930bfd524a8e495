//! One WebSocket connection speaking STOMP: the per-connection state machine.
//!
//! A session is a single task that `select!`s over everything that can happen to it: a message
//! from the client, frames queued for it by fan-out, its one timer (connect deadline,
//! heart-beats, pings, token expiry), a held-back `SEND`, a slow-consumer mark, a close asked by
//! the node, and node shutdown. One task rather than a reader and a writer keeps an idle
//! connection to one small future.
//!
//! The `select!` is not biased: reading and writing both make progress however busy the other
//! side is. A client that floods `SEND`s still gets its own messages, receipts and heart-beats,
//! and a subscriber under a flood of events is still read (its heart-beats keep it alive). A
//! `SEND` over the token's publish rate is not slept on inside frame handling either: it is held
//! with the time it may go, reading stops until then, and writing goes on.
//!
//! Every way a session ends is an [`Ending`]; [`run`] turns it into the right `ERROR` frame and
//! close code, then removes the session's subscriptions.

use crate::broker::{History, PublishOptions, Published, StreamEvent};
use crate::connections::{self, ConnHandle, Request};
use crate::control::Revocation;
use crate::registry::{ConnId, Held, Recovery, Subscriber};
use crate::send_queue::{Pushed, Ready, SendQueue};
use crate::{Hub, PublishError};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::BytesMut;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use protocol::client::{ClientCommand, ClientFrame, Connect};
use protocol::stream::{self, StreamStart};
use protocol::{
    Decoder, Disconnect, EventType, Frame, Limits, MessageTemplate, Position, Principal, Topic,
    server,
};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, debug, field};
use tungstenite::Bytes;

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
    BoxFuture<'static, Result<Published, PublishError>>,
);

/// What the upgrade handler learned about the connection.
#[derive(Debug)]
pub(crate) struct SessionContext {
    pub(crate) peer: Option<SocketAddr>,
    /// A token from the upgrade request (`Authorization` or `access_token`), used when
    /// `CONNECT` carries none.
    pub(crate) upgrade_token: Option<String>,
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

/// State that exists once `CONNECT` succeeded.
#[derive(Debug)]
struct Connected {
    principal: Principal,
    session_id: String,
    /// The negotiated STOMP version; 1.0 gets no header escaping.
    version: &'static str,
    /// Interval at which we send heart-beats, if any.
    send_every: Option<Duration>,
    /// Longest silence from the client before it counts as dead: twice its promised
    /// heart-beat interval, or `idle_timeout` when it promised none or one so rare that twice
    /// it would exceed `idle_timeout`.
    idle_limit: Duration,
    /// Whether the server pings a silent client (at half of `idle_limit`), because no STOMP
    /// heart-beats within the limit were promised. A client that did promise them is held to
    /// them: a WebSocket pong does not stand in for a missed heart-beat.
    ping: bool,
    /// When the token expires, on the monotonic clock (to the millisecond).
    expires: Instant,
    /// This connection's slot under `max_connections`, held until the session ends.
    _permit: OwnedSemaphorePermit,
}

/// A `SEND` held back by the token's publish budget, and when it may go.
#[derive(Debug)]
struct HeldSend {
    topic: Topic,
    event_type: EventType,
    data: Box<RawValue>,
    /// The `x-key` header: the event's key in its topic.
    key: Option<String>,
    receipt: Option<String>,
    until: Instant,
}

struct Session {
    hub: Hub,
    conn: ConnId,
    /// This connection in the node's table; the node asks the session to close through it.
    handle: Arc<ConnHandle>,
    ws: WebSocket,
    context: SessionContext,
    decoder: Decoder,
    inbuf: BytesMut,
    queue: SendQueue,
    /// Subscription id → topic.
    subscriptions: HashMap<Arc<str>, Topic>,
    connected: Option<Box<Connected>>,
    /// Publishes in flight, oldest first; their receipts go out in this order.
    pending: VecDeque<PendingPublish>,
    /// A `SEND` waiting for the publish budget; reading stops while it waits.
    held: Option<HeldSend>,
    started: Instant,
    last_read: Instant,
    last_write: Instant,
    /// Frames the next write may take from the queue: `MAX_BATCH` while the socket keeps up,
    /// one after a write had to wait. A slow client's backlog then stays in the queue, where
    /// keyed events conflate, instead of in the WebSocket's write buffer, where they cannot.
    batch: usize,
    /// A ping went out and nothing was read since.
    pinged: bool,
    /// The token was refreshed: its expiry moved, so the timer must be set again.
    refreshed: bool,
    /// The user's revocations this session knows of (read on `CONNECT`, `SUBSCRIBE` and
    /// refresh, and told by the control API): what its `SEND`s are checked against.
    revocations: Vec<Revocation>,
    /// Token refreshes refused in a row; too many close the connection.
    refused_refreshes: u32,
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
    let handle = hub.inner.connections.admit(conn);
    let session = Session {
        conn,
        handle,
        decoder: Decoder::new(connect_limits(config.limits, config.connect_frame_bytes)),
        hub: hub.clone(),
        ws,
        context,
        inbuf: BytesMut::new(),
        queue: SendQueue::new(config.outbound_queue, config.outbound_queue_bytes),
        subscriptions: HashMap::new(),
        connected: None,
        pending: VecDeque::new(),
        held: None,
        started: now,
        last_read: now,
        last_write: now,
        batch: MAX_BATCH,
        pinged: false,
        refreshed: false,
        revocations: Vec::new(),
        refused_refreshes: 0,
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
        let handle = self.handle.clone();
        let asked = handle.next_request();
        tokio::pin!(asked);
        loop {
            // Not biased: every ready branch gets its turn (see the module docs).
            tokio::select! {
                () = &mut shutting_down => return Ending::close(Disconnect::SHUTTING_DOWN),
                request = &mut asked => match request {
                    Request::Close(disconnect) => return self.asked_to_close(disconnect),
                    Request::End(revocations) => {
                        if let Err(ending) = self.on_revoked(revocations) {
                            return ending;
                        }
                        asked.set(handle.next_request());
                    }
                },
                () = &mut timer => {
                    match self.on_timer() {
                        Ok(Timer::Next(next)) => timer.as_mut().reset(next),
                        Ok(Timer::HeartBeat) => {
                            if let Err(ending) = self.write_batch(Some(Message::Text(Utf8Bytes::from_static("\n")))).await {
                                return ending;
                            }
                            timer.as_mut().reset(self.next_deadline());
                        }
                        Ok(Timer::Ping) => {
                            self.pinged = true;
                            if let Err(ending) = self.write_batch(Some(Message::Ping(Bytes::new()))).await {
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
                () = held_until(self.held.as_ref()), if self.held.is_some() => {
                    if let Err(ending) = self.release_held().await {
                        return ending;
                    }
                    // The input behind the held SEND may have refreshed the token.
                    if std::mem::take(&mut self.refreshed) {
                        timer.as_mut().reset(self.next_deadline());
                    }
                }
                message = self.ws.next(), if self.can_read() => {
                    let message = match message {
                        Some(Ok(message)) => message,
                        Some(Err(err)) => return self.transport_error(err),
                        None => return Ending::Gone,
                    };
                    self.last_read = Instant::now();
                    self.pinged = false;
                    let was_connected = self.connected.is_some();
                    if let Err(ending) = self.on_message(message).await {
                        return ending;
                    }
                    if (!was_connected && self.connected.is_some()) || std::mem::take(&mut self.refreshed) {
                        timer.as_mut().reset(self.next_deadline());
                    }
                }
                ready = std::future::poll_fn(|cx| self.queue.poll_ready(cx)) => match ready {
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

    /// Whether the socket may be read: not while a `SEND` waits for the publish budget, nor
    /// while too many publishes wait for the broker (backpressure, not buffering).
    fn can_read(&self) -> bool {
        self.held.is_none() && self.pending.len() < MAX_PENDING_PUBLISHES
    }

    /// The node asked this session to close.
    fn asked_to_close(&self, disconnect: Disconnect) -> Ending {
        if self.connected.is_none() && disconnect == connections::EVICTED {
            return Ending::error(
                disconnect,
                "connect timeout",
                "too many connections are waiting to send CONNECT; send it right after the WebSocket opens",
                None,
            );
        }
        Ending::close(disconnect)
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
    /// peer has been silent long enough for a ping or for being taken for dead, or the token
    /// expires.
    fn next_deadline(&self) -> Instant {
        let Some(c) = &self.connected else {
            return self.started + self.hub.inner.config.connect_timeout;
        };
        let mut next = c.expires.min(self.last_read + c.idle_limit);
        if c.ping && !self.pinged {
            next = next.min(self.last_read + c.idle_limit / 2);
        }
        if let Some(every) = c.send_every {
            next = next.min(self.last_write + every);
        }
        next
    }

    /// The timer fired: says what is due now, or the ending when the session must stop.
    fn on_timer(&self) -> Result<Timer, Ending> {
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
        if now >= self.last_read + c.idle_limit {
            debug!(idle = ?c.idle_limit, "peer went silent: missed heart-beats and pings");
            return Err(Ending::close(Disconnect::HEARTBEAT_TIMEOUT));
        }
        if let Some(every) = c.send_every
            && now >= self.last_write + every
        {
            return Ok(Timer::HeartBeat);
        }
        if c.ping && !self.pinged && now >= self.last_read + c.idle_limit / 2 {
            // Silent for half the limit: a ping makes any live WebSocket peer answer (browsers
            // do it by themselves), so clients without heart-beats are checked too.
            return Ok(Timer::Ping);
        }
        Ok(Timer::Next(self.next_deadline()))
    }

    /// Writes `first` (a message of the session's own) and whatever fan-out queued, then
    /// flushes once: one write per wake-up however many frames arrived meanwhile.
    async fn write_batch(&mut self, first: Option<Message>) -> Result<(), Ending> {
        // The delivery path enforces the token's lifetime, not just the timer.
        if let Some(c) = &self.connected
            && Instant::now() >= c.expires
        {
            return Err(token_expired());
        }
        let Session {
            ws,
            queue,
            hub,
            batch,
            ..
        } = self;
        let limit = *batch;
        let write = async {
            let mut written = 0;
            if let Some(message) = first {
                ws.feed(message).await?;
                written += 1;
            }
            let mut messages = 0;
            while written < limit {
                let Some(frame) = queue.pop() else { break };
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
            Some(result) => {
                *batch = (*batch * 2).min(MAX_BATCH);
                result
            }
            None => tokio::select! {
                result = &mut write => {
                    *batch = 1;
                    result
                }
                () = std::future::poll_fn(|cx| queue.poll_slow(cx)) => {
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

    /// Writes frames of one subscription straight to the socket, in order, without touching
    /// the queue (which may hold that subscription's later events). Bounded by the write
    /// timeout like any write.
    async fn write_frames(&mut self, frames: Vec<Utf8Bytes>) -> Result<(), Ending> {
        let count = frames.len() as u64;
        let ws = &mut self.ws;
        let write = async {
            for frame in frames {
                ws.feed(Message::Text(frame)).await?;
            }
            ws.flush().await
        };
        match tokio::time::timeout(self.hub.inner.config.write_timeout, write).await {
            Ok(Ok(())) => {
                self.hub.inner.metrics.messages_out.increment(count);
                self.last_write = Instant::now();
                Ok(())
            }
            Ok(Err(err)) => {
                debug!(%err, "websocket write failed");
                Err(Ending::Gone)
            }
            Err(_) => Err(Ending::close(Disconnect::SLOW_CONSUMER)),
        }
    }

    /// Sends a server frame directly (receipts, `CONNECTED`), bypassing the queue.
    async fn send_frame(&mut self, frame: &Frame) -> Result<(), Ending> {
        crate::metrics::frame_out(&frame.command);
        let text = server::to_text_for(frame, self.version());
        self.write_batch(Some(Message::Text(Utf8Bytes::from(text))))
            .await
    }

    /// The negotiated STOMP version (1.2 until `CONNECT` says otherwise).
    fn version(&self) -> &'static str {
        self.connected.as_ref().map_or("1.2", |c| c.version)
    }

    async fn on_message(&mut self, message: Message) -> Result<(), Ending> {
        match message {
            Message::Text(text) => self.inbuf.extend_from_slice(text.as_bytes()),
            Message::Binary(bytes) => self.inbuf.extend_from_slice(&bytes),
            // tungstenite answers pings itself; any message already counted as a sign of life.
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(_) => return Err(Ending::Gone),
        }
        self.decode_input().await
    }

    /// Handles the complete frames buffered so far, until the buffer holds none or a `SEND`
    /// has to wait for the publish budget (the rest stays buffered for after it).
    async fn decode_input(&mut self) -> Result<(), Ending> {
        while self.held.is_none() {
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

    /// The held `SEND`'s time came: publish it if the budget allows now (else hold it again),
    /// then go on with the buffered input.
    async fn release_held(&mut self) -> Result<(), Ending> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        // The client's heart-beats waited unread behind the held frame: it was not silent.
        self.last_read = Instant::now();
        self.publish_send(held)?;
        if self.held.is_none() {
            self.decode_input().await?;
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
                id,
                destination,
                stream,
                presence,
                ..
            } => {
                self.on_subscribe(id, &destination, stream, presence, receipt)
                    .await?;
            }
            ClientCommand::Unsubscribe { id } => self.on_unsubscribe(&id),
            ClientCommand::Send {
                destination, token, ..
            } if destination == TOKEN_DESTINATION => {
                return self.on_refresh(token.as_deref(), receipt).await;
            }
            ClientCommand::Send {
                destination,
                event_type,
                key,
                content_type,
                body,
                ..
            } => {
                // Its receipt waits for the broker's confirmation.
                return self.on_send(
                    &destination,
                    event_type.as_deref(),
                    key,
                    content_type.as_deref(),
                    &body,
                    receipt,
                );
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
        let now_ms = unix_now_ms();
        let principal = self
            .hub
            .inner
            .auth
            .verify(token, now_ms / 1000)
            .map_err(|err| {
                debug!(%err, "token refused");
                Ending::error(
                    Disconnect::UNAUTHORIZED,
                    "unauthorized",
                    err.to_string(),
                    None,
                )
            })?;
        tracing::Span::current().record("user.id", field::display(&principal.sub));
        let hub = &self.hub.inner;
        let Ok(permit) = hub.slots.clone().try_acquire_owned() else {
            return Err(Ending::error(
                Disconnect::TOO_MANY_CONNECTIONS,
                "too many connections",
                "this node is at its connection limit; try again or another node",
                None,
            ));
        };
        let config = &hub.config;
        let (send_ms, recv_ms) = config.heart_beat.negotiate(connect.heart_beat);
        let promised = recv_ms
            .map(|ms| Duration::from_millis(ms.into()) * HEARTBEAT_MISSES)
            .filter(|limit| *limit <= config.idle_timeout);
        let (idle_limit, ping) = match promised {
            Some(limit) => (limit, false),
            None => (config.idle_timeout, true),
        };
        let expires = expiry(principal.exp, now_ms);
        let session_id =
            config
                .session_key
                .issue(&config.node_id, &self.hub.new_id(), &principal.sub);
        let offered = config.heart_beat;
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
        hub.connections.authenticated(
            &self.handle,
            connections::Connected {
                session: session_id.as_str().into(),
                user: principal.sub.as_str().into(),
                issued_at: principal.issued_at,
                since: SystemTime::now(),
            },
        );
        // Read only now that the connection is in the table under its user: a control call
        // racing with this CONNECT either wrote its revocation before the read (refused here)
        // or finds the connection when its broadcast arrives (asked to close or narrow).
        match self.hub.revocations_of(&principal.sub).await {
            Ok(revocations) => {
                if revocations
                    .iter()
                    .any(|r| r.covers(None, principal.issued_at))
                {
                    return Err(token_revoked(None));
                }
                self.revocations = revocations;
            }
            Err(err) => return Err(revocations_unavailable(&err, None)),
        }
        let config = &self.hub.inner.config;
        // Authenticated: frames up to the configured limits from now on.
        self.decoder.set_limits(config.limits);
        self.connected = Some(Box::new(Connected {
            principal,
            session_id,
            version,
            send_every: send_ms.map(|ms| Duration::from_millis(ms.into())),
            idle_limit,
            ping,
            expires,
            _permit: permit,
        }));
        self.send_frame(&connected).await
    }

    async fn on_subscribe(
        &mut self,
        id: String,
        destination: &str,
        stream: Option<StreamStart>,
        presence: bool,
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
        // The platform may have ended this user's access since the token was issued, on
        // whichever node: the revocation is read from the broker, not from this node's memory.
        let issued_at = principal.issued_at;
        let read = self.hub.revocations_of(&principal.sub).await;
        let revocations = read.map_err(|err| revocations_unavailable(&err, receipt))?;
        let refused = revocations
            .iter()
            .find(|r| r.covers(Some(topic.as_str()), issued_at))
            .cloned();
        self.revocations = revocations;
        if let Some(revocation) = refused {
            let (disconnect, why) = match revocation.topic {
                None => (Disconnect::REMOVED, "this user's connections were removed"),
                Some(_) => (
                    Disconnect::FORBIDDEN,
                    "access was revoked after this token was issued",
                ),
            };
            return Err(Ending::error(
                disconnect,
                "forbidden",
                format!("cannot subscribe to {destination}: {why}; get a new token"),
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
        // A subscription that resumes holds its live events until its history is sent.
        let recovery = stream
            .as_ref()
            .map(|_| Arc::new(Recovery::new(self.hub.inner.config.outbound_queue)));
        let sub_id: Arc<str> = id.into();
        let unescaped = self.version() == "1.0";
        let prefix: Arc<str> = subscription_prefix(&sub_id, unescaped).into();
        let subscriber = Subscriber {
            conn: self.conn,
            sub_id: sub_id.clone(),
            prefix: prefix.clone(),
            unescaped,
            queue: self.queue.clone(),
            recovery: recovery.clone(),
            presence,
        };
        let hub = &self.hub.inner;
        // Watch the manager's epoch before looking, so a confirmation cannot slip between.
        let mut epoch = hub.subscriptions.watch_epoch();
        if hub.registry.add(topic.as_str(), subscriber) {
            hub.subscriptions.mark(topic.as_str());
        }
        // Live events are held from here: a history read started since misses none.
        let holding_since = Instant::now();
        self.subscriptions.insert(sub_id, topic.clone());
        hub.connections.subscribed(&self.handle, topic.as_str());
        self.touch_presence(&topic);
        if receipt.is_none() && recovery.is_none() {
            return Ok(());
        }
        // A receipt promises the subscription is live in the cluster, and history must be read
        // only once it is (every later event then reaches the held buffer), so wait for the
        // broker.
        let confirmed = async {
            while !hub.registry.is_confirmed(topic.as_str()) {
                if epoch.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        if !matches!(
            tokio::time::timeout(hub.config.subscribe_timeout, confirmed).await,
            Ok(true)
        ) {
            return Err(Ending::error(
                Disconnect::UNAVAILABLE,
                "broker unavailable",
                format!(
                    "the subscription to {destination} could not be confirmed; reconnect later"
                ),
                receipt,
            ));
        }
        if let (Some(start), Some(recovery)) = (stream, recovery) {
            let target = Target {
                topic: &topic,
                prefix: &prefix,
                unescaped,
                presence,
            };
            self.resume(&target, start, &recovery, holding_since, receipt)
                .await?;
        }
        Ok(())
    }

    /// Serves a subscription's start position: reads the history it asks for, merges it with
    /// the live events held since the subscription was confirmed, and sends the outcome
    /// (`lockstep.subscribed`) and then every event after the position it states, in order,
    /// before the subscription goes on like any other. Never a partial replay: what cannot be
    /// served in full is `x-recovered:false` and no missed event at all.
    async fn resume(
        &mut self,
        target: &Target<'_>,
        start: StreamStart,
        recovery: &Recovery,
        holding_since: Instant,
        receipt: Option<&str>,
    ) -> Result<(), Ending> {
        let hub = self.hub.clone();
        let max = hub.inner.config.history.max_replay;
        let unavailable = |err: &dyn std::fmt::Display| {
            Ending::error(
                Disconnect::UNAVAILABLE,
                "broker unavailable",
                format!(
                    "the history of {} could not be read ({err}); reconnect later",
                    target.topic
                ),
                receipt,
            )
        };
        let topic = target.topic;
        // A snapshot: the latest event of every key, read with the position it stands at.
        let mut state = Vec::new();
        let history = if start == StreamStart::Snapshot {
            let snapshot = hub.snapshot(topic).await.map_err(|e| unavailable(&e))?;
            state = snapshot.events;
            History {
                first: snapshot.top.offset + 1,
                top: snapshot.top,
                events: Vec::new(),
            }
        } else {
            let (after, limit) = match &start {
                StreamStart::After { offset, .. } => (*offset, max.saturating_add(1)),
                _ => (u64::MAX, 0),
            };
            hub.history_since(topic, after, limit, Some(holding_since.into_std()))
                .await
                .map_err(|e| unavailable(&e))?
        };
        let top = history.top.clone();
        let replay: Option<Vec<StreamEvent>> = match &start {
            StreamStart::Next | StreamStart::Snapshot => Some(Vec::new()),
            StreamStart::Last if top.offset == 0 => Some(Vec::new()),
            StreamStart::Last => {
                let last = hub
                    .history(topic, top.offset - 1, 1)
                    .await
                    .map_err(|e| unavailable(&e))?;
                let event = last
                    .events
                    .into_iter()
                    .find(|e| e.offset == top.offset && e.epoch == top.epoch);
                event.map(|e| vec![e])
            }
            StreamStart::After { offset, epoch } => {
                replayable(*offset, epoch, &history, max).then(|| {
                    history
                        .events
                        .iter()
                        .filter(|e| e.offset > *offset && e.offset <= top.offset)
                        .cloned()
                        .collect()
                })
            }
        };
        // From here on, live events of this subscription go to the queue, after everything
        // written below. History may be ahead of this node's live delivery: a live event the
        // replay already holds (at or below the top it read) would come again, so it is
        // dropped; likewise events below a position stated without a replay.
        let top_offset = top.offset;
        let replays = matches!(
            start,
            StreamStart::Last | StreamStart::After { .. } | StreamStart::Snapshot
        );
        hub.inner.fanout.observe(topic.as_str(), &top);
        let held = recovery.go_live(&top.epoch, |held| {
            if replays || held.is_empty() {
                top_offset
            } else {
                // Held events continue the stream from the position stated (the first of
                // them), and every later one is newer.
                0
            }
        });
        let plan = Resumed::plan(&start, &top, replay, held);
        metrics::counter!(crate::metrics::RESUMES, "recovered" => if plan.recovered { "true" } else { "false" })
            .increment(1);
        metrics::counter!(crate::metrics::REPLAYED).increment(plan.replay.len() as u64);
        let ts = protocol::envelope::format_ts(SystemTime::now());
        let first = stream::subscribed(
            topic.as_str(),
            &hub.new_id(),
            &ts,
            plan.recovered,
            &plan.position,
        );
        let mut frames = Vec::with_capacity(1 + state.len() + plan.replay.len() + plan.held.len());
        frames.push(frame_for(&first, target));
        // The snapshot's events are state (each the latest of its key, at or below the stated
        // position), marked so, before the stream continues after the position.
        if plan.recovered {
            let marked = format!("{}:true\n", server::SNAPSHOT_HEADER);
            frames.extend(
                state
                    .iter()
                    .filter(|e| target.wants(&e.message))
                    .map(|e| frame_with(&e.message, target, &marked)),
            );
        }
        frames.extend(
            plan.replay
                .iter()
                .filter(|e| target.wants(&e.message))
                .map(|e| frame_for(&e.message, target)),
        );
        frames.extend(plan.held);
        self.write_frames(frames).await
    }

    fn on_unsubscribe(&mut self, id: &str) {
        // Unknown ids are ignored: the subscription is gone either way.
        let hub = &self.hub.inner;
        if let Some(topic) = self.subscriptions.remove(id) {
            hub.connections.unsubscribed(&self.handle, topic.as_str());
            self.touch_presence(&topic);
            if hub.registry.remove(topic.as_str(), self.conn, id) {
                hub.subscriptions.mark(topic.as_str());
            }
        }
    }

    /// A token refresh: the connection goes on under `token` from now on (its expiry, teams
    /// and scopes), and the subscriptions it no longer allows end with
    /// `lockstep.unsubscribed`.
    ///
    /// A refused token (invalid, expired, another user's, revoked, or over the refresh budget)
    /// gets an `ERROR` frame but does not close the connection, unlike every other `ERROR`: the
    /// connection keeps its old token, which is still valid, until that expires (4002 as
    /// usual). Closing would drop a client whose current token still works because its
    /// provider produced a bad one, and the `ERROR` tells it now rather than at expiry. Two
    /// things do close: [`MAX_REFUSED_REFRESHES`] refusals in a row (4001), and a refresh that
    /// finds the *current* token revoked (4011: this node missed the control message).
    async fn on_refresh(
        &mut self,
        token: Option<&str>,
        receipt: Option<&str>,
    ) -> Result<(), Ending> {
        match self.refresh(token).await {
            Ok(ended) => {
                metrics::counter!(crate::metrics::TOKEN_REFRESHES, "outcome" => "ok").increment(1);
                debug!(ended, "token refreshed");
                self.refused_refreshes = 0;
                // Queued behind the `lockstep.unsubscribed` frames the refresh caused: a
                // client that waits for the receipt has seen them.
                if let Some(id) = receipt {
                    let frame = server::receipt(id);
                    crate::metrics::frame_out(&frame.command);
                    let text = server::to_text_for(&frame, self.version());
                    if matches!(self.queue.push(Utf8Bytes::from(text)), Pushed::Full) {
                        return Err(Ending::close(Disconnect::SLOW_CONSUMER));
                    }
                }
                Ok(())
            }
            Err(Refused::Unavailable(err)) => Err(revocations_unavailable(&err, receipt)),
            Err(Refused::Slow) => Err(Ending::close(Disconnect::SLOW_CONSUMER)),
            Err(Refused::Removed) => Err(token_revoked(receipt)),
            Err(Refused::Token(why)) => {
                metrics::counter!(crate::metrics::TOKEN_REFRESHES, "outcome" => "refused")
                    .increment(1);
                debug!(%why, "token refresh refused");
                self.refused_refreshes += 1;
                if self.refused_refreshes >= MAX_REFUSED_REFRESHES {
                    return Err(Ending::error(
                        Disconnect::UNAUTHORIZED,
                        "token refused",
                        format!("{why}; {MAX_REFUSED_REFRESHES} refreshes in a row were refused"),
                        receipt,
                    ));
                }
                let frame = server::error(
                    "token refused",
                    receipt,
                    &format!("{why}; the connection keeps its current token until it expires"),
                );
                self.send_frame(&frame).await
            }
        }
    }

    /// Verifies and applies a new token; answers how many subscriptions it ended.
    async fn refresh(&mut self, token: Option<&str>) -> Result<usize, Refused> {
        let current = &self.connected.as_ref().expect("connected").principal;
        // A refresh costs a signature check and a broker read: it draws on the token's SEND
        // budget like a SEND, but is refused rather than held when the budget is spent.
        if self.hub.take_budget(current).is_err() {
            metrics::counter!(crate::metrics::SEND_THROTTLED).increment(1);
            return Err(Refused::Token(
                "too many token refreshes: they count against the token's SEND rate".to_owned(),
            ));
        }
        let token = token.ok_or_else(|| {
            Refused::Token(
                "no token: send it in the passcode or Authorization header of the SEND".to_owned(),
            )
        })?;
        let now_ms = unix_now_ms();
        let principal = self
            .hub
            .inner
            .auth
            .verify(token, now_ms / 1000)
            .map_err(|e| Refused::Token(e.to_string()))?;
        if principal.sub != current.sub {
            return Err(Refused::Token(
                "the new token is another user's (its sub differs)".to_owned(),
            ));
        }
        let current_issued = current.issued_at;
        let revocations = self
            .hub
            .revocations_of(&principal.sub)
            .await
            .map_err(|e| Refused::Unavailable(e.to_string()))?;
        // What this node may have missed: the connection itself is revoked.
        if revocations.iter().any(|r| r.covers(None, current_issued)) {
            return Err(Refused::Removed);
        }
        if revocations
            .iter()
            .any(|r| r.covers(None, principal.issued_at))
        {
            return Err(Refused::Token(
                "the new token was revoked (this user's connections were removed)".to_owned(),
            ));
        }
        let expires = expiry(principal.exp, now_ms);
        let issued_at = principal.issued_at;
        let still_allowed = |topic: &Topic| {
            principal.can_subscribe(topic).is_ok()
                && !revocations
                    .iter()
                    .any(|r| r.covers(Some(topic.as_str()), issued_at))
        };
        let ended: Vec<Topic> = self
            .subscriptions
            .values()
            .filter(|t| !still_allowed(t))
            .cloned()
            .collect();
        let connected = self.connected.as_mut().expect("connected");
        connected.principal = principal;
        connected.expires = expires;
        self.handle.refreshed(issued_at);
        self.revocations = revocations;
        self.refreshed = true;
        let count = ended.len();
        self.end_subscriptions(TOKEN_CHANGED, |t| ended.contains(t))
            .map_err(|_| Refused::Slow)?;
        Ok(count)
    }

    /// The control API revoked topics of this user: the subscriptions they cover end (with
    /// `lockstep.unsubscribed`), unless the token was refreshed to one issued after them.
    fn on_revoked(&mut self, revocations: Vec<Revocation>) -> Result<(), Ending> {
        let Some(c) = &self.connected else {
            return Ok(());
        };
        let issued_at = c.principal.issued_at;
        let covering: Vec<Revocation> = revocations
            .into_iter()
            .filter(|r| r.covers_token(issued_at))
            .collect();
        if covering.is_empty() {
            return Ok(());
        }
        let ended = |topic: &Topic| {
            covering
                .iter()
                .filter_map(|r| r.topic.as_deref())
                .any(|t| crate::control::covers_topic(t, topic.as_str()))
        };
        self.end_subscriptions(REVOKED, ended)?;
        for revocation in covering {
            self.revocations.retain(|r| r.topic != revocation.topic);
            self.revocations.push(revocation);
        }
        Ok(())
    }

    /// Ends the subscriptions whose topic `ended` says, each with a final
    /// `lockstep.unsubscribed` MESSAGE giving `reason`, queued behind whatever the
    /// subscription already had queued.
    fn end_subscriptions(
        &mut self,
        reason: &str,
        ended: impl Fn(&Topic) -> bool,
    ) -> Result<(), Ending> {
        let ids: Vec<(Arc<str>, Topic)> = self
            .subscriptions
            .iter()
            .filter(|(_, topic)| ended(topic))
            .map(|(id, topic)| (id.clone(), topic.clone()))
            .collect();
        let unescaped = self.version() == "1.0";
        for (id, topic) in ids {
            self.on_unsubscribe(&id);
            let ts = protocol::envelope::format_ts(SystemTime::now());
            let notice = stream::unsubscribed(topic.as_str(), &self.hub.new_id(), &ts, reason);
            let prefix = subscription_prefix(&id, unescaped);
            let target = Target {
                topic: &topic,
                prefix: &prefix,
                unescaped,
                presence: true,
            };
            metrics::counter!(crate::metrics::UNSUBSCRIBED, "reason" => reason.to_owned())
                .increment(1);
            if matches!(self.queue.push(frame_for(&notice, &target)), Pushed::Full) {
                return Err(Ending::close(Disconnect::SLOW_CONSUMER));
            }
        }
        Ok(())
    }

    fn on_send(
        &mut self,
        destination: &str,
        event_type: Option<&str>,
        key: Option<String>,
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
        // Checked against the revocations this session knows (no read per SEND: a node that
        // missed the control message learns of it at the connection's next SUBSCRIBE).
        if self
            .revocations
            .iter()
            .any(|r| r.covers(Some(topic.as_str()), principal.issued_at))
        {
            return Err(Ending::error(
                Disconnect::FORBIDDEN,
                "forbidden",
                format!(
                    "cannot publish to {destination}: access was revoked after this token was issued; get a new token"
                ),
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
        if let Some(key) = &key {
            protocol::stream::check_event_key(key)
                .map_err(|e| protocol_error("invalid x-key", e))?;
        }
        if let Some(ct) = content_type
            && !ct.trim_start().starts_with("application/json")
        {
            return Err(protocol_error(
                "unsupported content-type",
                format!("content-type '{ct}' is not application/json"),
            ));
        }
        let data: Box<RawValue> = serde_json::from_slice(body).map_err(|e| {
            protocol_error(
                "invalid JSON body",
                format!("the SEND body must be JSON: {e}"),
            )
        })?;
        let held = HeldSend {
            topic,
            event_type,
            data,
            key,
            receipt: receipt.map(str::to_owned),
            until: Instant::now(),
        };
        self.publish_send(held)
    }

    /// Publishes a validated `SEND` if the token's budget allows, or holds it until it will.
    /// Never waits: a held `SEND` stops reading, not writing.
    fn publish_send(&mut self, mut send: HeldSend) -> Result<(), Ending> {
        let principal = &self.connected.as_ref().expect("connected").principal;
        if let Err(wait) = self.hub.take_budget(principal) {
            metrics::counter!(crate::metrics::SEND_THROTTLED).increment(1);
            // A wait no budget can meet (a rate that cannot refill) is capped, not infinite.
            send.until = Instant::now() + Duration::from_secs_f64(wait.clamp(0.001, 60.0));
            self.held = Some(send);
            return Ok(());
        }
        let confirmed = self.hub.publish(
            &send.topic,
            &send.event_type,
            &send.data,
            PublishOptions {
                key: send.key.take(),
                ..PublishOptions::default()
            },
        );
        self.pending.push_back((send.receipt, confirmed));
        Ok(())
    }

    /// A publish was confirmed (or failed): send its receipt, or end with an error.
    async fn publish_done(
        &mut self,
        receipt: Option<String>,
        result: Result<Published, PublishError>,
    ) -> Result<(), Ending> {
        match result {
            Ok(_) => match receipt {
                Some(id) => self.send_frame(&server::receipt(&id)).await,
                None => Ok(()),
            },
            Err(err @ PublishError::TooLarge { .. }) => Err(Ending::error(
                Disconnect::PROTOCOL_ERROR,
                "event too large",
                err.to_string(),
                receipt.as_deref(),
            )),
            Err(err) => Err(Ending::error(
                Disconnect::UNAVAILABLE,
                "broker unavailable",
                err.to_string(),
                receipt.as_deref(),
            )),
        }
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
        let version = self.version();
        let ws = &mut self.ws;
        let goodbye = async {
            if let Some(e) = error {
                let frame = server::error(e.message, e.receipt.as_deref(), &e.details);
                crate::metrics::frame_out(&frame.command);
                ws.feed(Message::Text(server::to_text_for(&frame, version).into()))
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

    /// Tells presence that this user's membership of `topic` here may have changed.
    fn touch_presence(&self, topic: &Topic) {
        if let Some(c) = &self.connected
            && crate::presence::has_presence(topic.as_str())
        {
            self.hub
                .inner
                .presence
                .touch(&topic.as_str().into(), &c.principal.sub.as_str().into());
        }
    }

    fn cleanup(&mut self) {
        self.queue.close();
        let hub = &self.hub.inner;
        hub.connections.remove(&self.handle);
        for topic in self.subscriptions.values() {
            self.touch_presence(topic);
        }
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
) -> impl Future<Output = Result<Published, PublishError>> + '_ {
    std::future::poll_fn(move |cx| match pending.front_mut() {
        Some((_, confirmed)) => confirmed.as_mut().poll(cx),
        None => std::task::Poll::Pending,
    })
}

/// Token refreshes refused in a row before the connection is closed (4001).
const MAX_REFUSED_REFRESHES: u32 = 5;

/// Where a `SEND` refreshes the connection's token (DESIGN §15).
const TOKEN_DESTINATION: &str = "/lockstep/token";

/// `lockstep.unsubscribed` reasons.
const REVOKED: &str = "revoked";
const TOKEN_CHANGED: &str = "token";

fn revocations_unavailable(err: &dyn std::fmt::Display, receipt: Option<&str>) -> Ending {
    Ending::error(
        Disconnect::UNAVAILABLE,
        "broker unavailable",
        format!("could not check whether this token was revoked ({err}); reconnect later"),
        receipt,
    )
}

/// The connection's token is covered by a disconnect (4011).
fn token_revoked(receipt: Option<&str>) -> Ending {
    Ending::error(
        Disconnect::REMOVED,
        "token revoked",
        "this user's connections were removed; connect with a token issued after that",
        receipt,
    )
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

/// Why a token refresh did not happen.
#[derive(Debug)]
enum Refused {
    /// The token: the client is told, the connection goes on.
    Token(String),
    /// The connection's current token is revoked (4011).
    Removed,
    /// The revocations could not be read.
    Unavailable(String),
    /// The client's queue is full.
    Slow,
}

/// The subscription a resume serves.
struct Target<'a> {
    topic: &'a Topic,
    prefix: &'a str,
    unescaped: bool,
    /// Whether the subscription gets presence events.
    presence: bool,
}

impl Target<'_> {
    fn wants(&self, message: &MessageTemplate) -> bool {
        self.presence || !crate::registry::is_presence(message)
    }
}

/// A subscription's `subscription` header line, unescaped for STOMP 1.0.
fn subscription_prefix(id: &str, unescaped: bool) -> String {
    if unescaped {
        server::subscription_prefix_unescaped(id)
    } else {
        server::subscription_prefix(id)
    }
}

/// `message` framed for the subscription.
fn frame_for(message: &MessageTemplate, target: &Target<'_>) -> Utf8Bytes {
    frame_with(message, target, "")
}

/// [`frame_for`] with header lines of the subscription's own (`x-snapshot:true\n`).
fn frame_with(message: &MessageTemplate, target: &Target<'_>, own: &str) -> Utf8Bytes {
    Utf8Bytes::from(if target.unescaped && message.has_escapes() {
        message.frame_with_unescaped(target.prefix, own)
    } else {
        message.frame_with(target.prefix, own)
    })
}

/// Whether history can serve every event after `offset` of `epoch` in one replay: same epoch,
/// not beyond the top, at most `max` events, none trimmed.
fn replayable(offset: u64, epoch: &str, history: &History, max: usize) -> bool {
    let top = &history.top;
    *top.epoch == *epoch
        && offset <= top.offset
        && top.offset - offset <= max as u64
        && (offset == top.offset || history.first <= offset + 1)
}

/// What a resume sends after `lockstep.subscribed`.
#[derive(Debug)]
struct Resumed {
    recovered: bool,
    /// The position `lockstep.subscribed` states: every event after it follows, in order.
    position: Position,
    /// Events from history, oldest first.
    replay: Vec<StreamEvent>,
    /// Live events held meanwhile, already framed, that come after the replay.
    held: Vec<Utf8Bytes>,
}

impl Resumed {
    /// Merges what history served (`None`: it could not serve the start position in full)
    /// with the live events held meanwhile (which the node delivers contiguously, or after a
    /// reset). Drops duplicates; any gap between the two is a failed recovery, never a
    /// partial one.
    fn plan(
        start: &StreamStart,
        top: &Position,
        replay: Option<Vec<StreamEvent>>,
        held: Vec<Held>,
    ) -> Resumed {
        // Only what follows the last reset among the held events can be trusted.
        let reset_at = held.iter().rposition(|h| matches!(h, Held::Reset { .. }));
        let (held, reset) = match reset_at {
            Some(i) => {
                let mut rest = held;
                let tail = rest.split_off(i + 1);
                let Some(Held::Reset { position, frame }) = rest.pop() else {
                    unreachable!("rposition found a reset here")
                };
                (tail, Some((position, frame)))
            }
            None => (held, None),
        };
        let events: Vec<(u64, Utf8Bytes)> = held
            .into_iter()
            .filter_map(|h| match h {
                Held::Event { offset, frame, .. } => Some((offset, frame)),
                Held::Reset { .. } => None,
            })
            .collect();
        let live = |from: Position| -> Resumed {
            let position = events.first().map_or(from.clone(), |(o, _)| {
                Position::new(o - 1, from.epoch.clone())
            });
            Resumed {
                recovered: false,
                position,
                replay: Vec::new(),
                held: events.iter().map(|(_, f)| f.clone()).collect(),
            }
        };
        if let Some((position, frame)) = reset {
            // The node could not deliver part of the stream meanwhile: not recovered; the
            // reset itself is not sent, the outcome says the same.
            drop(frame);
            return live(position);
        }
        let Some(replay) = replay else {
            return live(top.clone());
        };
        // The position the replay starts after.
        let from = match start {
            StreamStart::After { offset, .. } => *offset,
            StreamStart::Last => replay.first().map_or(top.offset, |e| e.offset - 1),
            // The snapshot stands at the top; the stream continues right after it.
            StreamStart::Snapshot => top.offset,
            StreamStart::Next => {
                let mut plan = live(top.clone());
                plan.recovered = true;
                return plan;
            }
        };
        let mut next = from;
        for event in &replay {
            if event.offset != next + 1 {
                return live(top.clone());
            }
            next = event.offset;
        }
        let mut held_frames = Vec::new();
        for (offset, frame) in &events {
            if *offset <= next {
                continue;
            }
            if *offset != next + 1 {
                return live(top.clone());
            }
            next = *offset;
            held_frames.push(frame.clone());
        }
        Resumed {
            recovered: true,
            position: Position::new(from, top.epoch.clone()),
            replay,
            held: held_frames,
        }
    }
}

/// What the session timer found due.
#[derive(Debug)]
enum Timer {
    /// Nothing yet; look again then.
    Next(Instant),
    /// Send a heart-beat.
    HeartBeat,
    /// Ping a silent peer.
    Ping,
}

/// Resolves when the held `SEND` may go.
async fn held_until(held: Option<&HeldSend>) {
    match held {
        Some(held) => sleep_until(held.until).await,
        None => std::future::pending().await,
    }
}

/// The decoder limits before `CONNECT`: frames of at most `connect_frame_bytes`.
fn connect_limits(limits: Limits, connect_frame_bytes: usize) -> Limits {
    Limits {
        max_frame_bytes: limits.max_frame_bytes.min(connect_frame_bytes),
        max_body_bytes: limits.max_body_bytes.min(connect_frame_bytes),
        ..limits
    }
}

/// When a token with `exp` (Unix seconds) expires, on the monotonic clock. Milliseconds, so a
/// token is not honoured up to a second past its `exp`; saturating, so no claim can overflow
/// the clock.
fn expiry(exp: u64, now_ms: u64) -> Instant {
    let left = Duration::from_millis(exp.saturating_mul(1000).saturating_sub(now_ms));
    Instant::now()
        .checked_add(left)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400))
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
