//! Lockstep's load generator and measuring tools, and the STOMP client the end-to-end tests
//! share.
//!
//! # Layout
//!
//! - [`client`]: [`client::StompClient`], a small STOMP-over-WebSocket client on `protocol`,
//!   for tests (it can send malformed input on purpose).
//! - [`wire`]: [`wire::RawWs`], a bare WebSocket client cheap enough to generate load.
//! - [`target`]: the servers under test (Lockstep, RabbitMQ Web-STOMP, the ceiling server)
//!   and how each is spoken to.
//! - [`stats`]: expected/delivered accounting, latency histograms, per-second timeline.
//! - Scenarios: [`fanout`], [`idle`], [`connect`], [`resume`], [`presence`], [`webhooks`], and [`api_load`]
//!   (locks, presign, signing).
//! - [`ceiling`]: the reference broadcast server.

pub mod api_load;
pub mod ceiling;
pub mod client;
pub mod connect;
pub mod control;
pub mod fanout;
pub mod idle;
pub mod presence;
pub mod raw_locks;
pub mod resume;
pub mod stats;
pub mod target;
pub mod webhooks;
pub mod wire;
