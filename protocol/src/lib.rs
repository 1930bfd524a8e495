//! Lockstep's wire protocol, without I/O.
//!
//! Everything a peer of Lockstep needs to read or write bytes lives here: the STOMP 1.2 frame
//! codec, the typed client commands, the server frames the hub sends, the JSON event envelope,
//! topic and event-type parsing, heart-beat negotiation and the WebSocket close codes.
//!
//! The crate is sans-I/O: no tokio, no sockets, no clock. Callers hand in bytes, ids and
//! timestamps; the crate hands back frames and bytes. That keeps the codec deterministic, cheap
//! to fuzz, and shared by the hub, the load generator and the tests.
//!
//! # Layout
//!
//! - [`frame`]: the untyped [`Frame`] (command, headers, body) and its encoder.
//! - [`decode`]: the incremental [`Decoder`], which turns a byte buffer into frames and enforces
//!   [`Limits`].
//! - [`client`]: [`ClientFrame`], the typed view of a frame a client sent.
//! - [`server`]: builders for `CONNECTED`, `RECEIPT`, `ERROR`, and [`MessageTemplate`], the
//!   encode-once form of a `MESSAGE`.
//! - [`envelope`]: the JSON [`Envelope`] every event travels in.
//! - [`topic`]: [`Topic`] and [`EventType`] parsing.
//! - [`heartbeat`]: STOMP heart-beat negotiation.
//! - [`close`]: WebSocket close codes and reasons.
//! - [`auth`]: JWT verification and the subscribe/publish rules ([`Principal`]).
//! - [`rate`]: a token bucket for publish rate limits.
//! - [`stream`]: stream positions (offset, epoch) in `MESSAGE` headers, `SUBSCRIBE`'s start
//!   position, and the `lockstep.subscribed` and `lockstep.reset` frames.
//! - [`session`]: session ids that carry a MAC over node, id and user ([`SessionKey`]).

pub mod auth;
pub mod client;
pub mod close;
pub mod decode;
pub mod envelope;
pub mod frame;
pub mod heartbeat;
pub mod rate;
pub mod server;
pub mod session;
pub mod stream;
pub mod topic;

pub use auth::{AuthError, Authenticator, Forbidden, Principal, Scope};
pub use client::{ClientCommand, ClientFrame, CommandError, Connect};
pub use close::Disconnect;
pub use decode::{DecodeError, Decoder, Limits};
pub use envelope::{Envelope, Event};
pub use frame::{Command, Frame};
pub use heartbeat::HeartBeat;
pub use server::MessageTemplate;
pub use session::{SessionError, SessionKey};
pub use stream::{Position, StreamStart};
pub use topic::{EventType, Topic, TopicError, TopicKind};
